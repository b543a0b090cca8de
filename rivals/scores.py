"""What the DRM scores of a step's candidates: the paper's noisy state, or a rival's clean image.

    scores, passes = SCORES["x0"](reward, step, i, rows, sampler)     # (B, k), DiT passes spent

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
import torch

from model import guided_velocity
from sde import passes, score_noisy, take


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


SCORES = {"noisy": score_noisy, "x0": score_x0, "x0_proxy": score_x0_proxy,
          "lookahead": score_lookahead}
