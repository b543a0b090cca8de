"""Sampling from the DiT: ODE Euler with classifier-free guidance on SD3's shifted schedule.

    python sample.py --prompt="a thick 7 slanted right"     # writes samples.png
    python sample.py --eval                                  # judge's scores on the held-out prompts

Rectified flow integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data);
one Euler step is x_next = x + (sigma_next - sigma) * v (SD3, Esser et al. 2024).
Guidance: v = v_uncond + w (v_cond - v_uncond) (Ho & Salimans 2022).
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

# -----------------------------------------------------------------------------
# The schedule and the sampler: pure functions of tensors and a model callable


def sigma_schedule(steps, shift=1.0):
    """linspace(1, 0, steps + 1) bent by SD3's shift s * sigma / (1 + (s - 1) * sigma). s > 1 spends more steps at high noise."""
    sigmas = torch.linspace(1, 0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def guided_velocity(model, x, sigma, cond, uncond, cfg_scale):
    """Classifier-free guidance with the conditional and unconditional passes in one batch.

    cond, uncond: (context, pooled) pairs. cfg_scale = 1 (or uncond None) skips the unconditional pass.
    """
    sigma = sigma.expand(x.shape[0])
    if uncond is None or cfg_scale == 1.0:
        return model(x, sigma, *cond)
    both = model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                 torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))
    v_cond, v_uncond = both.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


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
