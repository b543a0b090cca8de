"""Every DRM-guided search against best-of-N at equal compute, on the CPU toy: the annotator's gold per
millisecond and per DiT-pass equivalent.

    python -m bench.search                                  # every method at a few budgets (about 25 minutes)
    python -m bench.search --methods=ode,best_of,smc        # some of them
    python -m bench.search --prompt_set=train --methods=smc --lmbdas=1,10,100   # tune on training prompts

Ten prompts (the held-out ones, or with --prompt_set=train ten training prompts) x per_prompt seeds; every
method starts from the same pool of initial noises (an image's j-th particle is the j-th noise of its seed,
the ODE's is the first) and the same SDE generator. Methods (sample.py --search=...): the ODE; best-of-N
(N ODE samples, the DRM's favourite); step-wise greedy and beam search (the paper: k SDE successors a step,
the DRM ranks them); particle search (FK steering: N SDE particles resampled by the DRM, lambda
--lmbdas); pruned best-of-N (N ODE trajectories, the DRM keeps a fraction at sigma 0.6). Each point: gold
with its standard error over the images, digit and attribute accuracy, the DRM's own score, diversity,
DiT and DRM passes per image, DiT-pass equivalents (DRM passes weighted by their cost relative to a DiT
pass, measured here), milliseconds per image. Writes OUT.json, OUT.md (table and verdict) and OUT.png
(gold against ms / image and against DiT-pass equivalents; needs matplotlib). The verdict: each search against
best-of-N at equal ms and at equal DiT-pass equivalents (ms include batch effects: all 200 images run as one
batch, and a wide batch runs slower per row on a CPU).
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch

import sample
from base import ToyBase
from common import UserError, check_at_least, check_numbers, parse_numbers, pick_device, print_config, run_main
from model import compile_regions
from sample import diversity, initial_noise, search

METHODS = ("ode", "best_of", "stepwise", "beam", "smc", "prune")


def settings(cfg):
    """(method, label, sample.Config overrides) for every point of the sweep."""
    points = [("ode", "ODE", {"search": "ode"})]
    points += [("best_of", f"best-of-{n}", {"search": "best_of", "particles": n}) for n in (2, 4, 8)]
    points += [("stepwise", f"step-wise k={k}", {"search": "stepwise", "k": k}) for k in (2, 4, 8)]
    points += [("beam", f"beam 2, k={k}", {"search": "stepwise", "k": k, "beam": 2}) for k in (2, 4)]
    points += [("smc", f"SMC N={n}, lambda {lmbda:g}", {"search": "smc", "particles": n, "lmbda": lmbda})
               for lmbda in parse_numbers(cfg, "lmbdas", float) for n in (2, 4, 8)]
    points += [("prune", f"prune N={n} to {n // 4 or 1} at 0.6",
                {"search": "prune", "particles": n, "keep": 0.25, "prune_at": "0.6"}) for n in (4, 8, 16)]
    chosen = cfg.methods.split(",") if cfg.methods else METHODS
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise UserError(f"--methods={cfg.methods}: unknown {unknown}; choose from {', '.join(METHODS)}")
    return [p for p in points if p[0] in chosen]


@dataclass
class Config:
    base: str = "data/base.safetensors"
    drm: str = "data/drm.safetensors"
    methods: str = ""                  # comma-separated, of METHODS ("" = all)
    lmbdas: str = "10"                 # SMC's lambda(s): weights exp(lambda x the DRM's gain)
    prompt_set: str = "heldout"        # heldout (the ten held-out prompts) | train (ten training prompts, to tune)
    per_prompt: int = 20               # seeds per prompt
    steps: int = 20
    cfg_scale: float = 4.0
    shift: float = 1.0
    noise_level: float = 0.7           # SDE noise of step-wise successors and particles
    seed: int = 0
    out: str = "out/search"            # writes OUT.json, OUT.md, OUT.png
    compile: bool = False
    device: str = "auto"


def drm_cost(dit, drm, x, cond):
    """Seconds of one DRM pass over one DiT pass (unguided), on the same batch: median of 3."""
    sigma = torch.full((len(x),), 0.5, device=x.device)
    times = {}
    for name, model in (("dit", dit), ("drm", drm)):
        runs = []
        for _ in range(4):
            t0 = time.time()
            with torch.no_grad():
                model(x, sigma, *cond)
            runs.append(time.time() - t0)
        times[name] = sorted(runs[1:])[1]
    return times["drm"] / times["dit"]


def measure(cfg, point, base, drm, drm_text, pool, prompts, cost, show=True):
    """One point of the sweep -> its row (printed as a table line when show)."""
    method, label, overrides = point
    options = dataclasses.replace(sample.Config(), noise_level=cfg.noise_level, **overrides)
    width = sample.width(options)
    noise = pool[:, :width].flatten(0, 1)                                 # an image's particles adjacent
    cond, uncond = base.encode(prompts)
    drm_cond = drm_text.encode(prompts)
    t0 = time.time()
    images, counts = search(options, base.dit, noise, cond, uncond, drm, drm_cond,
                            torch.Generator().manual_seed(cfg.seed + 1), steps=cfg.steps,
                            cfg_scale=cfg.cfg_scale, shift=cfg.shift)
    seconds = time.time() - t0
    images = images.clamp(-1, 1)
    scores = base.judge(images, prompts)
    with torch.no_grad():
        drm_score = drm(images, torch.zeros(len(images), device=images.device), *drm_cond).mean().item()
    gold, n = scores["gold"], len(prompts)
    dit, drm_passes = counts["nfe"] / n, counts["drm_calls"] / n
    curve = method + (f", lambda {options.lmbda:g}" if method == "smc" else "")   # one line of the figure
    row = {"method": method, "curve": curve, "label": label,
           "gold": gold.mean().item(), "gold_se": gold.std().item() / math.sqrt(n),
           "digit_correct": scores["digit_correct"].mean().item(), "attribute_match": scores["attribute_match"].mean().item(),
           "drm": drm_score, "diversity": diversity(images.cpu(), cfg.per_prompt), "dit_passes": dit,
           "drm_passes": drm_passes, "dit_equivalents": dit + cost * drm_passes, "ms": 1000 * seconds / n,
           "gold_per_image": gold.tolist()}
    if show:
        print(f"| {label} | {row['gold']:.4f} ± {row['gold_se']:.4f} | {row['digit_correct']:.1%} | "
              f"{row['attribute_match']:.1%} | {row['drm']:.3f} | {row['diversity']:.4f} | {dit:.0f} | "
              f"{drm_passes:.0f} | {row['dit_equivalents']:.0f} | {row['ms']:.1f} |", flush=True)
    return row


def best_of_at(rows, value, key):
    """Best-of-N's gold (and its standard error) at `value` of `key` (ms or dit_equivalents) per image: linear
    between the two best-of points (the ODE being best-of-1) that bracket it; None outside their range."""
    curve = sorted((r[key], r["gold"], r["gold_se"]) for r in rows if r["method"] in ("ode", "best_of"))
    for (m0, g0, s0), (m1, g1, s1) in zip(curve, curve[1:]):
        if m0 <= value <= m1:
            f = (value - m0) / (m1 - m0)
            return g0 + f * (g1 - g0), s0 + f * (s1 - s0)


def verdict(rows, key="ms"):
    """Each searching point against best-of-N at the same cost (`key`: ms or dit_equivalents per image): the
    difference and its standard error (independent errors assumed: the shared noise makes it conservative)."""
    name = {"ms": "ms / image", "dit_equivalents": "DiT-pass equivalents"}[key]
    lines = [f"| method | {name} | gold | best-of-N at that cost | difference | in standard errors |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] in ("ode", "best_of"):
            continue
        ref = best_of_at(rows, r[key], key)
        if ref is None:
            lines.append(f"| {r['label']} | {r[key]:.0f} | {r['gold']:.4f} | outside best-of-N's range | | |")
            continue
        diff, se = r["gold"] - ref[0], math.hypot(r["gold_se"], ref[1])
        lines.append(f"| {r['label']} | {r[key]:.0f} | {r['gold']:.4f} | {ref[0]:.4f} | {diff:+.4f} | "
                     f"{diff / se:+.1f} |")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print(f"no figure: {path} needs matplotlib (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    curves = dict.fromkeys(r["curve"] for r in rows)                      # in the sweep's order
    if "best_of" in curves:
        curves.pop("ode", None)                                             # the ODE is best-of-1
    for curve in curves:
        points = [r for r in rows if r["curve"] == curve or curve == "best_of" and r["method"] == "ode"]
        points.sort(key=lambda r: r["ms"])
        for ax, key in zip(axes, ("ms", "dit_equivalents")):
            ax.errorbar([r[key] for r in points], [r["gold"] for r in points], yerr=[r["gold_se"] for r in points],
                        marker="o", capsize=3, label="best-of-N (N = 1: ODE)" if curve == "best_of" else curve)
    for ax, label in zip(axes, ("ms per image (2 CPU threads)", "DiT-pass equivalents per image")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out gold (± one standard error)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main(cfg):
    check_numbers(cfg)
    check_at_least(cfg, 1, "per_prompt", "steps")
    if cfg.prompt_set not in ("heldout", "train"):
        raise UserError(f"--prompt_set={cfg.prompt_set}: choose heldout or train")
    points = settings(cfg)
    print_config(cfg)
    device = pick_device(cfg.device)
    base = ToyBase.load(cfg.base, device)
    drm, drm_text, _ = base.load_drm(cfg.drm, device)
    if cfg.compile:
        compile_regions(base.dit)
        compile_regions(drm.backbone)
    train = base.train_prompts("")                                        # 8 a digit: one of each, varied
    prompt_list = (base.heldout_prompts("", []) if cfg.prompt_set == "heldout"
                   else [train[8 * d + d % 8] for d in range(10)])
    prompts = [p for p in prompt_list for _ in range(cfg.per_prompt)]
    most = max(sample.width(dataclasses.replace(sample.Config(), **p[2])) for p in points)
    pool = initial_noise(base.dit, len(prompts) * most, torch.Generator().manual_seed(cfg.seed))
    pool = pool.view(len(prompts), most, *pool.shape[1:]).to(device)    # image i's j-th particle: pool[i, j]
    cost = drm_cost(base.dit, drm, pool[:, 0], base.encode(prompts)[0])
    one = slice(cfg.per_prompt)                                           # the first prompt's images
    measure(cfg, points[0], base, drm, drm_text, pool[one], prompts[one], cost, show=False)   # warm-up
    print(f"{cfg.prompt_set} prompts, {len(prompt_list)} x {cfg.per_prompt} images, {cfg.steps} steps, cfg "
          f"{cfg.cfg_scale}, SDE noise {cfg.noise_level}; a DRM pass costs {cost:.2f} DiT passes")
    header = ("| method | gold ± s.e. | digit | attributes | DRM | diversity | DiT passes / image | "
              "DRM passes / image | DiT-pass equivalents | ms / image |\n|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    rows = [measure(cfg, point, base, drm, drm_text, pool, prompts, cost) for point in points]
    table = "\n".join([header] + [f"| {r['label']} | {r['gold']:.4f} ± {r['gold_se']:.4f} | {r['digit_correct']:.1%} | "
                                  f"{r['attribute_match']:.1%} | {r['drm']:.3f} | {r['diversity']:.4f} | "
                                  f"{r['dit_passes']:.0f} | {r['drm_passes']:.0f} | {r['dit_equivalents']:.0f} | "
                                  f"{r['ms']:.1f} |" for r in rows])
    judged = verdict(rows, "ms") + "\n\n" + verdict(rows, "dit_equivalents")
    print(judged)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out + ".json", "w") as f:
        json.dump({"config": vars(cfg), "drm_cost": cost, "rows": rows}, f, indent=1)
    with open(cfg.out + ".md", "w") as f:
        f.write(f"A DRM pass costs {cost:.2f} DiT passes here.\n\n{table}\n\n{judged}\n")
    figure = plot(rows, cfg.out + ".png")
    print(f"wrote {cfg.out}.json, {cfg.out}.md" + (f", {cfg.out}.png" if figure else ""))
    return rows


if __name__ == "__main__":
    run_main(main, Config)
