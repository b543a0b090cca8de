"""Sampling from the DiT: Euler on SD3's schedule with classifier-free guidance, DRM-guided search.

    python sample.py --prompt="a thick 7 slanted right"          # writes samples.png
    python sample.py --prompt="a thick 7 slanted right" --search=stepwise --k=6   # the paper's
    python sample.py --prompt="a thick 7 slanted right" --search=smc --particles=4  # FK steering
    python sample.py --eval                                       # the annotator's held-out scores
    python -m bench.search                                        # every search at equal compute
    python sample.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --prompt="a red fox in snow" --steps=28 --cfg_scale=4.5 --shift=3 --n=4   # public weights

Rectified flow integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data); one Euler step is
x_next = x + (sigma_next - sigma) v (SD3, Esser et al. 2024). Guidance: v = v_uncond + w (v_cond -
v_uncond) (Ho & Salimans 2022). Step-wise sampling (DRM paper, sec. 4.3): replace each Euler
step by grpo.py's SDE step, draw k successors from its one mean (one policy pass), score them all
with the DRM at sigma_next (one batched pass) and keep the best `beam`. It needs no training; it
trades compute for quality, so it is measured (bench/search.py) against its rivals at the same
compute: best-of-N (N whole samples, the DRM picks one), particle search (FK steering: N SDE
particles resampled by their DRM scores) and pruned best-of-N (N ODE trajectories, the DRM keeps
the best part of them at an intermediate sigma). All are made of grpo.propose's steps.
"""
import json
import os
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from base import ANNOTATED, ModelFlags, check_model_flags, load_base
from common import (UserError, autocast, check_at_least, check_choice, check_numbers, frozen_dtype,
                    parse_numbers, pick_device, print_config, run_main, save_grid)
from grpo import passes, propose, score_candidates, take
from model import compile_regions, guided_velocity
from reward import with_ensemble

# -----------------------------------------------------------------------------
# The schedule and the sampler: pure functions of tensors and a model callable


def bend(sigma, shift):
    """SD3's time shift s sigma / (1 + (s - 1) sigma): s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(steps, shift=1.0, dtype=torch.float32):
    """SD3's sampling grid (steps + 1,), from 1 down to 0, as diffusers' FlowMatchEulerDiscrete-
    Scheduler and Stability's sd3_impls.py make it: `steps` points evenly from 1 to bend(1/1000)
    (the least noise SD3 trained at), bent again, then a final 0. The low end is bent twice and
    the last step is short; that is SD3's grid (our samples are diffusers'). Made in float64."""
    sigmas = bend(torch.linspace(1, bend(1 / 1000, shift), steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


@torch.no_grad()
def sample_ode(model, noise, cond, uncond=None, steps=20, cfg_scale=1.0, shift=1.0, progress=False):
    """Euler from sigma 1 to 0: noise (B, C, H, W), cond, uncond (context, pooled) -> x0."""
    sigmas = sigma_schedule(steps, shift, noise.dtype).to(noise.device)
    x = noise
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        # BEGIN SOLUTION ex1_flow_matching: the guided velocity at sigmas[i], then one Euler step
        velocity = guided_velocity(model, x, sigmas[i], cond, uncond, cfg_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        # END SOLUTION
    return x


def initial_noise(dit, n, generator, size=None):
    """n draws of N(0, I) on the CPU, of side `size` (default: the DiT's full position grid)."""
    size = size or dit.config.pos_embed_max_size * dit.config.patch_size
    return torch.randn(n, dit.config.in_channels, size, size, generator=generator)


def generate(dit, base, prompts, seed=0, steps=20, cfg_scale=4.0, shift=1.0, batch_size=100):
    """ODE samples (N, C, H, W) on the CPU for the prompts, noise fixed by seed, base.finish-ed."""
    device = next(dit.parameters()).device
    noise = initial_noise(dit, len(prompts), torch.Generator().manual_seed(seed), base.latent_size)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond, uncond = base.encode(prompts[i:i + batch_size])
        x = noise[i:i + batch_size].to(device)
        out.append(base.finish(sample_ode(dit, x, cond, uncond, steps, cfg_scale, shift)))
    return torch.cat(out).cpu()

# -----------------------------------------------------------------------------
# Search with the DRM: step-wise (the paper) and best-of-N, on grpo.py's one step primitive


@torch.no_grad()
def stepwise_sample(policy, noise, cond, uncond=None, drm=None, drm_cond=None, *, steps=20, k=1,
                    beam=1, noise_level=0.7, cfg_scale=1.0, shift=1.0, score_every=1, ode_last=0,
                    score="noisy", generator=None):
    """Beam search over SDE successors, scored by the DRM -> (x0 (N, C, H, W), counts). noise
    (N, C, H, W) starts each image; cond / uncond (the policy's) and drm_cond (the DRM's) are
    (context, pooled) of batch N. Each of an image's `beam` states proposes k successors around one
    mean (grpo.propose); at scored steps (every `score_every`-th, and the last) the DRM ranks the
    beam * k successors and the top `beam` survive; between them each state keeps one successor.
    score: what the DRM sees of a successor (grpo.score_candidates): noisy (it at sigma_next, the
    paper), x0 (its clean estimate), lookahead (its ODE completion; those passes counted). The last
    `ode_last` steps are Euler steps. beam = 1: the paper's greedy rule.
    counts: {"nfe": DiT forward passes, "drm_calls": DRM forward passes}.
    """
    if k < 1 or beam < 1 or score_every < 1 or not 0 <= ode_last <= steps:
        raise ValueError(f"k={k}, beam={beam}, score_every={score_every}, ode_last={ode_last}: "
                         "need k, beam, score_every >= 1 and 0 <= ode_last <= steps")
    searching = k * beam > 1
    if searching and drm is None:
        raise ValueError("k * beam > 1 needs a DRM to rank the successors")
    N, sigmas = noise.shape[0], sigma_schedule(steps, shift).to(noise.device)
    rows = torch.arange(N, device=noise.device).repeat_interleave(beam)   # each beam state's image
    x = noise.float()[rows]
    counts, beam_scores = {"nfe": 0, "drm_calls": 0}, None
    for i in range(steps):
        euler = i >= steps - ode_last
        scored = searching and not euler and ((i + 1) % score_every == 0 or i == steps - 1)
        step = propose(policy, x, sigmas[i], sigmas[i + 1], take(cond, rows), take(uncond, rows),
                       cfg_scale=cfg_scale, noise_level=0 if euler else noise_level,
                       k=k if scored else 1, generator=generator)
        counts["nfe"] += x.shape[0] * passes(uncond, cfg_scale)
        successors = step.candidates.flatten(0, 1)                      # (N * beam * width, ...)
        if not scored:
            x, beam_scores = successors, None
            continue
        reward = lambda x, sigma, owners: drm(x, sigma, *take(drm_cond, owners))  # noqa: E731
        scores, spent = score_candidates(reward, step, sigmas, i, rows, score=score, policy=policy,
                                         cond=take(cond, rows), uncond=take(uncond, rows),
                                         cfg_scale=cfg_scale)
        scores = scores.flatten()
        counts["nfe"] += spent
        counts["drm_calls"] += len(successors)
        # BEGIN SOLUTION ex5_beam_search: per image, the top `beam` of its successors become x
        beam_scores, best = scores.view(N, beam * k).topk(beam, dim=1)    # over all of an image's
        image = torch.arange(N, device=x.device).unsqueeze(1)
        x = successors.view(N, beam * k, *x.shape[1:])[image, best].flatten(0, 1)
        # END SOLUTION
    # the best of the beam: by its last scores, or (the last steps unscored) by the DRM at sigma 0
    last = None if beam_scores is None else beam_scores.flatten()
    return favourite(drm, x, drm_cond, beam, counts, last), counts


def favourite(drm, x, drm_cond, n, counts, scores=None):
    """Each image's DRM favourite among its n samples x (N * n, ...), an image's adjacent, scored at
    sigma 0 unless scores (N * n,) are given -> (N, ...)."""
    if n == 1:
        return x
    if scores is None:
        owners = torch.arange(len(x) // n, device=x.device).repeat_interleave(n)
        zeros = torch.zeros(len(x), device=x.device)
        scores = drm(x, zeros, *take(drm_cond, owners)).float()
        counts["drm_calls"] += len(x)
    best = scores.view(-1, n).argmax(1)
    return x.view(-1, n, *x.shape[1:])[torch.arange(len(best), device=x.device), best]


@torch.no_grad()
def best_of_n(policy, noise, cond, uncond=None, drm=None, drm_cond=None, *, n=4, steps=20,
              noise_level=0.0, cfg_scale=1.0, shift=1.0, generator=None):
    """n whole samples per image (noise (N * n, ...), an image's adjacent), the DRM's favourite at
    sigma 0 -> (x0, counts). noise_level 0: ODE samples; > 0: SDE samples."""
    owners = torch.arange(len(noise) // n, device=noise.device).repeat_interleave(n)
    samples, counts = stepwise_sample(policy, noise, take(cond, owners), take(uncond, owners),
                                      steps=steps, noise_level=noise_level, cfg_scale=cfg_scale,
                                      shift=shift, generator=generator)
    return favourite(drm, samples, drm_cond, n, counts), counts


def resampling_steps(steps, every=1, start=1, end=6):
    """FK steering's schedule (fkd_class.py): steps start, start + every, ... up to end, and the
    last step. Its defaults for 100 steps (every 5, from 5 to 30) scaled to 20: every 1, 1 to 6."""
    return sorted(set(range(start, min(end, steps - 1) + 1, every)) | {steps - 1})


@torch.no_grad()
def smc_sample(policy, noise, cond, uncond=None, drm=None, drm_cond=None, *, particles=4, steps=20,
               noise_level=0.7, cfg_scale=1.0, shift=1.0, potential="diff", lmbda=10.0,
               score="x0", schedule=(1, 1, 6), adaptive=False, ess_threshold=0.5,
               generator=None):
    """Particle search (FK steering, Singhal et al. 2025, as its fkd_class.py runs it): `particles`
    SDE trajectories an image (noise (N * particles, ...), an image's adjacent). At the steps of
    resampling_steps(steps, *schedule) the DRM scores each particle, r: score="x0" the one-step
    x0-prediction of its state before the step, at sigma 0 (FK's, with a clean-image reward);
    "noisy" its state after the step at sigma_next. Potential "diff": weights
    exp(lmbda (r - r_prev)), r_prev the particle's (or its ancestor's) r at the previous such step, 0 at first; "max":
    exp(lmbda max(r, r_prev)), r_prev then the running max, and the last step's weights divided by
    the product of the potentials a particle was resampled with. Weights are not carried between
    steps. A scheduled step resamples multinomially (adaptive: only if the effective sample size
    1 / sum(w_norm^2) is below ess_threshold x particles); the last step always asks the ESS test.
    At the end, the DRM's favourite at sigma 0 -> (x0, counts with "resampled": image-steps)."""
    N, P = len(noise) // particles, particles
    owners = torch.arange(N, device=noise.device).repeat_interleave(P)
    x, sigmas = noise.float(), sigma_schedule(steps, shift).to(noise.device)
    previous = torch.zeros(N * P, device=x.device)       # FK's population_rs: reward_min_value 0
    product = torch.ones(N * P, device=x.device)         # the potentials each particle was drawn by
    counts = {"nfe": 0, "drm_calls": 0, "resampled": 0}
    scheduled = resampling_steps(steps, *schedule)
    for i in range(steps):
        step = propose(policy, x, sigmas[i], sigmas[i + 1], take(cond, owners),
                       take(uncond, owners), cfg_scale=cfg_scale, noise_level=noise_level,
                       generator=generator)
        x = step.candidates[:, 0]
        counts["nfe"] += len(x) * passes(uncond, cfg_scale)
        if i not in scheduled:
            continue
        scored, sigma = (step.x0_hat, sigmas.new_zeros(1)) if score == "x0" else (x, sigmas[i + 1])
        r = drm(scored, sigma.expand(len(x)), *take(drm_cond, owners)).float()
        counts["drm_calls"] += len(x)
        last = i == steps - 1
        if potential == "diff":
            potentials, w = r, torch.exp(lmbda * (r - previous))
        else:
            potentials = torch.maximum(r, previous)
            w = torch.exp(lmbda * (r if last else potentials)) / (product if last else 1)
        w = torch.nan_to_num(w.clamp(0, 1e10)).view(N, P)
        normalised = w / w.sum(1, keepdim=True)
        resample = torch.ones(N, dtype=torch.bool, device=x.device)
        if adaptive or last:
            resample = 1 / (normalised ** 2).sum(1) < ess_threshold * P             # (N,)
        keep = torch.arange(P).expand(N, P)
        picks = (torch.multinomial(normalised.cpu(), P, replacement=True, generator=generator)
                 if resample.any() else keep)
        parents = (torch.where(resample.cpu().unsqueeze(1), picks, keep)
                   + torch.arange(N).unsqueeze(1) * P).flatten().to(x.device)
        moved = resample.repeat_interleave(P)
        product = torch.where(moved, product[parents] * w.flatten()[parents], product)
        x, previous = x[parents], potentials[parents]
        counts["resampled"] += int(resample.sum())
    return favourite(drm, x, drm_cond, P, counts), counts


@torch.no_grad()
def prune_sample(policy, noise, cond, uncond=None, drm=None, drm_cond=None, *, particles=4,
                 steps=20, cfg_scale=1.0, shift=1.0, prune_at=(0.6,), keep=0.5):
    """Pruned best-of-N (as TTSnap, arXiv 2511.22242, with the DRM as its noise-aware judge):
    `particles` ODE trajectories an image (noise (N * particles, ...), an image's adjacent); at the
    first state whose sigma is at or below each value of prune_at, the DRM scores the survivors
    there and the best `keep` fraction of each image's (at least one) go on; the DRM's favourite
    at the end -> (x0, counts)."""
    N, alive = len(noise) // particles, particles
    x, sigmas = noise.float(), sigma_schedule(steps, shift).to(noise.device)
    counts, pending = {"nfe": 0, "drm_calls": 0}, sorted(prune_at, reverse=True)
    owners = torch.arange(N, device=x.device).repeat_interleave(alive)
    for i in range(steps):
        if pending and sigmas[i] <= pending[0]:
            pending.pop(0)
            scores = drm(x, sigmas[i].expand(len(x)), *take(drm_cond, owners)).float()
            counts["drm_calls"] += len(x)
            top = scores.view(N, alive).topk(max(1, round(alive * keep)), dim=1).indices
            x = x.view(N, alive, *x.shape[1:])[torch.arange(N).unsqueeze(1), top].flatten(0, 1)
            alive, owners = top.shape[1], owners.view(N, alive)[:, :top.shape[1]].flatten()
        x = propose(policy, x, sigmas[i], sigmas[i + 1], take(cond, owners), take(uncond, owners),
                    cfg_scale=cfg_scale, noise_level=0.0).candidates[:, 0]
        counts["nfe"] += len(x) * passes(uncond, cfg_scale)
    return favourite(drm, x, drm_cond, alive, counts), counts

# -----------------------------------------------------------------------------
# Evaluation on held-out prompts: the base's annotator (the toy's), diversity


@torch.no_grad()
def diversity(images, per_prompt):
    """Mean pairwise L2 distance (per pixel, RMS) between the samples of one prompt, averaged."""
    if per_prompt < 2:
        return 0.0
    groups = images.flatten(1).view(-1, per_prompt, images[0].numel())
    distances = torch.cdist(groups, groups) / images[0].numel() ** 0.5
    return (distances.sum((1, 2)) / (per_prompt * (per_prompt - 1))).mean().item()


def evaluate(dit, base, prompts, per_prompt=20, seed=1234, batch_size=100, **sampling):
    """per_prompt ODE samples of each prompt with fixed seeds -> (summary: the annotator's means
    where the base has one, and diversity; the samples; their images; the prompts repeated)."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    samples = generate(dit, base, repeated, seed=seed, batch_size=batch_size, **sampling)
    device = next(dit.parameters()).device
    images = torch.cat([base.to_images(s.to(device)).cpu() for s in samples.split(batch_size)])
    scores = base.judge(images, repeated)
    summary = {key: value.float().mean().item() for key, value in scores.items()}
    if "gold" in scores:
        by_prompt = scores["gold"].view(len(prompts), per_prompt).mean(1)
        summary["gold_std_over_prompts"] = by_prompt.std().item()
    summary["diversity"] = diversity(images, per_prompt)
    return summary, samples, images, repeated

# -----------------------------------------------------------------------------
# Command line


@dataclass
class Config(ModelFlags):              # --model, --base, --ckpt_dir, ...: the base model (base.py)
    prompt: str = "a thick 7 slanted right"  # what to draw (the toy: data/world.py's words)
    n: int = 16                        # images of the prompt
    steps: int = 20                    # Euler steps
    cfg_scale: float = 4.0             # classifier-free guidance weight
    shift: float = 1.0                 # SD3's schedule shift (3 at 1024 px; 1 suits 32x32 pixels)
    seed: int = 0
    out: str = "samples.png"           # image grid (with --eval: a JSON of the scores beside it)
    eval: bool = False                 # score the held-out prompts with the simulated annotator
    per_prompt: int = 20               # with --eval: images per held-out prompt
    search: str = "ode"                # ode | sde | stepwise | best_of | smc | prune (how it picks)
    drm: str = "data/drm.safetensors"  # the reward model that ranks (every search but ode)
    drm_draws: int = 1                 # its noise ensemble (reward.NoiseEnsemble): states below
    drm_sigma: float = 0.0             # drm_sigma re-noised to it drm_draws times, scores averaged
    k: int = 4                         # stepwise: SDE successors per step
    beam: int = 1                      # stepwise: states kept per image (1: the paper's greedy)
    particles: int = 4                 # best_of, smc, prune: trajectories per image
    noise_level: float = 0.7           # sde, stepwise, smc: SDE noise (grpo.py's a)
    # what the DRM scores: noisy (a state at its sigma) | x0 (its clean estimate) | lookahead
    # (stepwise: its ODE completion); "" = the method's own: stepwise noisy (the paper), smc x0 (FK)
    score: str = ""
    score_every: int = 1               # stepwise: rank every this many steps
    ode_last: int = 0                  # stepwise: plain Euler for the last this many steps
    potential: str = "diff"            # smc: diff (the gain since the last scored step) | max
    lmbda: float = 10.0                # smc: weights exp(lmbda x potential), FK steering's lambda
    resample: str = "1:1:6"            # smc: every:from:to, resampled at those steps and the last
                                       # (FK's every 5 from 5 to 30 of 100 steps, scaled to 20)
    adaptive: bool = False             # smc: resample a scheduled step only below the ESS threshold
    ess_threshold: float = 0.5         # smc: the effective sample size / particles resampled below
    prune_at: str = "0.6"              # prune: the sigmas at which the DRM keeps the best
    keep: float = 0.5                  # prune: the fraction kept at each
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)
    device: str = "auto"


SEARCHES = ("ode", "sde", "stepwise", "best_of", "smc", "prune")


def width(cfg):
    """Initial noises an image: the particles of best_of, smc and prune; 1 otherwise."""
    return cfg.particles if cfg.search in ("best_of", "smc", "prune") else 1


def search(cfg, policy, noise, cond, uncond, drm, drm_cond, generator, **sampling):
    """cfg.search on noise (N * width(cfg), ...), an image's adjacent -> (x0 (N, ...), counts)."""
    if cfg.search in ("ode", "sde", "stepwise"):
        stepwise = cfg.search == "stepwise"
        return stepwise_sample(policy, noise, cond, uncond, drm, drm_cond,
                               k=cfg.k if stepwise else 1, beam=cfg.beam if stepwise else 1,
                               noise_level=0.0 if cfg.search == "ode" else cfg.noise_level,
                               score_every=cfg.score_every, ode_last=cfg.ode_last,
                               score=cfg.score or "noisy", generator=generator, **sampling)
    if cfg.search == "best_of":
        return best_of_n(policy, noise, cond, uncond, drm, drm_cond, n=cfg.particles, **sampling)
    if cfg.search == "smc":
        return smc_sample(policy, noise, cond, uncond, drm, drm_cond, particles=cfg.particles,
                          noise_level=cfg.noise_level, potential=cfg.potential, lmbda=cfg.lmbda,
                          score=cfg.score or "x0", schedule=parse_numbers(cfg, "resample", sep=":"),
                          adaptive=cfg.adaptive, ess_threshold=cfg.ess_threshold,
                          generator=generator, **sampling)
    return prune_sample(policy, noise, cond, uncond, drm, drm_cond, particles=cfg.particles,
                        prune_at=parse_numbers(cfg, "prune_at", float), keep=cfg.keep, **sampling)


def draw(cfg, base, device, **sampling):
    """--prompt: cfg.n images of one prompt by cfg.search -> a grid."""
    t0 = time.time()
    prompts = [cfg.prompt] * cfg.n
    base.prepare(prompts)                # SD3: embedded once; the text encoders leave the GPU
    cond, uncond = base.encode(prompts)  # the toy: unknown words fail here, before any sampling
    seed = torch.Generator().manual_seed(cfg.seed)
    noise = initial_noise(base.dit, cfg.n * width(cfg), seed, base.latent_size).to(device)
    drm, drm_cond = None, None
    if cfg.search != "ode":
        drm, drm_text, _ = base.load_drm(cfg.drm, device)
        drm.to(frozen_dtype(device))     # bf16 on a GPU
        if cfg.compile:
            compile_regions(drm.backbone)
        drm, drm_cond = with_ensemble(drm, cfg.drm_draws, cfg.drm_sigma), drm_text.encode(prompts)
    latents, counts = search(cfg, base.dit, noise, cond, uncond, drm, drm_cond,
                             torch.Generator().manual_seed(cfg.seed + 1), **sampling)
    images = base.to_images(latents).cpu()
    save_grid(images, cfg.out, nrow=min(cfg.n, 8))
    print(f"wrote {cfg.out}: {cfg.n} images of {cfg.prompt!r}, {cfg.search}, {cfg.steps} steps, "
          f"per image {counts['nfe'] / cfg.n:.0f} DiT passes, {counts['drm_calls'] / cfg.n:.0f} "
          f"DRM scorings, {(time.time() - t0) / cfg.n:.3f} s")
    return images


def evaluate_heldout(cfg, base, **sampling):
    """--eval: ODE samples of the held-out prompts, scored by the annotator: printed, grid, JSON."""
    prompts = base.heldout_prompts("", [])
    summary, _, images, _ = evaluate(base.dit, base, prompts, cfg.per_prompt, cfg.seed, **sampling)
    print(f"held-out prompts ({len(prompts)} x {cfg.per_prompt} images, {cfg.steps} steps, "
          f"cfg {cfg.cfg_scale}):")
    for key, value in summary.items():
        print(f"  {key:24s} {value:.4f}")
    shown = min(cfg.per_prompt, 8)  # a row of the first images of each prompt
    grid = images.view(len(prompts), cfg.per_prompt, *images.shape[1:])[:, :shown]
    save_grid(grid.flatten(0, 1), cfg.out, nrow=shown)
    with open(os.path.splitext(cfg.out)[0] + ".json", "w") as f:
        json.dump({"config": vars(cfg), "checkpoint_step": base.meta.get("step"), **summary}, f,
                  indent=1)
    return summary


def main(cfg):
    check_numbers(cfg)
    check_model_flags(cfg)
    check_choice(cfg, "search", SEARCHES)
    check_choice(cfg, "potential", ("diff", "max"))
    check_choice(cfg, "score", ("", "noisy", "x0", "lookahead") if cfg.search == "stepwise"
                 else ("", "noisy", "x0"))
    schedule = parse_numbers(cfg, "resample", sep=":")
    if len(schedule) != 3 or schedule[0] < 1 or not 0 <= schedule[1] <= schedule[2]:
        raise UserError(f"--resample={cfg.resample}: give every:from:to, every >= 1 and "
                        "0 <= from <= to, e.g. 1:1:6")
    check_at_least(cfg, 1, "steps", "n", "per_prompt", "k", "beam", "particles", "score_every",
                   "drm_draws")
    check_at_least(cfg, 0, "noise_level", "ode_last")
    if not (0 < cfg.keep <= 1 and 0 < cfg.ess_threshold <= 1):
        raise UserError(f"--keep={cfg.keep}, --ess_threshold={cfg.ess_threshold}: each in (0, 1]")
    if not all(0 <= sigma <= 1 for sigma in parse_numbers(cfg, "prune_at", float)):
        raise UserError(f"--prune_at={cfg.prune_at}: sigmas in [0, 1], e.g. 0.6 or 0.8,0.5")
    if not 0 <= cfg.drm_sigma < 1:
        raise UserError(f"--drm_sigma={cfg.drm_sigma}: a sigma in [0, 1)")
    if not cfg.shift > 0:
        raise UserError(f"--shift={cfg.shift}: SD3's schedule shift is positive "
                        "(1: none; SD3 at 1024 px: 3)")
    extension = os.path.splitext(cfg.out)[1].lower()
    if os.path.isdir(cfg.out) or extension not in Image.registered_extensions():
        raise UserError(f"--out={cfg.out}: give an image file name, e.g. samples.png")
    if cfg.eval and cfg.search != "ode":
        raise UserError("--eval scores the ODE sampler; the searches against each other: "
                        "python -m bench.search")
    if cfg.eval and cfg.model not in ANNOTATED:
        raise UserError(f"--eval scores with the toy's simulated annotator; with "
                        f"--model={cfg.model} draw with --prompt")
    print_config(cfg)
    device = pick_device(cfg.device)
    base = load_base(cfg, device)
    if cfg.compile:
        compile_regions(base.dit)
    sampling = dict(steps=cfg.steps, cfg_scale=cfg.cfg_scale, shift=cfg.shift)
    with autocast(device):  # bf16 on a GPU
        if cfg.eval:
            return evaluate_heldout(cfg, base, **sampling)
        return draw(cfg, base, device, **sampling)


if __name__ == "__main__":
    run_main(main, Config)
