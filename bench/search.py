"""Every DRM-guided search against best-of-N at equal compute, on the CPU toy, compared image by
image.

    python -m bench.search # every method (about 50 minutes on 2 cores)
    python -m bench.search --methods=ode,sde,stepwise       # some of them (best-of-N always)
    python -m bench.search --prompt_set=train --methods=smc --lmbdas=1,10,100 --out=out/search_train
    # tune SMC

Ten prompts (the held-out ones, or with --prompt_set=train ten training prompts) x per_prompt seeds.
Every method starts from the same pool of initial noises (image i's j-th particle is pool[i, j];
single-trajectory methods start from pool[i, 0]) and the same SDE generator, so methods compare
image by image. Methods (sample.py --search=...): the ODE; the plain SDE (no search); step-wise
greedy and beam search (the paper: k SDE successors a step, the DRM ranks them), scoring the
successor's noisy state (the paper), its clean estimate (x0) or its ODE completion (lookahead,
DenseGRPO's step reward, every 5th step); particle search (FK steering as its code runs it: the
x0-prediction scored, resampled on its interval; its lambda the best of --lmbdas on ten training
prompts, chosen before the held-out sweep), and
our earlier variant (the noisy state scored and resampled at every step below the ESS threshold);
pruned best-of-N (N ODE trajectories, the DRM keeps a quarter at sigma 0.6).

Best-of-N is one curve, N = 1..16, from one pool of 16 ODE samples an image: with the 16 ranked by
the DRM at sigma 0, the chance that the i-th lowest is the favourite of a random N of them is C(i -
1, N - 1) / C(16, N), so the curve is the unbiased mean over all N-subsets (`best_of_n_curve`),
image by image. Compute per image is counted in DiT-pass equivalents: DiT passes plus DRM passes x a
DRM pass's FLOPs over a DiT pass's (counted here: 0.535 on the toy), and shown at SD3.5-medium's
ratio (0.90) too. Each method's verdict: its gold minus best-of-N's at the same equivalents
(interpolated in N), per image, mean +- s.e. clustered by prompt (images of one prompt are not
independent); "beats" or "loses" only when its two-sided 95% interval at prompts - 1 degrees of
freedom excludes 0 (bench/stats.py), else "tie". Writes OUT.json, OUT.md and OUT.png (needs
matplotlib). Each measured point is kept in OUT.partial.jsonl as it finishes: a sweep stopped midway
and run again with the same flags and files measures only what is left (the points are independent:
each draws from its own seeded generator), and the file is removed when the sweep is written.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch

import sample
from bench.stats import SD35_MEDIUM_DRM_COST, clustered, interval, verdict
from checkpoints import check_writable, fingerprint, write_text
from common import (UserError, check_flags, count_flops, flag, pick_device, with_flags,
                    print_config, run_main)
from data.toy import ToyBase
from evaluation import diversity
from model import compile_regions
from sample import search, stepwise_sample
from sde import Sampler, initial_noise, sigma_schedule

METHODS = ("ode", "sde", "stepwise", "x0", "x0_proxy", "lookahead", "beam", "smc", "smc_noisy",
           "prune")
POOL = 16  # ODE samples an image behind the best-of-N curve


def settings(cfg, lmbdas):
    """(method, label, sample.Config overrides) for every point of the sweep, SMC at `lmbdas`."""
    points = [("ode", "ODE", {"search": "ode"}), ("sde", "SDE", {"search": "sde"})]
    points += [("stepwise", f"step-wise k={k}", {"search": "stepwise", "k": k}) for k in (2, 4, 8)]
    points += [("x0", f"step-wise k={k}, x0 score", {"search": "stepwise", "k": k, "score": "x0"})
               for k in (2, 4, 8)]
    points += [("x0_proxy", f"step-wise k={k}, x0 proxy score",
                {"search": "stepwise", "k": k, "score": "x0_proxy"}) for k in (2, 4, 8)]
    points += [("lookahead", f"step-wise k={k}, lookahead every 5th step",
                {"search": "stepwise", "k": k, "score": "lookahead", "score_every": 5})
                for k in (2, 4)]
    points += [("beam", f"beam 2, k={k}", {"search": "stepwise", "k": k, "beam": 2})
               for k in (2, 4)]
    points += [("smc", f"SMC N={n}, lambda {lmbda:g}",
                {"search": "smc", "particles": n, "lmbda": lmbda})
               for lmbda in lmbdas for n in (2, 4, 8)]
    points += [("smc_noisy", "SMC N=4, noisy, every step, ESS",
                {"search": "smc", "particles": 4, "score": "noisy", "resample": (1, 0, 19),
                 "adaptive": True})]
    points += [("prune", f"prune N={n} to {n // 4 or 1} at 0.6",
                {"search": "prune", "particles": n, "keep": 0.25, "prune_at": (0.6,)})
                for n in (4, 8, 16)]
    chosen = cfg.methods or METHODS
    return [p for p in points if p[0] in chosen]


@dataclass
class Config:
    base: str = "data/base.safetensors"
    drm: str = "data/drm.safetensors"
    # comma-separated, of METHODS ("" = all); best-of-N is always measured
    methods: tuple = flag((), choices=METHODS, of=str)
    # SMC's lambdas (weights exp(lambda x the DRM's gain)): on the held-out prompts, the one whose
    # SMC N=4 scores the best gold on the training prompts (tuned there first); on --prompt_set=
    # train, each
    lmbdas: tuple = flag((1.0, 3.0, 10.0, 30.0, 100.0), "(0, inf)", of=float)
    # heldout (the ten held-out prompts) | train (ten training prompts, to tune)
    prompt_set: str = flag("heldout", choices=("heldout", "train"))
    per_prompt: int = flag(20, "[2, inf)")  # seeds per prompt
    steps: int = flag(20, "[1, inf)")
    cfg_scale: float = flag(4.0, "[0, inf)")
    shift: float = flag(1.0, "(0, inf)")
    noise_level: float = flag(0.7, "(0, inf)")  # SDE noise of step-wise successors and particles
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    out: str = "out/search"            # writes OUT.json, OUT.md, OUT.png
    compile: bool = False
    device: str = "auto"


class Finished:
    """The sweep's finished points {key: value}, kept in `path` (JSON lines: the flags, the device
    and the files' fingerprints, then one point a line) as each finishes. Kept points of other
    flags (but --methods: a point is the same whichever others run beside it), another device or
    other files are dropped; a line cut short by a kill is dropped with what follows it."""

    def __init__(self, path, identity):
        self.path, self.done = path, {}
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        kept.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
        if kept and kept[0] == {"identity": identity}:
            self.done = {entry["key"]: entry["value"] for entry in kept[1:]}
            print(f"resuming: {len(self.done)} points kept in {path}")
        elif kept:
            print(f"{path} kept points of other flags or files: measuring afresh")
        write_text(path, "".join(json.dumps(line) + "\n" for line in
                                 [{"identity": identity}] + [{"key": k, "value": v}
                                                             for k, v in self.done.items()]))

    def get(self, key, measure):
        """The point's kept value, or measure() now, kept before it is returned."""
        if key not in self.done:
            self.done[key] = measure()
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": self.done[key]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return self.done[key]

    def close(self):
        os.remove(self.path)


def drm_cost(dit, drm, x, cond, drm_cond):
    """-> (a DRM pass's FLOPs over an unguided DiT pass's, the same in seconds, median of 3), on one
    state."""
    sigma = torch.full((len(x),), 0.5, device=x.device)
    with torch.no_grad():
        flops = count_flops(lambda: drm(x[:1], sigma[:1], *(t[:1] for t in drm_cond)))
        flops /= count_flops(lambda: dit(x[:1], sigma[:1], *(t[:1] for t in cond)))
        times = {}
        for name, model, text in (("dit", dit, cond), ("drm", drm, drm_cond)):
            runs = []
            for _ in range(4):
                t0 = time.time()
                model(x, sigma, *text)
                runs.append(time.time() - t0)
            times[name] = sorted(runs[1:])[1]
    return flops, times["drm"] / times["dit"]


def best_of_n_curve(scores, gold, n):
    """The expected gold of the DRM's favourite among n of M samples drawn without replacement, per
    image, from all M: scores, gold (I, M) -> (I,). Ranked by score, the i-th lowest (i = 1..M) is
    the favourite of C(i - 1, n - 1) of the C(M, n) subsets (those of it and n - 1 lower ones), so
    the mean over subsets weights it by that share."""
    M = scores.shape[1]
    ranked = gold.gather(1, scores.argsort(1)).double()
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(M, n) for i in range(M)],
                           dtype=torch.float64)
    return ranked @ weights


def best_of_cost(n, sample_passes, cost):
    """DiT-pass equivalents an image of best-of-n: n ODE samples of sample_passes DiT passes each
    (as the sampler counted them), and n DRM scorings to pick one (none for n = 1)."""
    return n * sample_passes + (n * cost if n > 1 else 0.0)


def best_of_at(curves, budget, sample_passes, cost):
    """Best-of-N's gold per image at `budget` equivalents: linear in N between the two N that
    bracket it, or None."""
    for n in range(1, POOL):
        low, high = best_of_cost(n, sample_passes, cost), best_of_cost(n + 1, sample_passes, cost)
        if low <= budget <= high:
            f = (budget - low) / (high - low)
            return (1 - f) * curves[n] + f * curves[n + 1]
    return None


def measure(cfg, point, base, drm, drm_text, pool, prompts):
    """One point of the sweep -> its row."""
    method, label, overrides = point
    options = with_flags(sample.Config(), noise_level=cfg.noise_level, **overrides)
    # an image's particles adjacent
    noise = pool[:, :sample.width(options)].flatten(0, 1)
    cond, uncond = base.encode(prompts)
    drm_cond = drm_text.encode(prompts)
    t0 = time.time()
    options = with_flags(options, steps=cfg.steps, cfg_scale=cfg.cfg_scale, shift=cfg.shift)
    sampler = Sampler(base.dit, sigma_schedule(cfg.steps, cfg.shift).to(noise.device), cond,
                      uncond, cfg.cfg_scale)
    images, counts = search(options, sampler, noise, drm, drm_cond,
                            torch.Generator().manual_seed(cfg.seed + 1))
    seconds = time.time() - t0
    images = images.clamp(-1, 1)
    scores = base.judge(images, prompts)
    with torch.no_grad():
        drm_score = drm(images, torch.zeros(len(images), device=images.device),
                        *drm_cond).mean().item()
    gold, n = scores["gold"], len(prompts)
    # one line of the figure
    curve = method + (f", lambda {options.rival.lmbda:g}" if method == "smc" else "")
    row = {"method": method, "curve": curve, "label": label, "gold": gold.mean().item(),
           "gold_se": gold.std().item() / math.sqrt(n),
           "digit_correct": scores["digit_correct"].mean().item(),
           "attribute_match": scores["attribute_match"].mean().item(), "drm": drm_score,
           "diversity": diversity(images.cpu(), cfg.per_prompt), "dit_passes": counts["nfe"] / n,
           "drm_passes": counts["drm_calls"] / n, "ms": 1000 * seconds / n,
           "gold_per_image": gold.tolist()}
    return row


def pool_of_samples(cfg, base, drm, drm_text, pool, prompts):
    """POOL ODE samples an image from pool[:, :POOL] -> (their DRM scores at sigma 0, their gold,
    each (I, POOL); DiT passes a sample)."""
    I = len(prompts)
    repeated = [p for p in prompts for _ in range(POOL)]
    cond, uncond = base.encode(repeated)
    # ODE samples (noise_level 0): the j = 0 column is the ODE row's image, noise for noise
    sampler = Sampler(base.dit, sigma_schedule(cfg.steps, cfg.shift).to(pool.device), cond, uncond,
                      cfg.cfg_scale)
    x, counts = stepwise_sample(sampler, pool[:, :POOL].flatten(0, 1), noise_level=0.0)
    x = x.clamp(-1, 1)
    with torch.no_grad():
        scores = drm(x, torch.zeros(len(x), device=x.device),
                     *drm_text.encode(repeated)).float().cpu()
    gold = base.judge(x, repeated)["gold"].float().cpu()
    return scores.view(I, POOL), gold.view(I, POOL), counts["nfe"] / len(x)


def compare(rows, curves, clusters, sample_passes, at_cost):
    """Each method against best-of-N at the same equivalents (`at_cost`: the DRM cost the
    equivalents are weighed at): per-image differences, their s.e. clustered by prompt, the 95%
    interval at clusters - 1 degrees of freedom, the verdict -> markdown."""
    df = len(torch.unique(clusters)) - 1
    lines = ["| method | DiT-pass equivalents / image | gold | best-of-N there (N) | n (prompts) | "
             "difference ± clustered s.e. | 95% interval | df | paired s.e. (images) | verdict |",
             "|---" * 10 + "|"]
    for r in rows:
        budget = r["dit_passes"] + at_cost * r["drm_passes"]
        reference = best_of_at(curves, budget, sample_passes, at_cost)
        if reference is None:
            lines.append(f"| {r['label']} | {budget:.0f} | {r['gold']:.4f} | outside "
                         f"best-of-1..{POOL} |" + " |" * 6)
            continue
        diff = torch.tensor(r["gold_per_image"], dtype=torch.float64) - reference
        mean, se = clustered(diff, clusters)
        paired = diff.std().item() / math.sqrt(len(diff))
        n = next(n for n in range(1, POOL) if best_of_cost(n + 1, sample_passes, at_cost) >= budget)
        low, high = interval(mean, se, df)
        lines.append(f"| {r['label']} | {budget:.0f} | {r['gold']:.4f} | "
                     f"{reference.mean().item():.4f} ({n}-{n + 1}) | {len(diff)} ({df + 1}) | "
                     f"{mean:+.4f} ± {se:.4f} | [{low:+.4f}, {high:+.4f}] | {df} | {paired:.4f} | "
                     f"{verdict(mean, se, df)} |")
    return "\n".join(lines)


def plot(rows, curves, sample_passes, cost, path):
    try:
        import matplotlib
    except ImportError:
        print(f"no figure: {path} needs matplotlib (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    ns = range(1, POOL + 1)
    means = [curves[n].mean().item() for n in ns]
    ses = [curves[n].std().item() / math.sqrt(len(curves[n])) for n in ns]
    ax.errorbar([best_of_cost(n, sample_passes, cost) for n in ns], means, yerr=ses, marker=".",
                capsize=2, color="black", label=f"best-of-N, N = 1..{POOL} (one pool)")
    for curve in dict.fromkeys(r["curve"] for r in rows):
        points = sorted((r for r in rows if r["curve"] == curve), key=lambda r: r["dit_passes"])
        ax.errorbar([r["dit_passes"] + cost * r["drm_passes"] for r in points],
                    [r["gold"] for r in points],
                    yerr=[r["gold_se"] for r in points], marker="o", capsize=3, label=curve)
    ax.set_xscale("log")
    ax.set_xlabel("DiT-pass equivalents per image")
    ax.set_ylabel("held-out gold (± one s.e. over images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def training_prompts(base):
    """Ten training prompts, one of each digit, their attributes varied."""
    train = base.train_prompts("")
    return [train[8 * d + d % 8] for d in range(10)]


def tune_lmbda(cfg, base, drm, drm_text, finished):
    """SMC's lambda for the held-out sweep: the one of --lmbdas whose SMC N=4 has the best mean
    gold on the training prompts (their own noises) -> (lambda, {lambda: that gold})."""
    prompts = [p for p in training_prompts(base) for _ in range(cfg.per_prompt)]
    pool = initial_noise(base.dit, len(prompts) * 4, torch.Generator().manual_seed(cfg.seed + 1))
    pool = pool.view(len(prompts), 4, *pool.shape[1:]).to(next(base.dit.parameters()).device)
    point = lambda lmbda: ("smc", f"SMC N=4, lambda {lmbda:g}",  # noqa: E731
                           {"search": "smc", "particles": 4, "lmbda": lmbda})
    gold = {lmbda: finished.get(f"tuning: {point(lmbda)[1]}", lambda: measure(
                cfg, point(lmbda), base, drm, drm_text, pool, prompts)["gold"])
            for lmbda in cfg.lmbdas}
    best = max(cfg.lmbdas, key=lambda lmbda: (gold[lmbda], -lmbda))
    shown = ", ".join(f"{lmbda:g}: {g:.4f}" for lmbda, g in gold.items())
    print(f"SMC's lambda on the training prompts (N=4): {shown}; the held-out sweep takes {best:g}")
    return best, gold


def main(cfg):
    check_flags(cfg)
    if not cfg.lmbdas:
        raise UserError("--lmbdas: give at least one lambda, e.g. --lmbdas=1,10,100")
    settings(cfg, cfg.lmbdas)  # the methods checked before any work
    for suffix in (".json", ".md", ".png", ".partial.jsonl"):  # before any work
        check_writable(cfg.out + suffix, "--out=")
    print_config(cfg)
    device = pick_device(cfg.device)
    base = ToyBase.load(cfg.base, device)
    drm, drm_text, _ = base.load_drm(cfg.drm, device)
    if cfg.compile:
        compile_regions(base.dit)
        compile_regions(drm.backbone)
    identity = {"flags": {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
                          if k not in ("out", "methods")}, "device": str(device),
                "files": {"--base=": fingerprint(cfg.base), "--drm=": fingerprint(cfg.drm)}}
    finished = Finished(cfg.out + ".partial.jsonl", identity)
    tuning, lmbdas = None, cfg.lmbdas
    if (cfg.prompt_set == "heldout" and len(lmbdas) > 1
            and "smc" in {p[0] for p in settings(cfg, lmbdas)}):
        best, gold = tune_lmbda(cfg, base, drm, drm_text, finished)
        tuning, lmbdas = {"lmbda": best, "gold_on_train": {f"{k:g}": v for k, v in gold.items()}}, (
            best,)
    points = settings(cfg, lmbdas)
    prompt_list = (base.heldout_prompts("", []) if cfg.prompt_set == "heldout"
                   else training_prompts(base))
    prompts = [p for p in prompt_list for _ in range(cfg.per_prompt)]
    clusters = torch.arange(len(prompt_list)).repeat_interleave(cfg.per_prompt)
    most = max([POOL] + [sample.width(with_flags(sample.Config(), **p[2])) for p in points])
    pool = initial_noise(base.dit, len(prompts) * most, torch.Generator().manual_seed(cfg.seed))
    # image i's j-th particle: pool[i, j]
    pool = pool.view(len(prompts), most, *pool.shape[1:]).to(device)
    cost, seconds = drm_cost(base.dit, drm, pool[:, 0], base.encode(prompts)[0],
                             drm_text.encode(prompts))
    # the first prompt's images
    one = slice(cfg.per_prompt)
    measure(cfg, points[0], base, drm, drm_text, pool[one], prompts[one])   # warm-up
    scores, gold, sample_passes = finished.get(f"best-of-N's pool, noises {most} wide", lambda: [
        v.tolist() if torch.is_tensor(v) else v
        for v in pool_of_samples(cfg, base, drm, drm_text, pool, prompts)])
    scores, gold = torch.tensor(scores), torch.tensor(gold)
    curves = {n: best_of_n_curve(scores, gold, n) for n in range(1, POOL + 1)}
    head = (f"{cfg.prompt_set} prompts, {len(prompt_list)} x {cfg.per_prompt} images, {cfg.steps} "
            f"steps, cfg {cfg.cfg_scale}, SDE noise {cfg.noise_level}; a DRM pass costs {cost:.3f} "
            f"DiT passes in FLOPs ({seconds:.2f} in time here), {SD35_MEDIUM_DRM_COST:.2f} at "
            "SD3.5-medium")
    print(head)
    header = ("| method | gold ± s.e. | DiT passes / image | DRM passes / image | ms / image "
              "|\n|---|---|---|---|---|")
    print(header)
    rows = []
    for point in points:
        rows.append(finished.get(f"{point[1]}, noises {most} wide",  # the widest method's
                                 lambda: measure(cfg, point, base, drm, drm_text, pool, prompts)))
        r = rows[-1]
        print(f"| {r['label']} | {r['gold']:.4f} ± {r['gold_se']:.4f} | {r['dit_passes']:.0f} | "
              f"{r['drm_passes']:.0f} | {r['ms']:.1f} |", flush=True)
    bon = "\n".join(f"| best-of-{n} | {curves[n].mean().item():.4f} ± "
                    f"{curves[n].std().item() / math.sqrt(len(gold)):.4f} | "
                    f"{sample_passes * n:.0f} | {n if n > 1 else 0} | "
                    f"{best_of_cost(n, sample_passes, cost):.0f} |"
                            for n in range(1, POOL + 1))
    table = "\n".join([
        "| method | gold ± s.e. | digit | attributes | DRM | diversity | DiT passes / image | DRM "
        "passes / image | DiT-pass equivalents (SD3.5-medium) | ms / image |", "|---" * 10 + "|"]
        + [f"| {r['label']} | {r['gold']:.4f} ± {r['gold_se']:.4f} | {r['digit_correct']:.1%} | "
           f"{r['attribute_match']:.1%} | {r['drm']:.3f} | {r['diversity']:.4f} | "
           f"{r['dit_passes']:.0f} | {r['drm_passes']:.0f} | "
           f"{r['dit_passes'] + cost * r['drm_passes']:.0f} "
           f"({r['dit_passes'] + SD35_MEDIUM_DRM_COST * r['drm_passes']:.0f}) | {r['ms']:.1f} |"
           for r in rows])
    curve_table = ("| best-of-N (one pool of 16) | gold ± s.e. | DiT passes / image | DRM passes / "
                   "image | DiT-pass equivalents |\n|---|---|---|---|---|\n" + bon)
    judged = (f"Against best-of-N at equal DiT-pass equivalents (a DRM pass = {cost:.3f} DiT "
              "passes):\n\n"
              + compare(rows, curves, clusters, sample_passes, cost)
              + f"\n\nThe same at SD3.5-medium's DRM cost ({SD35_MEDIUM_DRM_COST:.2f}):\n\n"
              + compare(rows, curves, clusters, sample_passes, SD35_MEDIUM_DRM_COST))
    print(judged)
    write_text(cfg.out + ".json", json.dumps({
        "config": dataclasses.asdict(cfg), "drm_cost": cost, "drm_seconds": seconds,
        "smc_tuning": tuning, "rows": rows, "best_of": {n: curves[n].tolist() for n in curves}},
        indent=1))
    tuned = (f"SMC's lambda: {tuning['lmbda']:g}, the best on the training prompts of "
             + ", ".join(f"{k} (gold {v:.4f})" for k, v in tuning["gold_on_train"].items())
             + "\n\n" if tuning else "")
    write_text(cfg.out + ".md", f"{head}\n\n{tuned}{table}\n\n{curve_table}\n\n{judged}\n")
    finished.close()
    figure = plot(rows, curves, sample_passes, cost, cfg.out + ".png")
    print(f"wrote {cfg.out}.json, {cfg.out}.md" + (f", {cfg.out}.png" if figure else ""))
    return rows


if __name__ == "__main__":
    run_main(main, Config)
