"""Step-wise sampling against best-of-N on the CPU toy: the annotator's gold, the DRM, compute per image.

    python -m bench.search --k=1,2,4,6 --best_of=2,3 --per_prompt=20   # greedy step-wise (beam 1) rows, then best-of-N
    python -m bench.search --k=4 --beam=2 --per_prompt=8               # a beam of 2

The ten held-out prompts x per_prompt seeds, every method from the same initial noise: the plain ODE sampler,
sample.stepwise_sample at each k (the DRM ranks k SDE successors of each kept state at every step), and
sample.best_of_n (N whole ODE samples, the DRM's favourite), with N matched to each step-wise row's time unless
--best_of names them. Each row: gold (the annotator's, which no model sees), digit and attribute accuracy, the
DRM's own score, diversity, DiT and DRM passes per image, milliseconds per image. A JSON of the rows is written.
"""
import json
import os
import time
from dataclasses import dataclass

import torch

from base import ToyBase
from common import UserError, check_numbers, pick_device, print_config, run_main
from model import compile_regions
from sample import best_of_n, diversity, initial_noise, stepwise_sample


@dataclass
class Config:
    base: str = "data/base.safetensors"
    drm: str = "data/drm.safetensors"
    k: str = "1,2,4,6"                 # step-wise rows: successors per step
    beam: int = 1                      # states kept per image (1: the paper's greedy rule)
    best_of: str = ""                  # best-of-N rows for these N (default: N matched to each step-wise row's time)
    per_prompt: int = 20               # seeds per held-out prompt
    steps: int = 20
    cfg_scale: float = 4.0
    shift: float = 1.0
    noise_level: float = 0.7           # SDE noise of the successors
    score_every: int = 1
    ode_last: int = 0
    seed: int = 0
    out: str = "out/search.json"
    compile: bool = False
    device: str = "auto"


def parse_ks(text, flag):
    try:
        ks = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{flag}={text}: expected whole numbers separated by commas, e.g. --{flag}=1,2,4,6") from None
    if min(ks) < 1:
        raise UserError(f"--{flag}={text}: every value must be at least 1")
    return ks


def main(cfg):
    check_numbers(cfg)
    ks = parse_ks(cfg.k, "k")
    print_config(cfg)
    device = pick_device(cfg.device)
    base = ToyBase.load(cfg.base, device)
    drm, drm_text, _ = base.load_drm(cfg.drm, device)
    if cfg.compile:
        compile_regions(base.dit)
        compile_regions(drm.backbone)
    dit = base.dit
    prompts = [p for p in base.heldout_prompts("", []) for _ in range(cfg.per_prompt)]
    cond, uncond = base.encode(prompts)
    drm_cond = drm_text.encode(prompts)
    noise = initial_noise(dit, len(prompts), torch.Generator().manual_seed(cfg.seed)).to(device)
    common = dict(steps=cfg.steps, cfg_scale=cfg.cfg_scale, shift=cfg.shift)

    def measure(name, run):
        t0 = time.time()
        images, counts = run(torch.Generator().manual_seed(cfg.seed + 1))
        seconds = time.time() - t0
        images = images.clamp(-1, 1)
        scores = base.judge(images, prompts)
        with torch.no_grad():
            drm_score = drm(images, torch.zeros(len(images), device=device), *drm_cond).mean().item()
        row = {"method": name, "gold": scores["gold"].mean().item(), "digit_correct": scores["digit_correct"].mean().item(),
               "attribute_match": scores["attribute_match"].mean().item(), "drm": drm_score,
               "diversity": diversity(images.cpu(), cfg.per_prompt), "dit_passes": counts["nfe"] / len(prompts),
               "drm_passes": counts["drm_calls"] / len(prompts), "seconds": seconds / len(prompts)}
        print(f"| {name} | {row['gold']:.4f} | {row['digit_correct']:.1%} | {row['attribute_match']:.1%} | "
              f"{row['drm']:.3f} | {row['diversity']:.4f} | {row['dit_passes']:.0f} | {row['drm_passes']:.0f} | "
              f"{row['seconds'] * 1000:.1f} |", flush=True)
        return row

    two = lambda t: tuple(v[:2] for v in t)  # noqa: E731
    stepwise_sample(dit, noise[:2], two(cond), two(uncond), drm, two(drm_cond), k=2, **common)  # warm-up, untimed
    print(f"held-out prompts, {len(prompts) // cfg.per_prompt} x {cfg.per_prompt} images, {cfg.steps} steps, "
          f"cfg {cfg.cfg_scale}, SDE noise {cfg.noise_level}, beam {cfg.beam}")
    print("| method | gold | digit | attributes | DRM | diversity | DiT passes / image | DRM passes / image | ms / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [measure("ODE", lambda _: best_of_n(dit, noise, cond, uncond, n=1, **common))]
    for k in ks:
        rows.append(measure(f"step-wise k={k} beam={cfg.beam}", lambda g, k=k: stepwise_sample(
            dit, noise, cond, uncond, drm, drm_cond, k=k, beam=cfg.beam, noise_level=cfg.noise_level,
            score_every=cfg.score_every, ode_last=cfg.ode_last, generator=g, **common)))
    if cfg.best_of:
        ns = parse_ks(cfg.best_of, "best_of")
    else:  # N at the wall time of each searching row
        ns = sorted({max(2, round(row["seconds"] / rows[0]["seconds"])) for row in rows[1:] if row["drm_passes"]})
    for n in ns:
        many = initial_noise(dit, len(prompts) * n, torch.Generator().manual_seed(cfg.seed + 2)).to(device)
        rows.append(measure(f"best-of-{n} ODE", lambda g, n=n, many=many: best_of_n(
            dit, many, cond, uncond, drm, drm_cond, n=n, generator=g, **common)))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump({"config": vars(cfg), "rows": rows}, f, indent=1)
    print(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    run_main(main, Config)
