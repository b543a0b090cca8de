"""The rival searches of step-wise sampling, each as its authors' code runs it, and their flags.

    x0, counts = smc_sample(policy, noise, cond, uncond, drm, drm_cond, particles=4)   # FK steering
    x0, counts = prune_sample(policy, noise, cond, uncond, drm, drm_cond, particles=8, keep=0.25)

- particle search (FK steering, Singhal et al. 2025, zacharyhorvitz/Fk-Diffusion-Steering's
  fkd_class.py): N SDE particles an image, the x0-prediction scored by the DRM at sigma 0 on an
  interval of steps, resampled by exp(lambda x the potential);
- pruned best-of-N (as TTSnap, arXiv 2511.22242, with the DRM as its noise-aware judge): N ODE
  trajectories, the DRM keeps the best of them at an intermediate sigma.
Both are made of sde.propose's steps and end with the DRM's favourite (sde.favourite), as the
paper's step-wise search and best-of-N (sample.py) do. sample.py reaches them through one door,
`run` (with a rival's score rule or the DRM's noise ensemble on the paper's search too); their
flags are its rival group (Flags), each refused with another --search.
"""
from dataclasses import dataclass

import torch

from common import UserError, flag, used_with
from rivals.reward import EnsembleFlags, with_ensemble
from rivals.scores import SCORES, score_rule
from sde import Draws, Sampler, drm_on, favourite, passes, propose, sigma_schedule, take


@dataclass
class SearchFlags:
    """sample.py's flags of the rival searches."""
    # what the DRM scores: noisy (the state where it is) | x0 (its clean estimate) | x0_proxy |
    # lookahead (its ODE completion: rivals/scores.py); "" = the method's own: stepwise noisy,
    # smc x0
    score: str = flag("", choices=("", "noisy", *SCORES),
                      used=used_with("search", "stepwise", "smc"))
    # smc: diff (the gain since the last scored step) | max
    potential: str = flag("diff", choices=("diff", "max"), used=used_with("search", "smc"))
    # smc: weights exp(lmbda x potential), FK's lambda
    lmbda: float = flag(10.0, "[0, inf)", used=used_with("search", "smc"))
    # smc: every:from:to, resampled at those steps and the last (FK's every 5 from 5 to 30 of 100
    # steps, scaled to 20)
    resample: tuple = flag((1, 1, 6), "[0, inf)", sep=":", used=used_with("search", "smc"))
    # smc: resample a scheduled step only below the ESS threshold
    adaptive: bool = flag(False, used=used_with("search", "smc"))
    # smc: the effective sample size / particles resampled below
    ess_threshold: float = flag(0.5, "(0, 1]", used=used_with("search", "smc"))
    # prune: the sigmas at which the DRM keeps the best
    prune_at: tuple = flag((0.6,), "[0, 1]", of=float, used=used_with("search", "prune"))
    keep: float = flag(0.5, "(0, 1]", used=used_with("search", "prune"))  # prune: fraction kept


@dataclass
class Flags(SearchFlags, EnsembleFlags):
    """sample.py's rival flags: one group of its Config (cfg.rival), given by their own names."""


def chosen(cfg):
    """Whether sample.py's flags name a rival: its search, score rule, or the DRM's ensemble."""
    rival = cfg.rival
    return (cfg.search in SEARCHES or rival.score in SCORES or rival.drm_draws > 1
            or rival.drm_sigma > 0)


def check(cfg):
    """The rival searches' flags that go together, before any work."""
    rival = cfg.rival
    if cfg.search == "smc" and rival.score not in ("", "x0", "noisy"):
        raise UserError(f"--search=smc --score={rival.score}: SMC scores its particles' x0 (FK "
                        "steering's) or noisy states")
    every, start, end = rival.resample if len(rival.resample) == 3 else (0, 1, 0)
    if every < 1 or not 0 <= start <= end:
        raise UserError(f"--resample={':'.join(map(str, rival.resample))}: give every:from:to, "
                        "every >= 1 and 0 <= from <= to, e.g. 1:1:6")


def run(cfg, sampler, noise, drm, drm_cond, generator, paper_search):
    """sample.search's door: a rival search, or the paper's (paper_search, passed in) with a
    rival's score rule or the DRM's noise ensemble -> (x0, counts)."""
    drm = with_ensemble(drm, cfg.rival.drm_draws, cfg.rival.drm_sigma) if drm is not None else None
    if cfg.search in SEARCHES:
        return SEARCHES[cfg.search](cfg, sampler, noise, drm, drm_cond, generator)
    return paper_search(cfg, sampler, noise, drm_on(drm, drm_cond), generator,
                        score=score_rule(cfg.rival.score or "noisy"))

# -----------------------------------------------------------------------------
# Particle search (FK steering)


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
    "noisy" its state after the step at sigma_next. Potential "diff": weights exp(lmbda (r -
    r_prev)), r_prev the particle's (or its ancestor's) r at the previous such step, 0 at first;
    "max": exp(lmbda max(r, r_prev)), r_prev then the running max, and the last step's weights
    divided by the product of the potentials a particle was resampled with. Weights are not carried
    between steps. A scheduled step resamples multinomially (adaptive: only if the effective sample
    size 1 / sum(w_norm^2) is below ess_threshold x particles); the last step always asks the ESS
    test. At the end, the DRM's favourite at sigma 0 -> (x0, counts with "resampled":
    image-steps)."""
    N, P = len(noise) // particles, particles
    owners = torch.arange(N, device=noise.device).repeat_interleave(P)
    x, sigmas = noise.float(), sigma_schedule(steps, shift).to(noise.device)
    previous = torch.zeros(N * P, device=x.device)       # FK's population_rs: reward_min_value 0
    log_product = torch.zeros(N * P, device=x.device)    # log of the potentials it was drawn by
    counts = {"nfe": 0, "drm_calls": 0, "resampled": 0}
    scheduled = resampling_steps(steps, *schedule)
    particles_on = Sampler(policy, sigmas, take(cond, owners), take(uncond, owners), cfg_scale)
    for i in range(steps):
        step = propose(particles_on, x, i, noise_level=noise_level, draws=Draws(generator))
        x = step.candidates[:, 0]
        counts["nfe"] += len(x) * passes(uncond, cfg_scale)
        if i not in scheduled:
            continue
        scored, sigma = (step.x0_hat, sigmas.new_zeros(1)) if score == "x0" else (x, sigmas[i + 1])
        r = drm(scored, sigma.expand(len(x)), *take(drm_cond, owners)).float()
        counts["drm_calls"] += len(x)
        last = i == steps - 1
        # the weights in log space, normalised there: exp(lambda x gain) over- or underflows for
        # every particle of an image once lambda x gain passes ~88 (float32)
        if potential == "diff":
            potentials, log_w = r, lmbda * (r - previous)
        else:
            potentials = torch.maximum(r, previous)
            log_w = lmbda * (r if last else potentials) - (log_product if last else 0)
        log_w = log_w.view(N, P)
        normalised = torch.softmax(log_w, dim=1)
        resample = torch.ones(N, dtype=torch.bool, device=x.device)
        if adaptive or last:
            resample = 1 / (normalised ** 2).sum(1) < ess_threshold * P             # (N,)
        keep = torch.arange(P).expand(N, P)
        picks = (torch.multinomial(normalised.cpu(), P, replacement=True, generator=generator)
                 if resample.any() else keep)
        parents = (torch.where(resample.cpu().unsqueeze(1), picks, keep)
                   + torch.arange(N).unsqueeze(1) * P).flatten().to(x.device)
        moved = resample.repeat_interleave(P)
        log_product = torch.where(moved, log_product[parents] + log_w.flatten()[parents],
                                  log_product)
        x, previous = x[parents], potentials[parents]
        counts["resampled"] += int(resample.sum())
    return favourite(drm_on(drm, drm_cond), x, P, counts), counts

# -----------------------------------------------------------------------------
# Pruned best-of-N


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
        survivors = Sampler(policy, sigmas, take(cond, owners), take(uncond, owners), cfg_scale)
        x = propose(survivors, x, i, noise_level=0.0).candidates[:, 0]
        counts["nfe"] += len(x) * passes(uncond, cfg_scale)
    return favourite(drm_on(drm, drm_cond), x, alive, counts), counts

# -----------------------------------------------------------------------------
# As sample.py's --search=smc and --search=prune run them


def smc(cfg, sampler, noise, drm, drm_cond, generator):
    rival = cfg.rival
    return smc_sample(sampler.policy, noise, sampler.cond, sampler.uncond, drm, drm_cond,
                      particles=cfg.particles, steps=cfg.steps, noise_level=cfg.noise_level,
                      cfg_scale=cfg.cfg_scale, shift=cfg.shift, potential=rival.potential,
                      lmbda=rival.lmbda, score=rival.score or "x0", schedule=rival.resample,
                      adaptive=rival.adaptive, ess_threshold=rival.ess_threshold,
                      generator=generator)


def prune(cfg, sampler, noise, drm, drm_cond, generator):  # noqa: ARG001 (ODE: nothing drawn)
    return prune_sample(sampler.policy, noise, sampler.cond, sampler.uncond, drm, drm_cond,
                        particles=cfg.particles, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                        shift=cfg.shift, prune_at=cfg.rival.prune_at, keep=cfg.rival.keep)


# the rival searches: name -> run(cfg, sampler, noise, drm, drm_cond, generator)
SEARCHES = {"smc": smc, "prune": prune}
