"""Held-out evaluation: ODE samples of fixed seeds, the base's annotator (the toy's simulated one),
diversity.

    python sample.py --eval                  # the held-out prompts' figures (evaluate_heldout)

train_policy.py evaluates its policy the same way every --eval_every updates (train_ops.py).
The second half measures the DRM where step-wise methods lean on it, on the policy's own samples
(`policy_pairs`, `candidate_ranking`; train_reward.py --eval_set=policy).
"""
import dataclasses
import json
import math
import os

import torch

from checkpoints import save_grid, write_text
from rivals.scores import SCORES
from sde import Sampler, initial_noise, propose, sample_ode, sigma_schedule, take


def generate(dit, base, prompts, seed=0, steps=20, cfg_scale=4.0, shift=1.0, batch_size=100):
    """ODE samples (N, C, H, W) on the CPU for the prompts, noise fixed by seed, base.finish-ed."""
    device = next(dit.parameters()).device
    noise = initial_noise(dit, len(prompts), torch.Generator().manual_seed(seed), base.latent_size)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond, uncond = base.encode(prompts[i:i + batch_size])
        x = noise[i:i + batch_size].to(device)
        out.append(base.finish(sample_ode(dit, x, cond, uncond, steps=steps, cfg_scale=cfg_scale,
                                                 shift=shift)))
    return torch.cat(out).cpu()


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


def evaluate_heldout(cfg, base, **sampling):
    """--eval: ODE samples of the held-out prompts, scored by the annotator: printed, grid, JSON."""
    prompts = base.heldout_prompts("", [])
    summary, _, images, _ = evaluate(base.dit, base, prompts, cfg.per_prompt, cfg.seed, **sampling)
    print(f"held-out prompts ({len(prompts)} x {cfg.per_prompt} images, {cfg.steps} steps, cfg "
          f"{cfg.cfg_scale}):")
    for key, value in summary.items():
        print(f"  {key:24s} {value:.4f}")
    shown = min(cfg.per_prompt, 8)  # a row of the first images of each prompt
    grid = images.view(len(prompts), cfg.per_prompt, *images.shape[1:])[:, :shown]
    save_grid(grid.flatten(0, 1), cfg.out, nrow=shown)
    write_text(os.path.splitext(cfg.out)[0] + ".json",
               json.dumps({"config": dataclasses.asdict(cfg),
                           "checkpoint_step": base.meta.get("step"), **summary}, indent=1))
    return summary


# -----------------------------------------------------------------------------
# The DRM on the policy's own samples, not on the preference pool:
#
#     python train_reward.py --eval_only --eval_set=policy --drm=data/drm.safetensors
#
# prints both tables (about 6 min). Two measurements (the toy; its annotator's gold is the truth):
# 1. `policy_pairs`: within-prompt pairs of the base's own 20-step ODE samples (guidance 4, the
#    evaluation's sampler), every pair of a prompt's samples, the first image the gold-preferred
#    one: train_reward.py then reports the DRM's accuracy by sigma on them as on the test pairs.
# 2. `candidate_ranking`: along SDE rollouts on the training grid (10 steps, noise 0.7, guidance
#    4), at each step k candidates around one policy mean, as step-wise GRPO draws them; each is
#    completed by the ODE to a clean image and judged. The Spearman correlation, within each
#    step's k, between the DRM's scores and the gold of the completions: scoring the noisy
#    candidate at sigma_next (the paper), its own clean estimate x_next - sigma_next v(x_next) at
#    sigma 0 (rivals/scores.py's "x0"), or the proxy x_next - sigma_next v(x) with the parent's
#    velocity ("x0_proxy"). Mean and s.e. over the rollouts, by step.


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
    x = initial_noise(base.dit, len(prompts), g, base.latent_size).to(device)
    rows = torch.arange(len(prompts), device=device)
    reward = lambda states, sigma, owners: drm(states, sigma, *take(drm_cond, owners))  # noqa: E731
    by_step = {"noisy": [], "x0": [], "x0_proxy": []}
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
