"""Step-wise GRPO on a flow-matching model (DRM, sec. 4): SDE rollouts with k candidates a step,
their DRM scores as advantages, the PPO loss.

    rollout = sample_rollout(sampler, noise, noise_level=0.7, candidates=Candidates(4, drm))
    advantages = stepwise_advantages(rollout.rewards)      # the paper: DRM score of each candidate
    loss, stats = grpo_loss(policy, rollout, advantages, step_ids, rows, ppo=PPO(clip_range=1e-3))

1. Rollouts (sde.py's steps). At every trained step the policy's one mean spawns k candidate next
   states (sde.propose); the DRM scores each at sigma_next (it can judge noisy states:
   sde.score_noisy); the trajectory goes on from one of them. The last step (sigma 0.001 -> 0)
   is sampled but not trained, as Flow-GRPO: its std is so small that float32's rounding of the
   state is 1e-4 of it (`trained_steps`).
2. Credit. GRPO normalises rewards within a group of samples that share a starting point, so
   the group mean is the baseline (no value network). Step-wise, the group is a step's k
   candidates, so a step is credited for what it did, not for the whole trajectory. (The rivals,
   terminal rewards spread over the steps in other ways, are rivals/credit.py.)
3. The loss: PPO's clipped importance ratio per (state, next state) pair,
   r = exp(log p_theta(x_next | x) - log p_old(x_next | x)), loss = -min(r A, clip(r, 1 +- eps) A),
   plus an optional KL to the frozen reference policy, which between two Gaussians of equal std
   is ||mean - mean_ref||^2 / (2 std^2).
"""
from dataclasses import dataclass
from typing import Callable

import torch

from common import InputError
from sde import (Draws, candidate_log_probs, guided_velocity, passes, propose, score_noisy,
                 sde_mean_std)

# -----------------------------------------------------------------------------
# 1. Rollouts: a trajectory per row of noise; with k > 1 every step branches into k candidates


@dataclass
class Rollout:
    """T steps of B trajectories with k candidates a step, and the settings they were drawn with."""
    states: torch.Tensor       # (T, B, C, H, W): the state each step started from
    candidates: torch.Tensor   # (T, B, k, C, H, W): the sampled next states (k = 1: the one taken)
    means: torch.Tensor        # (T, B, C, H, W): the Gaussian's mean they were drawn around
    log_probs: torch.Tensor    # (T, B, k): their log-probs under the rollout policy
    chosen: torch.Tensor       # (T, B): the candidate each trajectory went on from
    x0_hat: torch.Tensor       # (T, B, C, H, W): the clean-image estimate x - sigma v
    final: torch.Tensor        # (B, C, H, W)
    rewards: torch.Tensor | None  # (T, B, k): the DRM's scores of the candidates (stepwise)
    sigmas: torch.Tensor       # (T + 1,)
    cond: tuple                # the prompts' (context, pooled), for replaying
    uncond: tuple | None       # the empty prompt's, when guided
    noise_level: float         # of the trained steps (the others are Euler steps)
    cfg_scale: float
    trained: torch.Tensor      # (T, B) bool, on the CPU: the (step, trajectory) pairs to train
    nfe: int                   # the policy's forward passes it took (a guided pass counts two)


@dataclass
class Candidates:
    """The paper's group at a trained step: k candidates around the step's one policy mean, scored
    by the rule `score` (sde.score_noisy: the DRM at sigma_next, the paper's; or a rival's:
    rivals/scores.py) with reward(x (N, ...), sigma (N,), rows (N,)), the DRM on the rows'
    prompts; the trajectory goes on from a random candidate (follow="random", the paper's) or the
    best ("best")."""
    k: int
    reward: Callable
    score: Callable = score_noisy
    follow: str = "random"


@torch.no_grad()
def sample_rollout(sampler, noise, *, noise_level=0.7, candidates=None, window=None,
                   train_last=False, draws=None):
    """SDE trajectories from noise (B, C, H, W) along the sampler's grid (sde.Sampler) -> Rollout.
    candidates (Candidates): at each trained step k candidates share the step's one policy mean and
    are scored; None: one next state a step, unscored. window=(a, b): steps a..b-1 as above and
    trained; the others Euler steps, one candidate, untrained. train_last=False: the last step is
    an SDE step with one candidate, unscored and untrained (trained_steps). draws (sde.Draws): the
    SDE noise, the random picks and, under torchrun, this rank's rows: the draws are made for all
    world * B rows and sliced, so the ranks together sample what one process would.
    """
    k = candidates.k if candidates else 1
    if candidates and candidates.follow not in ("random", "best"):
        raise InputError(f"follow={candidates.follow!r}: choose random or best")
    draws, (B, T) = draws or Draws(), (noise.shape[0], len(sampler.sigmas) - 1)
    (rank, world), uncond = draws.shard, sampler.uncond
    sde, trained = in_window(T, window), trained_steps(T, window, train_last)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    states, steps, chosen, rewards = [], [], [], []
    rows, nfe = torch.arange(B, device=noise.device), B * T * passes(uncond, sampler.cfg_scale)
    for i in range(T):
        step = propose(sampler, x, i, noise_level=noise_level if sde[i] else 0.0,
                       k=k if trained[i] else 1, draws=draws)
        pick = torch.zeros(B, dtype=torch.long, device=x.device)
        if k > 1:  # stepwise: the DRM's scores (0 at untrained steps)
            rewards.append(torch.zeros(B, k, device=x.device))
            if trained[i]:
                rewards[-1], spent = candidates.score(candidates.reward, step, i, rows, sampler)
                nfe += spent
                stream = draws.generator if draws.picks is None else draws.picks
                drawn = torch.randint(k, (world * B,), generator=stream)
                pick = (rewards[-1].argmax(1) if candidates.follow == "best"
                        else drawn[rank * B:(rank + 1) * B].to(x.device))
        states.append(x)
        steps.append(step)
        chosen.append(pick)
        x = step.candidates[torch.arange(B, device=x.device), pick]
    def stack(name, widen=False):  # widen: an Euler step's one candidate, k times (window)
        parts = [getattr(step, name) for step in steps]
        return torch.stack([p.expand(B, k, *p.shape[2:]) for p in parts] if widen else parts)
    return Rollout(states=torch.stack(states), candidates=stack("candidates", True),
                   means=stack("mean"), log_probs=stack("log_probs", True),
                   chosen=torch.stack(chosen), x0_hat=stack("x0_hat"), final=x,
                   rewards=torch.stack(rewards) if rewards else None, sigmas=sampler.sigmas,
                   cond=sampler.cond, uncond=uncond, noise_level=noise_level,
                   cfg_scale=sampler.cfg_scale,
                   trained=torch.tensor(trained).unsqueeze(1).expand(T, B), nfe=nfe)


def in_window(T, window):
    """[T bools]: the steps a..b-1 of window=(a, b) (all T steps for None): the SDE steps."""
    a, b = window or (0, T)
    return [a <= i < b for i in range(T)]


def trained_steps(T, window, train_last=False):
    """[T bools]: the steps that enter the loss, the window's, less the last step unless train_last.
    The last step (SD3's grid: sigma 0.001 -> 0) has an SDE std of ~7e-4, only ~1e4 times float32's
    rounding of a state of size 1, and the log-prob's gradient carries (x_next - mean) / std^2:
    there it trains on rounding. Flow-GRPO does not train it either (timestep_fraction 0.99)."""
    return [sde and (i < T - 1 or train_last) for i, sde in enumerate(in_window(T, window))]

# -----------------------------------------------------------------------------
# 2. Credit: advantages (T, B, k), one per candidate


def group_normalise(rewards, dim, eps=1e-4):
    """(r - mean) / (std + eps) within groups along dim: GRPO's baseline and scale. The std is the
    population one (ddof 0) and eps 1e-4, as Flow-GRPO's stat_tracking.py computes them."""
    # BEGIN SOLUTION ex4_grpo: subtract the group mean, divide by its population std (ddof 0) + eps
    mean, std = rewards.mean(dim, keepdim=True), rewards.std(dim, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)
    # END SOLUTION


def stepwise_advantages(step_rewards):
    """step_rewards (T, B, k): the DRM's score of each candidate -> normalised within the k."""
    if step_rewards.shape[-1] < 2:
        raise InputError("stepwise credit needs k >= 2 candidates per step to compare")
    return group_normalise(step_rewards, dim=-1)

# -----------------------------------------------------------------------------
# 3. The loss, on a subset of the rollout's (step, trajectory) pairs


@dataclass
class PPO:
    """The loss's settings: PPO's clip of the ratio, the advantages' clip, the weight of the KL to
    the frozen reference policy (0: none), and whether the gradient flows through guidance's
    unconditional branch too (the exact gradient; False: detached, as Flow-GRPO's loss)."""
    clip_range: float = 1e-3
    adv_clip: float = 5.0
    kl_weight: float = 0.0
    uncond_grad: bool = True


def grpo_loss(policy, rollout, advantages, step_ids, rows, *, ppo=None, reference=None):
    """PPO-clipped GRPO loss over the candidates of the given (step, trajectory) pairs ->
    (loss, stats). step_ids, rows: (N,) indices into the rollout's T steps and B trajectories;
    each pair is one policy forward (with guidance, two) shared by its k candidates, with the
    rollout's noise level and guidance; ppo (PPO) its settings. The KL is the exact one between
    the two Gaussians; Flow-GRPO's (its scripts/train_sd3.py) divides by 2 sigma_t^2, not 2 std^2 =
    2 sigma_t^2 |dt|, so its beta at a step of length |dt| is kl_weight = beta |dt| here.
    """
    ppo = ppo or PPO()
    states = rollout.states[step_ids, rows]                                        # (N, C, H, W)
    sigma, sigma_next = rollout.sigmas[step_ids], rollout.sigmas[step_ids + 1]
    cond = tuple(t[rows] for t in rollout.cond)
    uncond = tuple(t[rows] for t in rollout.uncond) if rollout.uncond is not None else None
    velocity = guided_velocity(policy, states, sigma, cond, uncond, rollout.cfg_scale,
                               uncond_grad=ppo.uncond_grad)
    mean, std = sde_mean_std(states, velocity, sigma, sigma_next, rollout.noise_level)
    log_prob = candidate_log_probs(rollout.candidates[step_ids, rows], mean, std)  # (N, k)
    # BEGIN SOLUTION ex4_grpo: ratio to the rollout's log-probs; advantages clamped; PPO's clip
    ratio = torch.exp(log_prob - rollout.log_probs[step_ids, rows])
    advantage = advantages[step_ids, rows].clamp(-ppo.adv_clip, ppo.adv_clip)
    clipped = ratio.clamp(1 - ppo.clip_range, 1 + ppo.clip_range)
    policy_loss = torch.maximum(-advantage * ratio, -advantage * clipped).mean()
    # END SOLUTION
    stats = {"policy_loss": policy_loss.detach(), "ratio_max_deviation": (ratio - 1).abs().max(),
             "clip_fraction": ((ratio - 1).abs() > ppo.clip_range).float().mean()}
    stats = {key: value.detach() for key, value in stats.items()}
    loss = policy_loss
    if ppo.kl_weight > 0:
        with torch.no_grad():
            v_ref = guided_velocity(reference, states, sigma, cond, uncond, rollout.cfg_scale)
            mean_ref, _ = sde_mean_std(states, v_ref, sigma, sigma_next, rollout.noise_level)
        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten() ** 2)
        loss = loss + ppo.kl_weight * kl.mean()
        stats["kl"] = kl.mean().detach()
    return loss, stats

