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
