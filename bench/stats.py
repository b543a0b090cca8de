"""The statistics the comparisons share: a mean with its standard error, clustered standard errors
for paired per-image differences, Student's t critical value, and the one rule for a verdict: a
difference "beats" or "loses" only when its two-sided 95% interval, mean +- t(df) s.e., excludes 0
(df: seeds - 1 for a paired difference over seeds; clusters - 1 for a clustered one); else "tie"."""
import math

import torch

# a DRM pass over a DiT pass at SD3.5-medium, 512 px (bench/sd3_memory.py)
SD35_MEDIUM_DRM_COST = 2.19 / 2.44


def mean_se(values):
    """-> (mean, standard error of the mean) of a list (s.e. 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def clustered(differences, clusters):
    """-> (mean, s.e.) of per-image differences (I,), the s.e. clustered by `clusters` (I,): images
    of one prompt are not independent. CR1: G / (G - 1) x the sum over the G clusters of their
    summed deviations squared, over I^2."""
    d = differences.double()
    mean = d.mean()
    sums = torch.zeros(int(clusters.max()) + 1, dtype=torch.float64).index_add_(0, clusters,
                                                                                d - mean)
    G = len(torch.unique(clusters))
    return mean.item(), math.sqrt(G / (G - 1) * (sums ** 2).sum().item()) / len(d)


def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz; Numerical Recipes, sec. 6.4), to double precision."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use symmetry
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(1 - x)) / a
    tiny, c, d = 1e-300, 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * f


def t_critical(df, level=0.95):
    """Student's t quantile for a two-sided interval of `level` with df degrees of freedom: the t
    with P(|T| <= t) = level, P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2), found by
    bisection."""
    if df < 1:
        raise ValueError(f"df={df}: an interval needs at least 2 values")
    low, high = 0.0, 1e4
    for _ in range(200):
        t = (low + high) / 2
        if incomplete_beta(df / 2, 0.5, df / (df + t * t)) > 1 - level:
            low = t
        else:
            high = t
    return (low + high) / 2


def interval(difference, se, df, level=0.95):
    """The two-sided `level` interval of a difference: (low, high) = mean -+ t(df) s.e."""
    half = t_critical(df, level) * se
    return difference - half, difference + half


def verdict(difference, se, df):
    """'beats' / 'loses' when the two-sided 95% interval at df degrees of freedom excludes 0, else
    'tie' (also with fewer than 2 values: df < 1)."""
    if df < 1 or se <= 0:
        return "tie"
    low, high = interval(difference, se, df)
    return "beats" if low > 0 else "loses" if high < 0 else "tie"
