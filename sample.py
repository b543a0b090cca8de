"""Sampling from the DiT: Euler on SD3's grid with classifier-free guidance, the DRM's step-wise
search.

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
step by sde.py's SDE step, draw k successors from its one mean (one policy pass), score them all
with the DRM at sigma_next (one batched pass) and keep the best `beam`. It needs no training; it
trades compute for quality, so it is measured (bench/search.py) against best-of-N (N whole
samples, the DRM picks one) and the rival searches (rivals/search.py) at the same compute.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from base import ANNOTATED, ModelFlags, check_model_flags, load_base
from common import (UserError, autocast, check_at_least, check_choice, check_numbers, frozen_dtype,
                    pick_device, print_config, run_main)
from checkpoints import save_grid
from model import compile_regions, guided_velocity
from rivals.reward import EnsembleFlags, check_ensemble, with_ensemble
from rivals.scores import SCORES
from rivals.search import SearchFlags, check_flags, prune, smc
from sde import Sampler, favourite, passes, propose, score_noisy, sigma_schedule, take

# -----------------------------------------------------------------------------
# The schedule and the sampler: pure functions of tensors and a model callable


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
                    score=score_noisy, generator=None):
    """Beam search over SDE successors, scored by the DRM -> (x0 (N, C, H, W), counts). noise
    (N, C, H, W) starts each image; cond / uncond (the policy's) and drm_cond (the DRM's) are
    (context, pooled) of batch N. Each of an image's `beam` states proposes k successors around one
    mean (grpo.propose); at scored steps (every `score_every`-th, and the last) the DRM ranks the
    beam * k successors and the top `beam` survive; between them each state keeps one successor.
    score: what the DRM sees of a successor: sde.score_noisy (it at sigma_next, the paper), or a
    rival rule (rivals/scores.py: its clean estimate, its ODE completion; passes counted). The last
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
        scores, spent = score(reward, step, i, rows, Sampler(policy, sigmas, take(cond, rows),
                                                              take(uncond, rows), cfg_scale))
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
class Config(ModelFlags, SearchFlags, EnsembleFlags):  # the base model (base.py), rivals' flags
    prompt: str = "a thick 7 slanted right"  # what to draw (the toy: data/world.py's words)
    images: int = 16                   # images of the prompt
    steps: int = 20                    # Euler steps
    cfg_scale: float = 4.0             # classifier-free guidance weight
    shift: float = 1.0                 # SD3's schedule shift (3 at 1024 px; 1 suits 32x32 pixels)
    seed: int = 0
    out: str = "samples.png"           # image grid (with --eval: a JSON of the scores beside it)
    eval: bool = False                 # score the held-out prompts with the simulated annotator
    per_prompt: int = 20               # with --eval: images per held-out prompt
    search: str = "ode"                # how the DRM picks: SEARCHES
    drm: str = "data/drm.safetensors"  # the reward model that ranks (every search but ode)
    k: int = 4                         # stepwise: SDE successors per step
    beam: int = 1                      # stepwise: states kept per image (1: the paper's greedy)
    particles: int = 4                 # best_of, smc, prune: trajectories per image
    noise_level: float = 0.7           # sde, stepwise, smc: SDE noise (sde.py's a)
    # what the DRM scores (rivals/scores.py): noisy (the state where it is) | x0 (its clean
    # estimate) | lookahead (its ODE completion); "" = the method's own: stepwise noisy, smc x0
    score: str = ""
    score_every: int = 1               # stepwise: rank every this many steps
    ode_last: int = 0                  # stepwise: plain Euler for the last this many steps
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)
    device: str = "auto"
    RENAMED = {"n": "images"}          # flags of earlier versions


def stepwise(cfg, policy, noise, cond, uncond, *, drm, drm_cond, generator, **sampling):
    """The paper's search (ode, sde: the same loop without it)."""
    searching = cfg.search == "stepwise"
    return stepwise_sample(policy, noise, cond, uncond, drm, drm_cond, k=cfg.k if searching else 1,
                           beam=cfg.beam if searching else 1,
                           noise_level=0.0 if cfg.search == "ode" else cfg.noise_level,
                           score_every=cfg.score_every, ode_last=cfg.ode_last,
                           score=SCORES[cfg.score or "noisy"], generator=generator, **sampling)


def best_of(cfg, policy, noise, cond, uncond, *, drm, drm_cond, generator, **sampling):
    return best_of_n(policy, noise, cond, uncond, drm, drm_cond, n=cfg.particles, **sampling)


# every search: name -> (run(cfg, policy, noise, cond, uncond, ...), whole trajectories an image)
SEARCHES = {"ode": (stepwise, 1), "sde": (stepwise, 1), "stepwise": (stepwise, 1),
            "best_of": (best_of, "particles"), "smc": (smc, "particles"),
            "prune": (prune, "particles")}


def width(cfg):
    """Initial noises an image: the particles of best_of, smc and prune; 1 otherwise."""
    per_image = SEARCHES[cfg.search][1]
    return getattr(cfg, per_image) if isinstance(per_image, str) else per_image


def search(cfg, policy, noise, cond, uncond, drm, drm_cond, generator, **sampling):
    """cfg.search on noise (N * width(cfg), ...), an image's adjacent -> (x0 (N, ...), counts)."""
    run, _ = SEARCHES[cfg.search]
    return run(cfg, policy, noise, cond, uncond, drm=drm, drm_cond=drm_cond, generator=generator,
               **sampling)


def draw(cfg, base, device, **sampling):
    """--prompt: cfg.images images of one prompt by cfg.search -> a grid."""
    t0 = time.time()
    prompts = [cfg.prompt] * cfg.images
    base.prepare(prompts)                # SD3: embedded once; the text encoders leave the GPU
    cond, uncond = base.encode(prompts)  # the toy: unknown words fail here, before any sampling
    seed = torch.Generator().manual_seed(cfg.seed)
    noise = initial_noise(base.dit, cfg.images * width(cfg), seed, base.latent_size).to(device)
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
    n = cfg.images
    save_grid(images, cfg.out, nrow=min(n, 8))
    print(f"wrote {cfg.out}: {n} images of {cfg.prompt!r}, {cfg.search}, {cfg.steps} steps, "
          f"per image {counts['nfe'] / n:.0f} DiT passes, {counts['drm_calls'] / n:.0f} "
          f"DRM passes, {(time.time() - t0) / n:.3f} s")
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
        json.dump({"config": dataclasses.asdict(cfg), "checkpoint_step": base.meta.get("step"),
                   **summary}, f, indent=1)
    return summary


def main(cfg):
    check_numbers(cfg)
    check_model_flags(cfg)
    check_choice(cfg, "search", tuple(SEARCHES))
    check_choice(cfg, "score", ("", *SCORES) if cfg.search == "stepwise" else ("", "noisy", "x0"))
    check_at_least(cfg, 1, "steps", "images", "per_prompt", "k", "beam", "particles",
                   "score_every")
    check_at_least(cfg, 0, "noise_level", "ode_last")
    check_flags(cfg)
    check_ensemble(cfg)
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
