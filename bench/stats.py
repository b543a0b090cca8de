"""The statistics the comparisons share: a mean with its standard error, clustered standard errors
for paired per-image differences, and the one rule for a verdict (2 standard errors)."""
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


def verdict(difference, se):
    """'beats' / 'loses' at 2 standard errors or more, else 'tie'."""
    if se > 0 and difference >= 2 * se:
        return "beats"
    if se > 0 and difference <= -2 * se:
        return "loses"
    return "tie"
