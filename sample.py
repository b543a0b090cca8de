"""Sampling from the DiT: Euler on SD3's grid with classifier-free guidance, the DRM's step-wise
search.

    python sample.py --prompt="a thick 7 slanted right"          # writes samples.png
    python sample.py --prompt="a thick 7 slanted right" --search=stepwise --k=6   # the paper's
    python sample.py --prompt="a thick 7 slanted right" --search=smc --particles=4  # FK steering
    python sample.py --eval                                       # the annotator's held-out scores
    python -m bench.search                                        # every search at equal compute
    # the public SD3.5 weights (a diffusers folder):
    python sample.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --prompt="a red fox in snow" --steps=28 --cfg_scale=4.5 --shift=3 --images=4

Rectified flow integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data); one Euler step is
x_next = x + (sigma_next - sigma) v (SD3, Esser et al. 2024). Guidance: v = v_uncond + w (v_cond -
v_uncond) (Ho & Salimans 2022). Step-wise sampling (DRM paper, sec. 4.3): replace each Euler
step by sde.py's SDE step, draw k successors from its one mean (one policy pass), score them all
with the DRM at sigma_next (one batched pass) and keep the best `beam`. It needs no training; it
trades compute for quality, so it is measured (bench/search.py) against best-of-N (N whole
samples, the DRM picks one) and the rival searches (rivals/search.py) at the same compute.
"""
import time
from dataclasses import dataclass

import torch

from base import ANNOTATED, ModelFlags, check_model_flags, load_base
from checkpoints import check_writable, save_grid
from common import (InputError, UserError, autocast, check_flags, flag, frozen_dtype, given_flags,
                    pick_device, print_config, run_main)
from evaluation import evaluate_heldout
from model import compile_regions
from rivals.reward import EnsembleFlags, with_ensemble
from rivals.scores import SCORES
from rivals.search import SearchFlags, check_search, prune, smc
from sde import (Sampler, favourite, initial_noise, passes, propose, score_noisy, sigma_schedule,
                 take)

# -----------------------------------------------------------------------------
# Search with the DRM: step-wise (the paper) and best-of-N, on sde.py's one step primitive


@torch.no_grad()
def stepwise_sample(policy, noise, cond, uncond=None, drm=None, drm_cond=None, *, steps=20, k=1,
                    beam=1, noise_level=0.7, cfg_scale=1.0, shift=1.0, score_every=1, ode_last=0,
                    score=score_noisy, generator=None):
    """Beam search over SDE successors, scored by the DRM -> (x0 (N, C, H, W), counts). noise
    (N, C, H, W) starts each image; cond / uncond (the policy's) and drm_cond (the DRM's) are
    (context, pooled) of batch N. Each of an image's `beam` states proposes k successors around one
    mean (sde.propose); at scored steps (every `score_every`-th, and the last) the DRM ranks the
    beam * k successors and the top `beam` survive; between them each state keeps one successor.
    score: what the DRM sees of a successor: sde.score_noisy (it at sigma_next, the paper), or a
    rival rule (rivals/scores.py: its clean estimate, its ODE completion; passes counted). The last
    `ode_last` steps are Euler steps. beam = 1: the paper's greedy rule.
    counts: {"nfe": DiT forward passes, "drm_calls": DRM forward passes}.
    """
    if k < 1 or beam < 1 or score_every < 1 or not 0 <= ode_last <= steps:
        raise InputError(f"k={k}, beam={beam}, score_every={score_every}, ode_last={ode_last}: "
                         "need k, beam, score_every >= 1 and 0 <= ode_last <= steps")
    searching = k * beam > 1
    if searching and drm is None:
        raise InputError("k * beam > 1 needs a DRM to rank the successors")
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
# Command line


def stepwise(cfg, policy, noise, cond, uncond, *, drm, drm_cond, generator, **sampling):
    """The paper's search (ode, sde: the same loop without it)."""
    searching = cfg.search == "stepwise"
    return stepwise_sample(policy, noise, cond, uncond, drm, drm_cond, k=cfg.k if searching else 1,
                           beam=cfg.beam if searching else 1,
                           noise_level=0.0 if cfg.search == "ode" else cfg.noise_level,
                           score_every=cfg.score_every, ode_last=cfg.ode_last,
                           score=SCORES[cfg.score or "noisy"], generator=generator, **sampling)


def best_of(cfg, policy, noise, cond, uncond, *, drm, drm_cond, generator, **sampling):
    """Best-of-N of ODE samples (the generator is unused: nothing is drawn after the noise)."""
    return best_of_n(policy, noise, cond, uncond, drm, drm_cond, n=cfg.particles,
                     generator=generator, **sampling)


# every search: name -> (run(cfg, policy, noise, cond, uncond, ...), whole trajectories an image)
SEARCHES = {"ode": (stepwise, 1), "sde": (stepwise, 1), "stepwise": (stepwise, 1),
            "best_of": (best_of, "particles"), "smc": (smc, "particles"),
            "prune": (prune, "particles")}


# the searches each search flag is used by (given to another, it is refused)
USED_BY = {"k": ("stepwise",), "beam": ("stepwise",), "score_every": ("stepwise",),
           "ode_last": ("stepwise",), "score": ("stepwise", "smc"),
           "particles": ("best_of", "smc", "prune"), "noise_level": ("sde", "stepwise", "smc"),
           "potential": ("smc",), "lmbda": ("smc",), "resample": ("smc",), "adaptive": ("smc",),
           "ess_threshold": ("smc",), "prune_at": ("prune",), "keep": ("prune",)}


@dataclass
class Config(ModelFlags, SearchFlags, EnsembleFlags):  # the base model (base.py), rivals' flags
    prompt: str = "a thick 7 slanted right"  # what to draw (the toy: data/world.py's words)
    images: int = flag(16, "[1, inf)")  # images of the prompt
    steps: int = flag(20, "[1, inf)")  # Euler steps
    cfg_scale: float = flag(4.0, "[0, inf)")  # classifier-free guidance weight
    # SD3's schedule shift (3 at 1024 px; 1 suits 32x32 pixels)
    shift: float = flag(1.0, "(0, inf)")
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    out: str = "samples.png"           # image grid (with --eval: a JSON of the scores beside it)
    eval: bool = False                 # score the held-out prompts with the simulated annotator
    per_prompt: int = flag(20, "[1, inf)")  # with --eval: images per held-out prompt
    search: str = flag("ode", choices=SEARCHES)  # how the DRM picks
    drm: str = "data/drm.safetensors"  # the reward model that ranks (every search but ode)
    k: int = flag(4, "[1, inf)")       # stepwise: SDE successors per step
    beam: int = flag(1, "[1, inf)")    # stepwise: states kept per image (1: the paper's greedy)
    particles: int = flag(4, "[1, inf)")  # best_of, smc, prune: trajectories per image
    noise_level: float = flag(0.7, "[0, inf)")  # sde, stepwise, smc: SDE noise (sde.py's a)
    # what the DRM scores (rivals/scores.py): noisy (the state where it is) | x0 (its clean
    # estimate) | lookahead (its ODE completion); "" = the method's own: stepwise noisy, smc x0
    score: str = flag("", choices=("", *SCORES))
    score_every: int = flag(1, "[1, inf)")  # stepwise: rank every this many steps
    ode_last: int = flag(0, "[0, inf)")  # stepwise: plain Euler for the last this many steps
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)
    device: str = "auto"
    RENAMED = {"n": "images"}          # flags of earlier versions


def width(cfg):
    """Initial noises an image: the particles of best_of, smc and prune; 1 otherwise."""
    per_image = SEARCHES[cfg.search][1]
    return getattr(cfg, per_image) if isinstance(per_image, str) else per_image


def search(cfg, policy, noise, cond, uncond, *, drm, drm_cond, generator, **sampling):
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
    latents, counts = search(cfg, base.dit, noise, cond, uncond, drm=drm, drm_cond=drm_cond,
                             generator=torch.Generator().manual_seed(cfg.seed + 1), **sampling)
    images = base.to_images(latents).cpu()
    n = cfg.images
    save_grid(images, cfg.out, nrow=min(n, 8))
    print(f"wrote {cfg.out}: {n} images of {cfg.prompt!r}, {cfg.search}, {cfg.steps} steps, per "
          f"image {counts['nfe'] / n:.0f} DiT passes, {counts['drm_calls'] / n:.0f} DRM passes, "
          f"{(time.time() - t0) / n:.3f} s")
    return images


def main(cfg):
    check_flags(cfg)
    check_search(cfg)
    check_model_flags(cfg)
    ignored = [f"--{name}" for name, searches in USED_BY.items()
               if name in given_flags(cfg) and cfg.search not in searches]
    if cfg.score == "lookahead" and cfg.search != "stepwise":
        ignored.append("--score=lookahead")
    if ignored:
        raise UserError(f"--search={cfg.search} does not use {', '.join(ignored)}: drop it, or "
                        "choose a search that does (sample.USED_BY)")
    check_writable(cfg.out, "--out=", image=True)
    if cfg.eval and cfg.search != "ode":
        raise UserError("--eval scores the ODE sampler; the searches against each other: python -m "
                        "bench.search")
    if cfg.eval and cfg.model not in ANNOTATED:
        raise UserError("--eval scores with the toy's simulated annotator; with "
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
