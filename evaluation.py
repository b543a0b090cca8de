"""Held-out evaluation: ODE samples of fixed seeds, the base's annotator (the toy's simulated one),
diversity.

    python sample.py --eval                  # the held-out prompts' figures (evaluate_heldout)

train_policy.py evaluates its policy the same way every --eval_every updates (train_ops.py).
The second half measures the DRM where step-wise methods lean on it, on the policy's own samples
(`policy_pairs`; train_reward.py --eval_set=policy).
"""
import dataclasses
import json
import os

import torch

from checkpoints import write_text
from common import check_fits, flag, flag_values
from images import save_grid
from sde import initial_noise, latent_bytes, sample_ode


@dataclasses.dataclass
class EvalFlags:
    """train_policy.py's flags of its held-out evaluation (its Config holds them as one group)."""
    eval_prompts: str = ""             # held-out prompts (the toy: its 10; SD3: 8 of --prompts)
    eval_every: int = flag(20, "[1, inf)")
    eval_per_prompt: int = flag(8, "[1, inf)")  # ODE samples per held-out prompt an evaluation
    eval_steps: int = flag(20, "[1, inf)")
    eval_cfg_scale: float = flag(4.0, "[0, inf)")  # guidance of the held-out evaluation samples
    # a second held-out evaluation at this guidance, logged as gold_cfgW, drm_cfgW, ... (NFT's and
    # AWM's authors evaluate at 1, as they train: their recipe sets it)
    also_eval_cfg_scale: float = flag(0.0, "[0, inf)", zero="none")


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
    device = next(dit.parameters()).device
    check_fits(2 * len(prompts) * per_prompt * latent_bytes(dit, base.latent_size),
               f"{len(prompts)} prompts x {per_prompt} held-out samples", device)  # and images
    repeated = [p for p in prompts for _ in range(per_prompt)]
    samples = generate(dit, base, repeated, seed=seed, batch_size=batch_size, **sampling)
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
               json.dumps({"config": flag_values(cfg),
                           "checkpoint_step": base.meta.get("step"), **summary}, indent=1))
    return summary


# -----------------------------------------------------------------------------
# The DRM on the policy's own samples, not on the preference pool:
#
#     python train_reward.py --eval_only --eval_set=policy --drm=data/drm.safetensors
#
# prints two tables (about 6 min; the toy, its annotator's gold the truth). `policy_pairs`:
# within-prompt pairs of the base's own 20-step ODE samples (guidance 4, the evaluation's sampler),
# every pair of a prompt's samples, the first image the gold-preferred one: train_reward.py then
# reports the DRM's accuracy by sigma on them as on the test pairs. The other table, how the score
# rules rank a step's candidates, is rivals/scores.py's candidate_ranking.


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
