"""The DRM where step-wise methods lean on it: on the policy's own samples, not on the preference
pool.

    python train_reward.py --eval_only --eval_set=policy --drm=data/drm.safetensors # both tables
    (about 6 min)

Two measurements (the toy; its annotator's gold is the truth):
1. `policy_pairs`: within-prompt pairs of the base's own 20-step ODE samples (guidance 4, the
evaluation's
   sampler), every pair of a prompt's samples, the first image the gold-preferred one:
   train_reward.py then reports the DRM's accuracy by sigma on them as on the test pairs.
2. `candidate_ranking`: along SDE rollouts on the training grid (10 steps, noise 0.7, guidance 4),
at each
   step k candidates around one policy mean, as step-wise GRPO draws them; each is completed by the
   ODE to a clean image and judged. The Spearman correlation, within each step's k, between the
   DRM's scores and the gold of the completions: scoring the noisy candidate at sigma_next (the
   paper), or its clean estimate x_next - sigma_next v at sigma 0 (grpo.score_candidates' "x0").
   Mean and s.e. over the rollouts, by step.
"""
import math

import torch

from rivals.scores import SCORES
from sample import generate
from sde import Sampler, propose, sigma_schedule, take


def policy_pairs(base, prompts, per_prompt=8, seed=4321, steps=20, cfg_scale=4.0):
    """Every within-prompt pair of per_prompt ODE samples of each prompt -> (winners, losers (N, C,
    H, W), their prompts (N,), gold (N, 2)), the gold-preferred image first (ties dropped)."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    samples = generate(base.dit, base, repeated, seed=seed, steps=steps, cfg_scale=cfg_scale)
    gold = base.judge(base.to_images(samples), repeated)["gold"].float()
    winners, losers, pair_prompts, pair_gold = [], [], [], []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            for j in range(i + 1, per_prompt):
                a, b = p * per_prompt + i, p * per_prompt + j
                if gold[a] == gold[b]:
                    continue
                first, second = (a, b) if gold[a] > gold[b] else (b, a)
                winners.append(samples[first])
                losers.append(samples[second])
                pair_prompts.append(prompt)
                pair_gold.append((gold[first].item(), gold[second].item()))
    return torch.stack(winners), torch.stack(losers), pair_prompts, torch.tensor(pair_gold)


def spearman(a, b):
    """Spearman's rank correlation of each row of a against the same row of b: (G, k) -> (G,)."""
    ranks = lambda x: x.argsort(1).argsort(1).double()  # noqa: E731  (continuous scores: no ties)
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


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
    x = torch.randn(len(prompts), base.dit.config.in_channels, base.latent_size, base.latent_size,
                    generator=g).to(device)
    rows = torch.arange(len(prompts), device=device)
    reward = lambda states, sigma, owners: drm(states, sigma, *take(drm_cond, owners))  # noqa: E731
    by_step = {"noisy": [], "x0": []}
    for i in range(steps):
        step = propose(base.dit, x, sigmas[i], sigmas[i + 1], cond, uncond, cfg_scale=cfg_scale,
                       noise_level=noise_level, k=k, generator=g)
        sampler = Sampler(base.dit, sigmas, cond, uncond, cfg_scale)
        completions = []  # each candidate's ODE completion (the lookahead rule's), judged below
        SCORES["lookahead"](lambda states, sigma, owners: completions.append(states) or sigma, step,
                            i, rows, sampler)
        completed, owners = completions[0], rows.repeat_interleave(k)
        truth = base.judge(base.to_images(base.finish(completed)),
                           [prompts[o] for o in owners.tolist()])["gold"]
        truth = truth.float().view(len(prompts), k).cpu()
        for score in by_step:
            scores, _ = SCORES[score](reward, step, i, rows, sampler)
            rho = spearman(scores.cpu(), truth)
            by_step[score].append((rho.mean().item(), rho.std().item() / math.sqrt(len(rho))))
        x = step.candidates[rows, torch.randint(k, (len(prompts),), generator=g).to(device)]
    return by_step
