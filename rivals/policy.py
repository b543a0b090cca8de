"""train_policy.py's door to the rivals: their flags, checked before any work, and the update a
rival runs in place of the paper's grpo_update.

    cfg = rivals.policy.check(cfg)                      # train_policy.check: flags, recipes
    models, rival = rivals.policy.enter(cfg, models, ranks, draw_batch, ppo_steps)  # its door

A rival is any of: another credit rule (--credit=sparse|cosine|tree: rivals/credit.py), another
score of the candidates (--score: rivals/scores.py), an SDE window (--sde_window: Flow-GRPO-Fast,
MixGRPO), another objective (--objective=nft|awm: rivals/objectives.py), the DRM's noise ensemble
(--drm_draws, --drm_sigma: rivals/reward.py). Each draws the update's batch with train_policy.py's
own draw_batch (the same prompts and first noises as the paper's at every update: common random
numbers) and, but the objectives, trains with its ppo_steps: both are passed in.
"""
import copy
from dataclasses import dataclass
from functools import partial

import torch

from common import UserError
from rivals.credit import CREDIT, CreditFlags, check_credit, parse_window, per_prompt, window_at
from rivals.objectives import MatchingUpdate, ObjectiveFlags, check_objective, with_objective
from rivals.reward import EnsembleFlags, with_ensemble
from rivals.scores import ScoreFlags


@dataclass
class Flags(CreditFlags, ScoreFlags, ObjectiveFlags, EnsembleFlags):
    """train_policy.py's rival flags: one group of its Config (cfg.rival), given by their own names
    (--credit=tree --split_steps=0,2), printed and range-checked with the rest."""


def chosen(rival):
    """Whether the rival flags name a rival (any of them off the paper's default)."""
    return (rival.credit != "stepwise" or rival.score != "noisy" or rival.sde_window != ""
            or rival.objective != "ppo" or rival.drm_draws > 1 or rival.drm_sigma > 0)


def check(cfg):
    """The rivals' flags that go together, before any work -> cfg with an objective's recipe."""
    cfg = with_objective(cfg)  # DiffusionNFT's and AWM's own settings, unless given
    check_credit(cfg)
    check_objective(cfg)
    return cfg


def enter(cfg, models, ranks, draw_batch, ppo_steps):
    """-> (models with the DRM the rival scores with, the update function in grpo_update's
    place)."""
    rival = cfg.rival
    if rival.objective != "ppo" and ranks.world > 1:
        raise UserError(f"--objective={rival.objective} runs in one process (no torchrun)")
    if rival.credit == "tree" and cfg.trajectories // ranks.world % per_prompt(cfg):
        raise UserError(f"--credit=tree: each process grows whole trees; make --trajectories a "
                        f"multiple of {per_prompt(cfg)} x {ranks.world} processes")
    models.drm = with_ensemble(models.drm, rival.drm_draws, rival.drm_sigma)
    if rival.objective != "ppo":  # their own KL to the base: a frozen copy, as the paper's KL's
        models.reference = models.reference or copy.deepcopy(models.policy).requires_grad_(False)
        return models, MatchingUpdate(cfg, models, draw_batch)
    return models, partial(credit_update, window=parse_window(rival.sde_window, cfg.steps),
                           draw_batch=draw_batch, ppo_steps=ppo_steps)


def credit_update(cfg, base, models, train_prompts, ranks, *, update, advice, window, draw_batch,
                  ppo_steps):
    """One update of PPO on a rival's rollout and advantages -> (stats, the passes it made)."""
    mode = CREDIT[cfg.rival.credit]
    batch = draw_batch(cfg, base, models, train_prompts, ranks, update=update,
                       per_prompt=per_prompt(cfg))
    device = batch.noise.device
    models.policy.eval()
    with torch.no_grad(), models.precision:
        rollout = mode.rollout(cfg, batch, window_at(window, cfg.steps, update,
                                                     batch.streams.window))
        rewards = None
        if mode.terminal:  # gathered from every rank: each prompt's group is normalised whole
            rows = torch.arange(len(batch.noise), device=device)
            final = batch.scorer(rollout.final, torch.zeros(len(batch.noise), device=device), rows)
            rewards = ranks.gather(final)
    models.policy.train()
    advantages = mode.advantages(cfg, rollout, rewards, batch.mine, ranks.gather)
    stats, made = ppo_steps(cfg, models, rollout, advantages, batch, ranks, update=update,
                            advice=advice)
    last = int(rollout.trained.any(1).nonzero().max())  # the last trained step
    stats["train_reward"] = (rollout.rewards[last] if rewards is None else rewards).mean().item()
    return stats, made
