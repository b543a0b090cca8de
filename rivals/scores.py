"""What the DRM scores of a step's candidates: the paper's noisy state, or a rival's clean image.

    scores, passes = SCORES["x0"](reward, step, i, rows, sampler)     # (B, k), DiT passes spent
    ranking = candidate_ranking(base, drm, drm_text, prompts)   # train_reward.py --eval_set=policy

Each rule takes what sde.score_noisy takes (reward(x, sigma, rows), the Step, its index i, the
states' rows, the sde.Sampler around it) and returns the DRM's scores (B, k) and the DiT passes it
spent, so step-wise credit (grpo.sample_rollout) and step-wise search (sample.stepwise_sample) can
use any of them:
- `noisy` (the paper, sde.py): the candidate x_next at sigma_next.
- `x0`: the candidate's own clean estimate, x_next - sigma_next v(x_next, sigma_next), at sigma
  0: what a clean-image reward would see of it; a guided policy pass per candidate.
- `x0_proxy`: x_next - sigma_next v(x, sigma), the parent's velocity: no pass, but the k
  candidates then differ only by their injected noise, judged at sigma 0 (at noise level 0 it is
  the state's x0_hat).
- `lookahead` (DenseGRPO, arXiv 2601.20218, with n = t): its Euler ODE completion down the rest of
  the grid, at sigma 0; each candidate costs the remaining steps' guided passes.
"""
import math
from dataclasses import dataclass

import torch

from common import flag, used_with
from evaluation import spearman
from sde import (Draws, Sampler, drm_on, guided_velocity, initial_noise, passes, propose,
                 score_noisy, sigma_schedule, take)


def score_x0(reward, step, i, rows, sampler):
    B, k = step.candidates.shape[:2]
    x, sigma = step.candidates.flatten(0, 1), sampler.sigmas[i + 1]
    each = torch.arange(B, device=x.device).repeat_interleave(k)
    v = guided_velocity(sampler.policy, x, sigma, take(sampler.cond, each),
                        take(sampler.uncond, each), sampler.cfg_scale)
    zeros = torch.zeros(B * k, device=x.device)
    scores = reward(x - sigma * v.to(x.dtype), zeros, rows.repeat_interleave(k)).float()
    return scores.view(B, k), B * k * passes(sampler.uncond, sampler.cfg_scale)


def score_x0_proxy(reward, step, i, rows, sampler):
    B, k = step.candidates.shape[:2]
    clean = step.candidates - sampler.sigmas[i + 1] * step.velocity.unsqueeze(1)   # (B, k, ...)
    zeros = torch.zeros(B * k, device=clean.device)
    return reward(clean.flatten(0, 1), zeros, rows.repeat_interleave(k)).float().view(B, k), 0


def score_lookahead(reward, step, i, rows, sampler):
    B, k = step.candidates.shape[:2]
    x, sigmas = step.candidates.flatten(0, 1), sampler.sigmas
    each = torch.arange(B, device=x.device).repeat_interleave(k)
    context, empty = take(sampler.cond, each), take(sampler.uncond, each)
    spent = 0
    for j in range(i + 1, len(sigmas) - 1):
        v = guided_velocity(sampler.policy, x, sigmas[j], context, empty, sampler.cfg_scale)
        x = x + (sigmas[j + 1] - sigmas[j]) * v.to(x.dtype)
        spent += B * k * passes(sampler.uncond, sampler.cfg_scale)
    zeros = torch.zeros(B * k, device=x.device)
    return reward(x, zeros, rows.repeat_interleave(k)).float().view(B, k), spent


# the rival rules (the paper's, "noisy", is sde.score_noisy)
SCORES = {"x0": score_x0, "x0_proxy": score_x0_proxy, "lookahead": score_lookahead}


def score_rule(name):
    """The rule a --score names: noisy (the paper's), or a rival's."""
    return score_noisy if name == "noisy" else SCORES[name]


@dataclass
class ScoreFlags:
    """train_policy.py's flag of what the DRM scores (its Config holds it in its rival group)."""
    # stepwise: noisy (x_next at sigma_next, the paper's) | x0 | x0_proxy | lookahead
    score: str = flag("noisy", choices=("noisy", *SCORES),
                      used=used_with("rival.credit", "stepwise"))

# -----------------------------------------------------------------------------
# The DRM on the policy's own samples: how each rule ranks a step's candidates
#
#     python train_reward.py --eval_only --eval_set=policy --drm=data/drm.safetensors
#
# `candidate_ranking`: along SDE rollouts on the training grid (10 steps, noise 0.7, guidance 4),
# at each step k candidates around one policy mean, as step-wise GRPO draws them; each is
# completed by the ODE to a clean image and judged. The Spearman correlation, within each step's
# k, between the DRM's scores and the gold of the completions: scoring the noisy candidate at
# sigma_next (the paper), its own clean estimate x_next - sigma_next v(x_next) at sigma 0 ("x0"),
# or the proxy x_next - sigma_next v(x) with the parent's velocity ("x0_proxy"). Mean and s.e.
# over the rollouts, by step.


@torch.no_grad()
def candidate_ranking(base, drm, drm_text, prompts, *, k=8, steps=10, noise_level=0.7,
                      cfg_scale=4.0, seed=0):
    """-> {score: [(mean Spearman, its s.e.) by step]} over len(prompts) SDE rollouts, one a prompt
    (see above); the last step, which training leaves out, included."""
    device = next(base.dit.parameters()).device
    g = torch.Generator().manual_seed(seed)
    sigmas = sigma_schedule(steps).to(device)
    cond, uncond = base.encode(prompts)
    drm_cond = drm_text.encode(prompts)
    x = initial_noise(base.dit, len(prompts), g, base.latent_size).to(device)
    rows = torch.arange(len(prompts), device=device)
    reward = drm_on(drm, drm_cond)
    sampler = Sampler(base.dit, sigmas, cond, uncond, cfg_scale)
    by_step = {"noisy": [], "x0": [], "x0_proxy": []}
    for i in range(steps):
        step = propose(sampler, x, i, noise_level=noise_level, k=k, draws=Draws(g))
        completions = []  # each candidate's ODE completion (the lookahead rule's), judged below
        score_lookahead(lambda states, sigma, owners: completions.append(states) or sigma, step,
                        i, rows, sampler)
        completed, owners = completions[0], rows.repeat_interleave(k)
        truth = base.judge(base.to_images(base.finish(completed)),
                           [prompts[o] for o in owners.tolist()])["gold"]
        truth = truth.float().view(len(prompts), k).cpu()
        for score in by_step:
            scores, _ = score_rule(score)(reward, step, i, rows, sampler)
            rho = spearman(scores.cpu(), truth)
            by_step[score].append((rho.mean().item(), rho.std().item() / math.sqrt(len(rho))))
        x = step.candidates[rows, torch.randint(k, (len(prompts),), generator=g).to(device)]
    return by_step


def print_ranking(ranking):
    """candidate_ranking's table."""
    print("Spearman of the DRM's ranking of k = 8 SDE candidates against their ODE completions' "
          "gold, mean ± s.e. over the rollouts")
    print("| step | sigma -> sigma_next | noisy (the paper) | its x0 | x0 proxy (the parent's "
          "velocity) |\n|---|---|---|---|---|")
    sigmas = sigma_schedule(len(ranking["noisy"]))
    for i, scores in enumerate(zip(*(ranking[name] for name in ("noisy", "x0", "x0_proxy")))):
        print(f"| {i} | {sigmas[i]:.3f} -> {sigmas[i + 1]:.3f} | "
              + " | ".join(f"{mean:+.3f} ± {se:.3f}" for mean, se in scores) + " |")


def ranking_table(base, drm, drm_text, prompts):
    """candidate_ranking, printed -> its table (train_reward.py --eval_set=policy)."""
    ranking = candidate_ranking(base, drm, drm_text, prompts)
    print_ranking(ranking)
    return ranking
