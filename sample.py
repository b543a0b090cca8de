"""Sampling from the DiT: Euler on SD3's schedule with classifier-free guidance, DRM-guided search.

    python sample.py --prompt="a thick 7 slanted right"          # writes samples.png
    python sample.py --prompt="a thick 7 slanted right" --k=6    # step-wise: the DRM picks a step
    python sample.py --eval                                       # the annotator's held-out scores
    python -m bench.search --k=1,2,4,6                            # step-wise against best-of-N
    python sample.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --prompt="a red fox in snow" --steps=28 --cfg_scale=4.5 --shift=3 --n=4   # public weights

Rectified flow integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data); one Euler step is
x_next = x + (sigma_next - sigma) v (SD3, Esser et al. 2024). Guidance: v = v_uncond + w (v_cond -
v_uncond) (Ho & Salimans 2022). Step-wise sampling (DRM paper, sec. 4.3): replace each Euler
step by grpo.py's SDE step, draw k successors from its one mean (one policy pass), score them all
with the DRM at sigma_next (one batched pass) and keep the best `beam`. It needs no training; it
trades compute for quality, so it is measured against best-of-N (N whole samples, the DRM picks
one) at the same wall time.
"""
import json
import os
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from base import ANNOTATED, ModelFlags, check_model_flags, load_base
from common import (UserError, autocast, check_at_least, check_numbers, pick_device, print_config,
                    run_main, save_grid)
from grpo import propose
from model import compile_regions, guided_velocity

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
                    generator=None):
    """Beam search over SDE successors, scored by the DRM -> (x0 (N, C, H, W), counts). noise
    (N, C, H, W) starts each image; cond / uncond (the policy's) and drm_cond (the DRM's) are
    (context, pooled) of batch N. Each of an image's `beam` states proposes k successors around one
    mean (grpo.propose); at scored steps (every `score_every`-th, and the last) the DRM ranks the
    beam * k successors at sigma_next and the top `beam` survive; between them each state keeps
    one successor. The last `ode_last` steps are Euler steps. beam = 1: the paper's greedy rule.
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
    x, passes = noise.float()[rows], 2 if uncond is not None and cfg_scale != 1 else 1
    counts, beam_scores = {"nfe": 0, "drm_calls": 0}, None
    for i in range(steps):
        euler = i >= steps - ode_last
        scored = searching and not euler and ((i + 1) % score_every == 0 or i == steps - 1)
        step = propose(policy, x, sigmas[i], sigmas[i + 1], tuple(t[rows] for t in cond),
                       uncond and tuple(t[rows] for t in uncond), cfg_scale=cfg_scale,
                       noise_level=0 if euler else noise_level, k=k if scored else 1,
                       generator=generator)
        counts["nfe"] += x.shape[0] * passes
        successors = step.candidates.flatten(0, 1)                      # (N * beam * width, ...)
        if not scored:
            x, beam_scores = successors, None
            continue
        owners = rows.repeat_interleave(k)
        sigma = sigmas[i + 1].expand(len(successors))
        scores = drm(successors, sigma, drm_cond[0][owners], drm_cond[1][owners]).float()
        counts["drm_calls"] += len(successors)
        # BEGIN SOLUTION ex5_beam_search: per image, the top `beam` of its successors become x
        beam_scores, best = scores.view(N, beam * k).topk(beam, dim=1)    # over all of an image's
        image = torch.arange(N, device=x.device).unsqueeze(1)
        x = successors.view(N, beam * k, *x.shape[1:])[image, best].flatten(0, 1)
        # END SOLUTION
    if beam == 1:
        return x, counts
    if beam_scores is None:  # the last steps were not scored: rank the finished beams at sigma 0
        zeros = torch.zeros(len(x), device=x.device)
        beam_scores = drm(x, zeros, drm_cond[0][rows], drm_cond[1][rows]).float().view(N, beam)
        counts["drm_calls"] += len(x)
    best = beam_scores.argmax(1)
    return x.view(N, beam, *x.shape[1:])[torch.arange(N, device=x.device), best], counts


@torch.no_grad()
def best_of_n(policy, noise, cond, uncond=None, drm=None, drm_cond=None, *, n=4, steps=20,
              noise_level=0.0, cfg_scale=1.0, shift=1.0, generator=None):
    """n whole samples per image (noise (N * n, ...), an image's adjacent), the DRM's favourite at
    sigma 0 -> (x0, counts). noise_level 0: ODE samples (sample_ode); > 0: SDE samples."""
    per_sample = lambda t: tuple(v.repeat_interleave(n, 0) for v in t)  # noqa: E731
    both = (per_sample(cond), uncond and per_sample(uncond))
    if noise_level:
        samples, counts = stepwise_sample(policy, noise, *both, steps=steps, cfg_scale=cfg_scale,
                                          noise_level=noise_level, shift=shift, generator=generator)
    else:
        samples = sample_ode(policy, noise.float(), *both, steps, cfg_scale, shift)
        passes = 2 if uncond is not None and cfg_scale != 1 else 1
        counts = {"nfe": len(noise) * steps * passes, "drm_calls": 0}
    if n == 1:
        return samples, counts
    zeros = torch.zeros(len(samples), device=samples.device)
    scores = drm(samples, zeros, *per_sample(drm_cond)).float()
    counts["drm_calls"] += len(samples)
    N = len(samples) // n
    best = scores.view(N, n).argmax(1)
    return samples.view(N, n, *samples.shape[1:])[torch.arange(N), best], counts

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
    k: int = 0                         # step-wise sampling: SDE successors per step (0: the ODE)
    beam: int = 1                      # states kept per image (1: the paper's greedy rule)
    drm: str = "data/drm.safetensors"  # the reward model that ranks successors
    noise_level: float = 0.7           # SDE noise of the successors (grpo.py's a)
    score_every: int = 1               # rank successors every this many steps
    ode_last: int = 0                  # plain Euler for the last this many steps
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)
    device: str = "auto"


def draw(cfg, base, device, **sampling):
    """--prompt: cfg.n images of one prompt, by the ODE or (--k) step-wise sampling -> a grid."""
    t0 = time.time()
    prompts = [cfg.prompt] * cfg.n
    cond, uncond = base.encode(prompts)  # the toy: unknown words fail here, before any sampling
    seed = torch.Generator().manual_seed(cfg.seed)
    noise = initial_noise(base.dit, cfg.n, seed, base.latent_size).to(device)
    if cfg.k:
        drm, drm_text, _ = base.load_drm(cfg.drm, device)
        if cfg.compile:
            compile_regions(drm.backbone)
        latents, counts = stepwise_sample(
            base.dit, noise, cond, uncond, drm, drm_text.encode(prompts), k=cfg.k, beam=cfg.beam,
            noise_level=cfg.noise_level, score_every=cfg.score_every, ode_last=cfg.ode_last,
            generator=torch.Generator().manual_seed(cfg.seed + 1), **sampling)
    else:
        latents, counts = best_of_n(base.dit, noise, cond, uncond, n=1, **sampling)
    images = base.to_images(latents).cpu()
    save_grid(images, cfg.out, nrow=min(cfg.n, 8))
    print(f"wrote {cfg.out}: {cfg.n} images of {cfg.prompt!r}, {cfg.steps} steps, per image "
          f"{counts['nfe'] / cfg.n:.0f} DiT passes, {counts['drm_calls'] / cfg.n:.0f} DRM passes, "
          f"{(time.time() - t0) / cfg.n:.3f} s")
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
    check_at_least(cfg, 1, "steps", "n", "per_prompt", "beam", "score_every")
    check_at_least(cfg, 0, "k", "noise_level", "ode_last")
    if not cfg.shift > 0:
        raise UserError(f"--shift={cfg.shift}: SD3's schedule shift is positive "
                        "(1: none; SD3 at 1024 px: 3)")
    extension = os.path.splitext(cfg.out)[1].lower()
    if os.path.isdir(cfg.out) or extension not in Image.registered_extensions():
        raise UserError(f"--out={cfg.out}: give an image file name, e.g. samples.png")
    if cfg.eval and cfg.k:
        raise UserError("--eval scores the ODE sampler; step-wise sampling against best-of-N: "
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
