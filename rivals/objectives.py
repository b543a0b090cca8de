"""The policy objectives beside the paper's PPO, each as its authors' code computes it, and their
table: DiffusionNFT and Advantage Weighted Matching.

    python train_policy.py --objective=nft                     # DiffusionNFT, the terminal reward
    python train_policy.py --objective=awm --credit=stepwise   # AWM, the DRM's advantage per sigma

Both train on the policy's own ODE samples x0 (no SDE, no log-probabilities, no guidance in
training) with a flow-matching loss at noisy states x_sigma = (1 - sigma) x0 + sigma eps, eps
fresh, sigma taken from the rollout's grid, one AdamW step an update on the mean over every
(sample, sigma) pair:
- nft (DiffusionNFT, Zheng et al. 2025, arXiv 2509.16117; NVlabs/DiffusionNFT,
  scripts/train_nft_sd3.py): the policy v and a slow "old" copy v_old (an EMA of the policy,
  updated after each step with decay min(0.001 u, 0.5) at update u; the rollouts are its samples)
  define an implicit positive policy v+ = b v + (1 - b) v_old and negative one
  v- = (1 + b) v_old - b v (b = 1). Their clean estimates x_sigma - sigma v+- are pulled to x0 with
  weights r and 1 - r, r = clip(A, -5, 5) / 10 + 1/2, each squared error divided by its own
  (detached) mean absolute error:
      loss = 5 / b [r ||x0+ - x0||^2 / sg|x0+ - x0| + (1 - r) ||x0- - x0||^2 / sg|x0- - x0|]
  + 1e-4 mean (v - v_ref)^2 to the frozen base. Its sigmas: 9 of the grid's 10 a sample
  (timestep_fraction 0.99), in random order.
- awm (Advantage Weighted Matching, Xue et al. 2025, arXiv 2509.25050;
  scxue/advantage_weighted_matching, scripts/train_sd3_awm.py, config pickscore_sd3_no_cfg_1node,
  whose sampler is an ODE): the pretraining loss on the policy's samples, weighted by advantage,
  log p = -((mse + 1e-10)^p - 1e-10^p) sigma / p (p = 0.25, "ghuber"), mse = mean (v - (eps - x0))^2
  (its "log-prob"), and
      loss = -clip(A, -5, 5) / 5 * log p + 1e-4 mean (v - v_ref)^2 + mean (v - v_ema)^2,
  (its PPO ratio is exp(log p - sg(log p)) = 1 on-policy, clip range 1: this gradient) with v_ema
  an EMA of the policy (decay min(0.001 u, 0.3)), a trust region. Its sigmas: 6 strata of the grid's
  first int(0.9 steps) indices, one index drawn in each (time_type "discrete"; theirs shared by a
  micro-batch, ours by a sample).

Advantages (A above), `--credit`:
- sparse (as both authors): the DRM's reward of x0 at sigma 0, less its prompt group's mean, over
  the std of the update's rewards + 1e-4 (their stat tracker's global_std=True):
      A_i = (D(x0_i, 0) - mean_{j in g(i)} D(x0_j, 0)) / (std_all D(x0, 0) + 1e-4).
- stepwise (ours: the DRM's dense reward where the loss is taken): the DRM scores the very noisy
  state the loss sees, at its sigma, and the group is compared there,
      A_i(sigma) = (D(x_sigma_i, sigma) - mean_{j in g(i)} D(x_sigma_j, sigma)) / (std_all + 1e-4),
  a group's samples sharing their sigmas and each sigma's eps (draw_pairs), so that their scores
  differ by their content alone. At high sigma only what survives the noise (the digit's shape)
  earns credit, at low sigma the detail: the loss at each noise level is weighted by what the DRM
  sees at it.

Their settings that differ from train_policy.py's defaults (RECIPE: no guidance, the update's std,
AdamW's weight decay 1e-4) apply unless given. Scaled to the toy, as every rival here: our Euler ODE
on SD3's grid for their DPM / SA solvers, --steps=10 (NFT's 10; AWM's 14), 4 prompts x 4 samples an
update (theirs 48 x 24, and AWM skips its first 2 epochs, a workaround of theirs), a full fine-tune
at --lr=3e-5 (their LoRA's 3e-4, scaled as Flow-GRPO's); the policy itself evaluated, not their
EMA of it; one process. Every pass is counted: the rollout's, and three forwards a (sample, sigma)
pair (the policy, the old or EMA copy, the base) and the policy's backward.
"""
import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch

from common import UserError, check_finite, flag, given_flags, unless_given
from model import add_noise
from rivals.credit import terminal_advantages
from sde import passes, sample_ode, sigma_schedule


@dataclass
class ObjectiveFlags:
    """train_policy.py's flag of the objective (its Config holds it in its rival group)."""
    # ppo (the paper's: grpo.py) | nft (DiffusionNFT) | awm (Advantage Weighted Matching)
    objective: str = flag("ppo", choices=("ppo", "nft", "awm"))


# PPO's flags, which NFT and AWM do not use (given with them, refused)
PPO_ONLY = ("noise_level", "score", "follow", "k", "clip_range", "minibatches", "loss_batch",
            "uncond_grad", "kl_weight", "sde_window", "train_last_step")

# the authors' settings that differ from train_policy.py's defaults, applied unless given: no
# guidance in training, evaluated without too (DiffusionNFT's config/nft.py, AWM's no-cfg
# configs: guidance_scale 1.0 in both: also_eval_cfg_scale), beside train_policy.py's guidance 4
RECIPE = {"cfg_scale": 1.0, "group_std": "global", "weight_decay": 1e-4,
          "also_eval_cfg_scale": 1.0}


def with_objective(cfg):
    """cfg with NFT's and AWM's own settings (RECIPE) where the command line gave none."""
    return cfg if cfg.rival.objective == "ppo" else unless_given(cfg, **RECIPE)


def check_objective(cfg):
    """The flags that go with an objective, before any work."""
    objective, credit = cfg.rival.objective, cfg.rival.credit
    if objective == "ppo":
        return
    if credit not in ("sparse", "stepwise"):
        raise UserError(f"--objective={objective} takes --credit=sparse (the terminal reward) "
                        f"or stepwise (the DRM's at each sigma), not {credit}")
    ignored = [f"--{name}" for name in PPO_ONLY if name in given_flags(cfg)]
    if ignored:
        raise UserError(f"--objective={objective} samples by the ODE and has its own loss and "
                        f"KL: drop {', '.join(ignored)} (PPO's)")

# -----------------------------------------------------------------------------
# The losses, per (sample, sigma) pair


def per_sample(x):
    """The mean over all dimensions but the first."""
    return x.flatten(1).mean(1)


def nft_loss(velocity, old_velocity, x_sigma, x0, sigma, advantages, beta=1.0, adv_clip=5.0):
    """DiffusionNFT's policy loss (N,) (train_nft_sd3.py): velocity (N, C, H, W) the policy's at
    (x_sigma, sigma), old_velocity the old copy's, advantages (N,)."""
    r = (advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)
    old_velocity = old_velocity.detach()
    positive = beta * velocity + (1 - beta) * old_velocity
    negative = (1 + beta) * old_velocity - beta * velocity
    sigma = sigma.view(-1, *[1] * (x0.dim() - 1))

    def adaptive(prediction):  # its squared error over its own mean absolute error, in float64
        error = x_sigma - sigma * prediction - x0
        with torch.no_grad():
            scale = per_sample(error.double().abs()).clamp(min=1e-5)
        return per_sample(error ** 2) / scale
    return (r * adaptive(positive) / beta + (1 - r) * adaptive(negative) / beta) * adv_clip


def awm_log_prob(velocity, eps, x0, sigma, power=0.25):
    """AWM's "log-prob" (N,) (compute_log_prob_awm, weighting "ghuber"): minus the flow-matching
    error to the target eps - x0, in float64, to the power p, times sigma, over p."""
    mse = per_sample((velocity.double() - (eps.double() - x0.double())) ** 2)
    return -((mse + 1e-10) ** power - 1e-10 ** power) * sigma.double() / power


def awm_loss(log_prob, advantages, adv_clip=5.0, advantage_max=1.0, clip_range=1.0):
    """AWM's policy loss (N,): PPO's form on exp(log_prob - sg(log_prob)), which is 1 on-policy."""
    advantages = advantages.clamp(-adv_clip, adv_clip) / adv_clip * advantage_max
    ratio = torch.exp(log_prob - log_prob.detach())
    return torch.maximum(-advantages * ratio,
                         -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))

# -----------------------------------------------------------------------------
# Where on the grid each sample is trained


def nft_indices(steps, samples, generator):
    """(samples, n) grid indices: each sample its own random order of the grid, its first
    int(0.99 steps) kept (train_nft_sd3.py's perms_time, timestep_fraction 0.99)."""
    n = int(steps * 0.99)
    return torch.stack([torch.randperm(steps, generator=generator)[:n] for _ in range(samples)])


def awm_indices(steps, samples, generator, strata=6):
    """(samples, strata) grid indices: one drawn in each of `strata` equal parts of [0, int(0.9
    steps)), the same for every sample (train_sd3_awm.py's time_type "discrete")."""
    bounds = torch.linspace(0, int(steps * 0.9), strata + 1)
    low, high = bounds[:-1].long(), bounds[1:].long()
    index = low + (torch.rand(strata, generator=generator) * (high - low)).long()
    return index.expand(samples, strata)


class Objective(NamedTuple):
    """An objective: its grid indices(steps, samples, generator) -> (samples, n), the decay of its
    shadow copy's EMA at an update, and whether its rollouts are the shadow's samples."""
    indices: Callable
    shadow_decay: Callable
    samples_from_shadow: bool


OBJECTIVES = {
    "nft": Objective(nft_indices, lambda update: min(0.001 * update, 0.5), True),
    "awm": Objective(awm_indices, lambda update: min(0.001 * update, 0.3), False),
}

# -----------------------------------------------------------------------------
# One update


def pair_losses(cfg, models, shadow, x0, eps, sigma, advantages, context):
    """The mean loss of a batch of (sample, sigma) pairs, each with its eps and advantage."""
    x_sigma = add_noise(x0, sigma, eps)
    velocity = models.loss_policy(x_sigma, sigma, *context)
    with torch.no_grad():
        old, reference = (m(x_sigma, sigma, *context) for m in (shadow, models.reference))
    if cfg.rival.objective == "nft":
        policy = nft_loss(velocity, old, x_sigma, x0, sigma, advantages, adv_clip=cfg.adv_clip)
        return policy.mean() + 1e-4 * (velocity - reference).square().mean()
    policy = awm_loss(awm_log_prob(velocity, eps, x0, sigma), advantages, adv_clip=cfg.adv_clip)
    drift = (velocity.double() - reference.double()).square().mean()
    return policy.mean() + 1e-4 * drift + (velocity.double() - old.double()).square().mean()


def advantages_at(cfg, scorer, x0, eps, sigmas):
    """(n, B) advantages: the terminal reward's for every sigma (sparse), or the DRM's at each of
    the B samples' n sigmas (stepwise), each normalised within the prompt's group."""
    rows = torch.arange(len(x0), device=x0.device)
    normalise = partial(terminal_advantages, group_size=cfg.per_prompt,
                        group_std=cfg.rival.group_std)
    if cfg.rival.credit == "sparse":
        final = scorer(x0, torch.zeros(len(x0), device=x0.device), rows)
        return normalise(final).expand(len(sigmas), -1), final
    scores = torch.stack([scorer(add_noise(x0, s, e), s, rows) for s, e in zip(sigmas, eps)])
    return torch.stack([normalise(r) for r in scores]), scores[-1]


def draw_pairs(cfg, samples, shape, generator):
    """Each sample's sigmas on the rollout's grid and an eps for each -> sigmas (n, samples), eps
    (n, samples, *shape). stepwise: a group's samples share both, so the DRM compares them at one
    sigma under one noise."""
    group = cfg.per_prompt if cfg.rival.credit == "stepwise" else 1
    index = OBJECTIVES[cfg.rival.objective].indices(cfg.steps, samples // group, generator)
    eps = torch.randn((index.shape[1], samples // group, *shape), generator=generator)
    sigmas = sigma_schedule(cfg.steps, cfg.shift)[index.repeat_interleave(group, 0)].T
    return sigmas, eps.repeat_interleave(group, 1)


class MatchingUpdate:
    """One NFT or AWM update in place of train_policy.grpo_update, with its arguments, on the same
    batch (draw_batch: train_policy.py's, passed in): the shadow copy of the policy is this
    objective's own, saved and resumed with the run (Models.kept)."""

    def __init__(self, cfg, models, draw_batch):
        self.cfg, self.draw_batch = cfg, draw_batch
        self.objective = OBJECTIVES[cfg.rival.objective]
        self.shadow = copy.deepcopy(models.policy).requires_grad_(False)
        models.kept["shadow"] = self.shadow

    def __call__(self, cfg, base, models, train_prompts, ranks, *, update, advice):
        """-> (stats, the passes it made); ranks: one process, as train_policy.main insists."""
        batch = self.draw_batch(cfg, base, models, train_prompts, ranks, update=update,
                                per_prompt=cfg.per_prompt)
        sampler, device = batch.sampler, batch.noise.device
        sampling = models.policy if not self.objective.samples_from_shadow else self.shadow
        models.policy.eval()
        with torch.no_grad(), models.precision:
            x0 = sample_ode(sampling, batch.noise, sampler.cond, sampler.uncond, steps=cfg.steps,
                            cfg_scale=cfg.cfg_scale, shift=cfg.shift)
        models.policy.train()
        sigmas, eps = (t.to(device) for t in draw_pairs(cfg, len(x0), x0.shape[1:],
                                                        batch.draws.generator))
        with torch.no_grad(), models.precision:
            advantages, rewards = advantages_at(cfg, batch.scorer, x0, eps, sigmas)
        models.optimizer.zero_grad(set_to_none=True)
        losses = []
        for j in range(len(sigmas)):  # one backward a column of sigmas; their mean is the loss
            with models.precision:
                loss = pair_losses(cfg, models, self.shadow, x0, eps[j], sigmas[j], advantages[j],
                                   sampler.cond)
            check_finite(loss, update, "loss", advice)
            (loss / len(sigmas)).backward()
            losses.append(loss.item())
        params = models.optimizer.param_groups[0]["params"]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        check_finite(norm, update, "gradient norm", advice)
        models.optimizer.step()
        update_shadow(models.policy, self.shadow, self.objective.shadow_decay(update))
        nfe = cfg.steps * len(x0) * passes(sampler.uncond, cfg.cfg_scale) + 3 * sigmas.numel()
        stats = {"policy_loss": sum(losses) / len(losses), "train_reward": rewards.mean().item(),
                 "trained_pairs": sigmas.numel()}
        # the policy's pass of each pair is trained: its backward too
        return stats, {"nfe": nfe, "backward_passes": sigmas.numel(),
                       "drm_calls": batch.scorer.calls}


def update_shadow(policy, shadow, decay):
    """The shadow copy (NFT's old policy, AWM's trust region) <- decay shadow + (1 - decay) policy,
    over the trained weights."""
    trained = dict(policy.named_parameters())
    with torch.no_grad():
        for name, weight in shadow.named_parameters():
            if trained[name].requires_grad:
                weight.copy_(decay * weight + (1 - decay) * trained[name])
