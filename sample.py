"""Sampling from the DiT: ODE Euler with classifier-free guidance on SD3's shifted schedule, and DRM-guided search.

    python sample.py --prompt="a thick 7 slanted right"          # writes samples.png
    python sample.py --prompt="a thick 7 slanted right" --k=6    # step-wise sampling: the DRM picks at every step
    python sample.py --eval                                       # judge's scores on the held-out prompts
    python sample.py --eval --k=1,2,4,6                           # step-wise against best-of-N at equal time

Rectified flow integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data);
one Euler step is x_next = x + (sigma_next - sigma) * v (SD3, Esser et al. 2024).
Guidance: v = v_uncond + w (v_cond - v_uncond) (Ho & Salimans 2022).

Step-wise sampling (DRM paper, sec. 4.3): replace each Euler step by the SDE
step of grpo.py, draw k successors from its one mean (one policy pass), score
all of them with the DRM at sigma_next (one batched pass) and keep the best
`beam`. It needs no training; it trades compute for quality, so it is measured
against best-of-N (N whole samples, the DRM picks one) at the same wall time.
"""
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from common import load_base, pick_device, print_config, run_main
from data.world import HELDOUT_PROMPTS, tokenize
from grpo import sde_mean_std
from model import guided_velocity

# -----------------------------------------------------------------------------
# The schedule and the sampler: pure functions of tensors and a model callable


def sigma_schedule(steps, shift=1.0):
    """linspace(1, 0, steps + 1) bent by SD3's shift s * sigma / (1 + (s - 1) * sigma). s > 1 spends more steps at high noise."""
    sigmas = torch.linspace(1, 0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@torch.no_grad()
def sample_ode(model, noise, cond, uncond=None, steps=20, cfg_scale=1.0, shift=1.0, progress=False):
    """Euler from sigma = 1 to 0. noise (B, C, H, W); cond/uncond (context, pooled) of batch B. -> x0 (B, C, H, W)."""
    sigmas = sigma_schedule(steps, shift).to(noise.device)
    x = noise
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        velocity = guided_velocity(model, x, sigmas[i], cond, uncond, cfg_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return x


@torch.no_grad()
def encode_prompts(text_encoder, prompts):
    """prompts -> (context, pooled) for them, and for the empty prompt at the same batch size."""
    device = next(text_encoder.parameters()).device
    cond = text_encoder(tokenize(prompts).to(device))
    uncond = text_encoder(tokenize([""] * len(prompts)).to(device))
    return cond, uncond


def generate(dit, text_encoder, prompts, seed=0, steps=20, cfg_scale=4.0, shift=1.0, batch_size=100):
    """Images (N, C, H, W) in [-1, 1] for a list of prompts, noise fixed by seed (one stream per call)."""
    device = next(dit.parameters()).device
    size = dit.config.pos_embed_max_size * dit.config.patch_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), dit.config.in_channels, size, size, generator=g)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond, uncond = encode_prompts(text_encoder, prompts[i:i + batch_size])
        out.append(sample_ode(dit, noise[i:i + batch_size].to(device), cond, uncond, steps, cfg_scale, shift).clamp(-1, 1))
    return torch.cat(out).cpu()


@torch.no_grad()
def stepwise_sample(policy, noise, cond, uncond=None, drm=None, drm_cond=None, steps=20, k=1, beam=1, noise_level=0.7,
                    cfg_scale=1.0, shift=1.0, score_every=1, ode_last=0, generator=None):
    """Beam search over SDE successors, scored by the DRM. -> (x0 (N, C, H, W), counts).

    noise (N, C, H, W) starts each image; cond/uncond (the policy's) and drm_cond (the DRM's) are
    (context, pooled) of batch N. Each of an image's `beam` states proposes k successors sharing one mean;
    at scored steps (every `score_every`-th, and the last) the DRM ranks the beam * k successors at sigma_next and
    the top `beam` survive; between them each state keeps one successor. The last `ode_last` steps are Euler
    steps. beam = 1 is the paper's greedy rule; k = beam = 1 with noise_level = 0 is the plain ODE sampler.
    counts: {"nfe": DiT forward passes, "drm_calls": DRM forward passes}, totals over the batch.
    """
    if k < 1 or beam < 1 or score_every < 1 or not 0 <= ode_last <= steps:
        raise ValueError(f"k={k}, beam={beam}, score_every={score_every}, ode_last={ode_last}: "
                         "need k, beam, score_every >= 1 and 0 <= ode_last <= steps")
    searching = k * beam > 1
    if searching and drm is None:
        raise ValueError("k * beam > 1 needs a DRM to rank the successors")
    N = noise.shape[0]
    sigmas = sigma_schedule(steps, shift).to(noise.device)
    rows = torch.arange(N, device=noise.device).repeat_interleave(beam)        # the image of each beam state
    x = noise.float()[rows]
    counts = {"nfe": 0, "drm_calls": 0}
    passes = 2 if uncond is not None and cfg_scale != 1 else 1
    beam_scores = None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity = guided_velocity(policy, x, sigma, tuple(t[rows] for t in cond),
                                   tuple(t[rows] for t in uncond) if uncond is not None else None, cfg_scale).float()
        counts["nfe"] += x.shape[0] * passes
        if i >= steps - ode_last:
            x, beam_scores = x + (sigma_next - sigma) * velocity, None
            continue
        mean, std = sde_mean_std(x, velocity, sigma, sigma_next, noise_level)
        scored = searching and ((i + 1) % score_every == 0 or i == steps - 1)
        width = k if scored else 1
        z = torch.randn((x.shape[0], width) + x.shape[1:], generator=generator).to(x.device)
        successors = (mean.unsqueeze(1) + std.unsqueeze(1) * z).flatten(0, 1)     # (N * beam * width, ...)
        if not scored:
            x, beam_scores = successors, None
            continue
        owners = rows.repeat_interleave(k)
        scores = drm(successors, sigma_next.expand(len(successors)), drm_cond[0][owners], drm_cond[1][owners]).float()
        counts["drm_calls"] += len(successors)
        beam_scores, best = scores.view(N, beam * k).topk(beam, dim=1)               # per image, over all its successors
        x = successors.view(N, beam * k, *x.shape[1:])[torch.arange(N, device=x.device).unsqueeze(1), best].flatten(0, 1)
    if beam == 1:
        return x, counts
    if beam_scores is None:  # the last steps were not scored: rank the finished beams at sigma 0
        beam_scores = drm(x, torch.zeros(len(x), device=x.device), drm_cond[0][rows], drm_cond[1][rows]).float().view(N, beam)
        counts["drm_calls"] += len(x)
    return x.view(N, beam, *x.shape[1:])[torch.arange(N, device=x.device), beam_scores.argmax(1)], counts


@torch.no_grad()
def best_of_n(policy, noise, cond, uncond=None, drm=None, drm_cond=None, n=4, steps=20, noise_level=0.0,
              cfg_scale=1.0, shift=1.0, generator=None):
    """N whole samples per image (noise (N * n, ...), an image's n adjacent), the DRM picks one at sigma 0.

    noise_level = 0: ODE samples; > 0: SDE samples. -> (x0 (N, ...), counts) as stepwise_sample.
    """
    per_sample = lambda t: tuple(v.repeat_interleave(n, 0) for v in t)  # noqa: E731
    samples, counts = stepwise_sample(policy, noise, per_sample(cond), per_sample(uncond) if uncond is not None else None,
                                      steps=steps, noise_level=noise_level, cfg_scale=cfg_scale, shift=shift,
                                      generator=generator)
    if n == 1:
        return samples, counts
    scores = drm(samples, torch.zeros(len(samples), device=samples.device), *per_sample(drm_cond)).float()
    counts["drm_calls"] += len(samples)
    N = len(samples) // n
    return samples.view(N, n, *samples.shape[1:])[torch.arange(N), scores.view(N, n).argmax(1)], counts


def save_grid(images, path, nrow):
    """images (N, 1, H, W) in [-1, 1] -> one PNG, nrow images a row, upscaled 2x for viewing."""
    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = torch.full((ncol * (h + 2), nrow * (w + 2)), -1.0)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = img[0]
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST).save(path)

# -----------------------------------------------------------------------------
# Evaluation on the held-out prompts with the simulated annotator


def evaluate(dit, text_encoder, judge, prompts=HELDOUT_PROMPTS, per_prompt=20, seed=1234, **sample_kwargs):
    """Sample per_prompt images of each prompt with fixed seeds; -> (dict of judge means, images, prompts)."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    images = generate(dit, text_encoder, repeated, seed=seed, **sample_kwargs)
    scores = judge.score(images, repeated)
    summary = {k: scores[k].mean().item() for k in ("gold", "digit_correct", "attribute_match", "fidelity", "perceptual")}
    summary["gold_std_over_prompts"] = scores["gold"].view(len(prompts), per_prompt).mean(1).std().item()
    return summary, images, repeated

# -----------------------------------------------------------------------------
# Command line


@dataclass
class Config:
    prompt: str = "a thick 7 slanted right"   # what to draw (words from data/world.py's vocabulary)
    ckpt: str = "data/base.safetensors"       # base model: DiT + text encoder
    n: int = 16                               # images of the prompt
    steps: int = 20                           # Euler steps
    cfg_scale: float = 4.0                    # classifier-free guidance weight
    shift: float = 1.0                        # SD3 schedule shift (3.0 at 1024px; 1 suits 32x32 pixels)
    seed: int = 0
    out: str = "samples.png"                  # image grid (with --eval: a JSON of the scores beside it)
    eval: bool = False                        # score the held-out prompts with the simulated annotator
    per_prompt: int = 20                      # with --eval: images per held-out prompt
    device: str = "auto"


def main(cfg):
    if cfg.steps < 1 or cfg.n < 1 or cfg.per_prompt < 1:
        raise ValueError("--steps, --n and --per_prompt must be at least 1")
    print_config(cfg)
    device = pick_device(cfg.device)
    dit, text_encoder, meta = load_base(cfg.ckpt, device)
    kwargs = dict(steps=cfg.steps, cfg_scale=cfg.cfg_scale, shift=cfg.shift)
    if not cfg.eval:
        tokenize([cfg.prompt])  # fail on unknown words before any work
        t0 = time.time()
        images = generate(dit, text_encoder, [cfg.prompt] * cfg.n, seed=cfg.seed, **kwargs)
        save_grid(images, cfg.out, nrow=min(cfg.n, 8))
        print(f"wrote {cfg.out}: {cfg.n} images of {cfg.prompt!r}, {cfg.steps} steps, NFE "
              f"{cfg.steps * (2 if cfg.cfg_scale != 1 else 1)} per image, {(time.time() - t0) / cfg.n:.3f} s per image")
        return images
    from data.judge import Judge
    summary, images, _ = evaluate(dit, text_encoder, Judge(), per_prompt=cfg.per_prompt, seed=cfg.seed, **kwargs)
    print(f"held-out prompts ({len(HELDOUT_PROMPTS)} x {cfg.per_prompt} images, {cfg.steps} steps, cfg {cfg.cfg_scale}):")
    for key, value in summary.items():
        print(f"  {key:24s} {value:.4f}")
    shown = min(cfg.per_prompt, 8)  # a row of the first images of each prompt
    save_grid(images.view(len(HELDOUT_PROMPTS), cfg.per_prompt, *images.shape[1:])[:, :shown].flatten(0, 1), cfg.out, nrow=shown)
    with open(os.path.splitext(cfg.out)[0] + ".json", "w") as f:
        json.dump({"config": vars(cfg), "checkpoint_step": meta.get("step"), **summary}, f, indent=1)
    return summary


if __name__ == "__main__":
    run_main(main, Config)
