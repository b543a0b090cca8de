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

import rivals.search
from base import ANNOTATED, ModelFlags, load_base
from checkpoints import check_writable
from common import (DeviceFlags, InputError, UserError, autocast, check_fits, check_flags, flag,
                    frozen_dtype, group, pick_device, print_config, run_main, used_with)
from evaluation import evaluate_heldout
from images import save_grid
from model import compile_regions
from sde import (Draws, Sampler, drm_on, favourite, initial_noise, latent_bytes, passes, propose,
                 score_noisy, sigma_schedule)

# -----------------------------------------------------------------------------
# Search with the DRM: step-wise (the paper) and best-of-N, on sde.py's one step primitive


@dataclass
class Search:
    """The step-wise search's widths: k SDE successors a state, `beam` states kept an image (1: the
    paper's greedy rule), ranked every `score_every`-th step (and the last), the last `ode_last`
    steps plain Euler steps."""
    k: int = 1
    beam: int = 1
    score_every: int = 1
    ode_last: int = 0


@torch.no_grad()
def stepwise_sample(sampler, noise, reward=None, *, search=None, noise_level=0.7, score=score_noisy,
                    generator=None):
    """Beam search over SDE successors, scored by the DRM -> (x0 (N, C, H, W), counts). noise
    (N, C, H, W) starts each image; the sampler (sde.Sampler) holds the policy, the grid and the
    images' prompts; reward(x (M, ...), sigma (M,), images (M,)) is the DRM on the images' prompts.
    Each of an image's `beam` states proposes k successors around one mean (sde.propose); at
    scored steps the DRM ranks the beam * k successors and the top `beam` survive; between them
    each state keeps one successor. score: what the DRM sees of a successor: sde.score_noisy (it
    at sigma_next, the paper), or a rival rule (rivals/scores.py: its clean estimate, its ODE
    completion; passes counted). counts: {"nfe": DiT forward passes, "drm_calls": DRM passes}.
    """
    search, steps = search or Search(), len(sampler.sigmas) - 1
    k, beam = search.k, search.beam
    if k < 1 or beam < 1 or search.score_every < 1 or not 0 <= search.ode_last <= steps:
        raise InputError(f"{search}: need k, beam, score_every >= 1 and 0 <= ode_last <= steps")
    searching = k * beam > 1
    if searching and reward is None:
        raise InputError("k * beam > 1 needs a DRM to rank the successors")
    N = noise.shape[0]
    rows = torch.arange(N, device=noise.device).repeat_interleave(beam)   # each beam state's image
    x, beams = noise.float()[rows], sampler.rows(rows)
    counts, beam_scores = {"nfe": 0, "drm_calls": 0}, None
    for i in range(steps):
        euler = i >= steps - search.ode_last
        scored = searching and not euler and ((i + 1) % search.score_every == 0 or i == steps - 1)
        step = propose(beams, x, i, noise_level=0 if euler else noise_level,
                       k=k if scored else 1, draws=Draws(generator))
        counts["nfe"] += x.shape[0] * passes(sampler.uncond, sampler.cfg_scale)
        successors = step.candidates.flatten(0, 1)                      # (N * beam * width, ...)
        if not scored:
            x, beam_scores = successors, None
            continue
        scores, spent = score(reward, step, i, rows, beams)
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
    return favourite(reward, x, beam, counts, last), counts


@torch.no_grad()
def best_of_n(sampler, noise, reward, *, n=4, noise_level=0.0, generator=None):
    """n whole samples an image (noise (N * n, ...), an image's adjacent; the sampler on the N
    images' prompts), the DRM's favourite at sigma 0 -> (x0, counts). noise_level 0: ODE samples;
    > 0: SDE samples."""
    owners = torch.arange(len(noise) // n, device=noise.device).repeat_interleave(n)
    samples, counts = stepwise_sample(sampler.rows(owners), noise, noise_level=noise_level,
                                      generator=generator)
    return favourite(reward, samples, n, counts), counts


# -----------------------------------------------------------------------------
# Command line


@dataclass
class Config:
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
    # ode | sde | stepwise (the paper's) | best_of | a rival's: smc, prune (rivals/search.py)
    search: str = flag("ode", choices=("ode", "sde", "stepwise", "best_of",
                                       *rivals.search.SEARCHES))
    drm: str = "data/drm.safetensors"  # the reward model that ranks (every search but ode)
    k: int = flag(4, "[1, inf)", used=used_with("search", "stepwise"))  # SDE successors per step
    # states kept per image (1: the paper's greedy)
    beam: int = flag(1, "[1, inf)", used=used_with("search", "stepwise"))
    # rank every this many steps; plain Euler for the last this many steps
    score_every: int = flag(1, "[1, inf)", used=used_with("search", "stepwise"))
    ode_last: int = flag(0, "[0, inf)", used=used_with("search", "stepwise"))
    # best_of (and the rivals smc, prune): trajectories per image
    particles: int = flag(4, "[1, inf)", used=used_with("search", "best_of", "smc", "prune"))
    # the SDE's noise (sde.py's a)
    noise_level: float = flag(0.7, "[0, inf)", used=used_with("search", "sde", "stepwise", "smc"))
    # the groups, each flag given by its own name: the base model (--model, --ckpt_dir, ...:
    # base.py), where it runs (--device, --compile), the rivals (--score, --lmbda, ...:
    # rivals/search.py)
    pretrained: ModelFlags = group(ModelFlags)
    hardware: DeviceFlags = group(DeviceFlags)
    rival: rivals.search.Flags = group(rivals.search.Flags)
    RENAMED = {"n": "images"}          # flags of earlier versions


def width(cfg):
    """Initial noises an image: the particles of best_of (and smc, prune); 1 otherwise."""
    return 1 if cfg.search in ("ode", "sde", "stepwise") else cfg.particles


def search(cfg, sampler, noise, drm, drm_cond, generator):
    """cfg.search on noise (N * width(cfg), ...), an image's adjacent, the sampler on the N images'
    prompts -> (x0 (N, ...), counts)."""
    if rivals.search.chosen(cfg):  # the one door: a rival's search, score or DRM (rivals/search.py)
        return rivals.search.run(cfg, sampler, noise, drm, drm_cond, generator, paper_search)
    return paper_search(cfg, sampler, noise, drm_on(drm, drm_cond), generator)


def paper_search(cfg, sampler, noise, reward, generator, score=score_noisy):
    """ode, sde, stepwise or best_of (search's), the DRM's scores by the rule `score`."""
    if cfg.search == "best_of":
        return best_of_n(sampler, noise, reward, n=cfg.particles, generator=generator)
    stepwise = cfg.search == "stepwise"
    widths = Search(cfg.k, cfg.beam, cfg.score_every, cfg.ode_last) if stepwise else Search()
    return stepwise_sample(sampler, noise, reward, search=widths,
                           noise_level=0.0 if cfg.search == "ode" else cfg.noise_level,
                           score=score, generator=generator)


def draw(cfg, base, device):
    """--prompt: cfg.images images of one prompt by cfg.search -> a grid."""
    t0 = time.time()
    states = cfg.images * width(cfg) * (cfg.k * cfg.beam if cfg.search == "stepwise" else 1)
    check_fits(states * latent_bytes(base.dit, base.latent_size),
               f"--images={cfg.images} ({states} states a step)", device)
    prompts = [cfg.prompt] * cfg.images
    base.prepare(prompts)                # SD3: embedded once; the text encoders leave the GPU
    cond, uncond = base.encode(prompts)  # the toy: unknown words fail here, before any sampling
    sampler = Sampler(base.dit, sigma_schedule(cfg.steps, cfg.shift).to(device), cond, uncond,
                      cfg.cfg_scale)
    seed = torch.Generator().manual_seed(cfg.seed)
    noise = initial_noise(base.dit, cfg.images * width(cfg), seed, base.latent_size).to(device)
    drm, drm_cond = None, None
    if cfg.search != "ode":
        drm, drm_text, _ = base.load_drm(cfg.drm, device)
        drm.to(frozen_dtype(device))     # bf16 on a GPU
        if cfg.hardware.compile:
            compile_regions(drm.backbone)
        drm_cond = drm_text.encode(prompts)
    latents, counts = search(cfg, sampler, noise, drm, drm_cond,
                             torch.Generator().manual_seed(cfg.seed + 1))
    images = base.to_images(latents).cpu()
    n = cfg.images
    save_grid(images, cfg.out, nrow=min(n, 8))
    print(f"wrote {cfg.out}: {n} images of {cfg.prompt!r}, {cfg.search}, {cfg.steps} steps, per "
          f"image {counts['nfe'] / n:.0f} DiT passes, {counts['drm_calls'] / n:.0f} DRM passes, "
          f"{(time.time() - t0) / n:.3f} s")
    return images


def main(cfg):
    check_flags(cfg)
    rivals.search.check(cfg)
    check_writable(cfg.out, "--out=", image=True)
    if cfg.eval and cfg.search != "ode":
        raise UserError("--eval scores the ODE sampler; the searches against each other: python -m "
                        "bench.search")
    if cfg.eval and cfg.pretrained.model not in ANNOTATED:
        raise UserError("--eval scores with the toy's simulated annotator; with "
                        f"--model={cfg.pretrained.model} draw with --prompt")
    print_config(cfg)
    device = pick_device(cfg.hardware.device)
    base = load_base(cfg.pretrained, device)
    if cfg.hardware.compile:
        compile_regions(base.dit)
    with autocast(device):  # bf16 on a GPU
        if cfg.eval:
            return evaluate_heldout(cfg, base, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                                    shift=cfg.shift)
        return draw(cfg, base, device)


if __name__ == "__main__":
    run_main(main, Config)
