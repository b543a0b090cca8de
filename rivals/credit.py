"""The rival credit rules of GRPO, each as its authors' code computes it, and the table of credit
modes.

    advantages = CREDIT["cosine"].advantages(cfg, rollout, final_rewards)    # rivals/policy.py

Every mode is one entry of CREDIT: how its rollout is drawn (grpo.sample_rollout, or a tree) and
how its advantages (T, B, k) come from the rollout and the terminal DRM rewards.
- `stepwise` (DRM, the paper: grpo.py): k candidates a step, normalised within the k.
- `sparse` (Flow-GRPO, its scripts/train_sd3.py and stat_tracking.py): G whole trajectories a
  prompt; the DRM scores the final images; each trajectory's reward normalised within its prompt's
  group (the group's std, or with group_std="global" the update's: Flow-GRPO's SD3 configs) is the
  advantage of every step, good and bad alike.
- `cosine` (CoCA, arXiv 2505.19196, Lil-Shake/CoCA): as sparse, but the terminal advantage is
  spread over the steps by how much each moved the clean-image estimate x0_hat towards the final.
- `tree` (BranchGRPO, arXiv 2509.06040, Fredreic1849/BranchGRPO): a prompt's trajectories share
  their prefix and branch into b children at chosen steps, the split's noise scaled; leaves get
  the DRM's terminal reward, a node's value is the mean of its leaves', normalised with the other
  nodes of its depth (ddof 1); a step from one split to the next carries its child's advantage.
- windows (Flow-GRPO-Fast's random window, MixGRPO's sliding one, arXiv 2507.21802): only steps
  a..b-1 stochastic and trained, any mode (`window_at`).
"""
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from common import InputError, UserError, flag, used_with
from grpo import (Candidates, Rollout, group_normalise, in_window, sample_rollout,
                  stepwise_advantages, trained_steps)
from rivals.scores import score_rule
from sde import Step, passes, propose, sde_mean_std, take

TREE = used_with("rival.credit", "tree")  # a flag of the tree's, refused without it


@dataclass
class CreditFlags:
    """train_policy.py's flags of the rival credit rules (its Config holds them in its rival
    group: --credit=tree --split_steps=0,2)."""
    # stepwise (the paper's: grpo.py) | sparse (Flow-GRPO) | cosine (CoCA) | tree (BranchGRPO)
    credit: str = flag("stepwise", choices=("stepwise", "sparse", "cosine", "tree"))
    # sparse: divide by the group's std | global (the update's: Flow-GRPO's SD3 configs)
    group_std: str = flag("group", choices=("group", "global"), used=(
        lambda cfg: cfg.rival.credit == "sparse" or cfg.rival.objective != "ppo",
        "--credit=sparse or --objective=nft|awm"))
    # cosine: CoCA's window of steps. Its runs: 50 steps in 10 windows of 5 (config window_size 5,
    # num_steps 50); ours 10 steps, so 1: the same 10 windows (5 would leave 2, near sparse)
    coca_window: int = flag(1, "[1, inf)", used=used_with("rival.credit", "cosine"))
    # tree: where it branches (BranchGRPO's 0,3,6,9 of 20 halved)
    split_steps: tuple = flag((0, 1, 3, 4), "[0, inf)", used=TREE)
    # tree: children per split (branch^splits leaves a prompt)
    branch: int = flag(2, "[2, inf)", used=TREE)
    # tree: depth (BranchGRPO: a tree's nodes of a depth, ddof 1) | siblings (a split's children)
    tree_norm: str = flag("depth", choices=("depth", "siblings"), used=TREE)
    # tree: a split's children drawn with std split_noise x split_eta x sqrt(|dt|): BranchGRPO's
    # split step (its script: x4 on DanceGRPO's step, eta 0.3), their log-probs under our step's
    split_noise: float = flag(4.0, "(0, inf)", used=TREE)
    split_eta: float = flag(0.3, "(0, inf)", used=TREE)
    # where the sampler is stochastic and trained: "" every step | a:b steps a..b-1 | random:n
    # (Flow-GRPO-Fast: n steps from a start drawn each update in [0, steps/2 - n]) | slide:n:u
    # (MixGRPO: n steps from step (update - 1) // u on, cut at steps - 2, back to 0 past it)
    sde_window: str = ""


def per_prompt(cfg):
    """Trajectories a prompt: a tree's leaves, or --per_prompt (every other mode)."""
    if cfg.rival.credit == "tree":
        return cfg.rival.branch ** len(cfg.rival.split_steps)
    return cfg.per_prompt


def check_credit(cfg):
    """The flags that go together, before any work: the window, the tree's splits, the groups."""
    rival = cfg.rival
    kind, *window = parse_window(rival.sde_window, cfg.steps)
    trained = [i for i, t in enumerate(trained_steps(cfg.steps, window if kind == "fixed" else None,
                                                     cfg.train_last_step)) if t]
    if not trained:
        raise UserError(f"--sde_window={rival.sde_window} trains no step: the last of "
                        f"--steps={cfg.steps} is not trained unless --train_last_step")
    a, b = trained[0], trained[-1] + 1
    splits = list(rival.split_steps)
    if rival.credit == "tree" and kind in ("random", "slide"):
        raise UserError(f"--credit=tree --sde_window={rival.sde_window}: a tree splits at fixed "
                        "steps; give it a fixed window a:b or none")
    if rival.credit == "tree" and not (splits and splits == sorted(set(splits))
                                       and a <= splits[0] and splits[-1] < b):
        raise UserError(f"--split_steps={','.join(map(str, splits))}: give increasing steps in "
                        f"[{a}, {b}), the trained ones (--steps, --sde_window, --train_last_step)")
    if cfg.trajectories % per_prompt(cfg):
        group = "--per_prompt" if rival.credit != "tree" else "--branch^splits"
        raise UserError(f"--trajectories={cfg.trajectories} must be a multiple of "
                        f"{group}={per_prompt(cfg)}")


class Mode(NamedTuple):
    """A rival credit mode: its rollout(cfg, batch, window) -> Rollout, its advantages(cfg,
    rollout, final_rewards, rows, gather) -> (T, B, k), and whether it needs the DRM's rewards of
    the final images (terminal)."""
    rollout: Callable
    advantages: Callable
    terminal: bool

# -----------------------------------------------------------------------------
# Sparse (Flow-GRPO) and cosine (CoCA): one reward a trajectory


def terminal_advantages(final_rewards, group_size, eps=1e-4, group_std="group"):
    """final_rewards (B,) of B = prompts x group_size trajectories (a prompt's group adjacent) ->
    (B,) less their group's mean, over the group's std (group_std="group") or the std of all B
    (group_std="global": Flow-GRPO's SD3 configs, global_std=True), + eps."""
    if group_size < 2 or final_rewards.shape[0] % group_size:
        raise InputError(f"{final_rewards.shape[0]} trajectories do not split into groups of "
                         f"{group_size} >= 2")
    groups = final_rewards.view(-1, group_size)
    if group_std == "global":
        return ((groups - groups.mean(1, keepdim=True)) / (final_rewards.std(correction=0) + eps)
                ).flatten()
    return group_normalise(groups, dim=1, eps=eps).flatten()


def cosine_weights(x0_hat, final, window=5, eps=1e-6):
    """CoCA's per-step credit weights (T, B), summing to 1 over each trajectory, as
    Lil-Shake/CoCA's pipeline_with_logprob_coca.py computes them.

    c_t = cos(x0_hat_t, final) for t < T, and c_T = cos(final, final) = 1: how much of the final
    image the state of step t already predicts. Steps form windows of `window`; a window's gain is
    the mean of its c_{t+1} minus the previous window's mean (c_0 for the first), not clamped (a
    window that moved away is debited); a step's weight is its window's gain / (sum of the gains x
    the window's size). Where CoCA's code has no answer: a last window shorter than `window`
    divides by its own size; a sum of gains <= eps (CoCA divides by zero, or by a negative sum
    that flips every sign) gives 1 / T each.
    """
    T, B = x0_hat.shape[:2]
    estimates = torch.cat([x0_hat, final.unsqueeze(0)]).flatten(2)                 # (T + 1, B, D)
    cos = torch.nn.functional.cosine_similarity(estimates, final.flatten(1)[None], dim=2)
    windows = torch.arange(T, device=cos.device) // window                         # each step's
    sizes = torch.bincount(windows).to(cos.dtype).unsqueeze(1)                     # (W, 1)
    means = cos.new_zeros(len(sizes), B).index_add_(0, windows, cos[1:]) / sizes
    gains = means - torch.cat([cos[:1], means[:-1]])                               # (W, B)
    total = gains.sum(0, keepdim=True)
    weights = (gains / (total * sizes))[windows]                                   # (T, B)
    return torch.where(total > eps, weights, torch.full_like(weights, 1 / T))


def cosine_advantages(weights, final_rewards, group_size, adv_clip, eps=1e-6):
    """CoCA's advantages (T, B) from its weights (T, B) and the terminal rewards (B,), as its
    scripts/train_coca.py: the terminal reward normalised per prompt and clipped to +-adv_clip,
    times the reward-to-go (the weights summed from step t on), then normalised again per prompt
    over its trajectories and steps. CoCA keeps its statistics across epochs; we, as every mode
    here, within the update."""
    T = weights.shape[0]
    advantage = terminal_advantages(final_rewards, group_size, eps).clamp(-adv_clip, adv_clip)
    shaped = weights.flip(0).cumsum(0).flip(0) * advantage                         # (T, B)
    by_prompt = shaped.T.reshape(-1, group_size * T)        # a prompt's trajectories x steps: a row
    return group_normalise(by_prompt, dim=1, eps=eps).view(-1, T).T

# -----------------------------------------------------------------------------
# Trees (BranchGRPO)


def split_std_scale(sigma, sigma_next, noise_level, split_noise, split_eta):
    """A split's noise over our SDE step's std at (sigma, sigma_next), so that the children are
    drawn with BranchGRPO's split std: split_noise x split_eta x sqrt(sigma - sigma_next).

    BranchGRPO (its train_branchgrpo_flux.py, flux_step_with_split) takes DanceGRPO's step, whose
    std is eta sqrt(dsigma) (a constant diffusion coefficient, eta 0.3), and multiplies a split's
    noise by split_noise_scale (its script: 4.0): 0.16-0.23 at its splits 0, 3, 6, 9 of 20 steps
    (shift 3). Our step's std, noise_level sqrt(sigma / (1 - sigma)) sqrt(dsigma) (Flow-GRPO's),
    is 0.66 at sigma 1 on 10 steps: x4 of that (2.6) would bury the state. The children's
    log-probs stay under our step's std, as BranchGRPO's under its unscaled one."""
    one = torch.zeros(1, 1, dtype=torch.float64)
    _, std = sde_mean_std(one, one, sigma, sigma_next, noise_level)
    return (split_noise * split_eta * math.sqrt(float(sigma - sigma_next)) / std).item()


@torch.no_grad()
def sample_tree(sampler, noise, *, split_steps, branch, noise_level=0.7, split_noise=4.0,
                split_eta=0.3, window=None, train_last=False, draws=None):
    """Tree rollouts: from each of R root noises (R, C, H, W) one trajectory that branches into
    `branch` children, which all go on, at each step of split_steps -> a Rollout over its
    L = R branch^m leaves (m splits; a root's leaves adjacent, each node's leaves contiguous),
    every leaf's path in full: shared prefixes repeated, `trained` marking each edge once (on the
    first leaf below it), from the first split on, at trained_steps. The policy runs once a
    node. A split's children are drawn with BranchGRPO's std, split_noise x split_eta x
    sqrt(|dt|) (split_std_scale), their log-probs under the step's own std. draws as
    sample_rollout's (every rank the same R)."""
    sigmas, cond, uncond, cfg_scale = (sampler.sigmas, sampler.cond, sampler.uncond,
                                       sampler.cfg_scale)
    T, leaves = len(sigmas) - 1, noise.shape[0] * branch ** len(split_steps)
    sde, trained_at = in_window(T, window), trained_steps(T, window, train_last)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    rows = torch.arange(len(x), device=x.device)                    # each node's root: its prompt
    states, steps, trained, nfe = [], [], [], 0
    for i in range(T):
        step = propose(sampler.rows(rows), x, i, noise_level=noise_level if sde[i] else 0.0,
                       k=branch if i in split_steps else 1, draws=draws,
                       noise_scale=(split_std_scale(sigmas[i], sigmas[i + 1], noise_level,
                                                    split_noise, split_eta)
                                    if i in split_steps and sde[i] else 1.0))
        nfe += len(x) * passes(uncond, cfg_scale)
        per_node = leaves // len(x)                                 # leaves below each node
        states.append(x.repeat_interleave(per_node, 0))
        x, rows = step.candidates.flatten(0, 1), rows.repeat_interleave(step.candidates.shape[1])
        below = leaves // len(x)                                    # leaves below each child
        steps.append(Step(x.repeat_interleave(below, 0).unsqueeze(1),
                          step.log_probs.flatten().repeat_interleave(below).unsqueeze(1),
                          step.mean.repeat_interleave(per_node, 0),
                          step.x0_hat.repeat_interleave(per_node, 0),
                          step.velocity.repeat_interleave(per_node, 0)))
        first_edge = torch.arange(leaves) % below == 0
        trained.append(first_edge & trained_at[i] & (i >= min(split_steps)))
    stack = lambda name: torch.stack([getattr(s, name) for s in steps])  # noqa: E731
    return Rollout(states=torch.stack(states), candidates=stack("candidates"),
                   means=stack("mean"), log_probs=stack("log_probs"),
                   chosen=torch.zeros(T, leaves, dtype=torch.long), x0_hat=stack("x0_hat"),
                   final=x, rewards=None, sigmas=sigmas, cond=take(cond, rows),
                   uncond=take(uncond, rows), noise_level=noise_level, cfg_scale=cfg_scale,
                   trained=torch.stack(trained), nfe=nfe)


def tree_advantages(final_rewards, split_steps, branch, T, by="depth"):
    """final_rewards (L,) of sample_tree's leaves -> advantages (T, L, 1). At level j (after the
    j-th split) a node's value is the mean of its leaves' rewards. by="depth" (BranchGRPO, its
    train_branchgrpo_flux.py): all of a root's level-j nodes normalised together, with torch's
    unbiased std (ddof 1) and eps 1e-8, a level whose std is below 1e-6 getting 0; by="siblings":
    the b children of each node among themselves (ddof 0, eps 1e-4, as group_normalise; with b = 2
    every advantage is +-1). A step from split j up to split j + 1 carries its child's, level j's,
    advantage; the steps before the first split, 0."""
    m = len(split_steps)
    leaves = final_rewards.view(-1, branch ** m)                    # (R, b^m): a root's leaves
    advantages = final_rewards.new_zeros(T, *leaves.shape)
    bounds = [*sorted(split_steps), T]
    for j in range(1, m + 1):
        values = leaves.view(len(leaves), branch ** j, -1).mean(2)  # (R, b^j): level j's nodes
        if by == "siblings":
            level = group_normalise(values.view(len(leaves), -1, branch), dim=-1)
        else:
            mean, std = values.mean(1, keepdim=True), values.std(1, keepdim=True)
            level = torch.where(std < 1e-6, 0.0, (values - mean) / (std + 1e-8))
        level = level.reshape(len(leaves), -1)
        advantages[bounds[j - 1]:bounds[j]] = level.repeat_interleave(branch ** (m - j), 1)
    return advantages.view(T, -1, 1)

# -----------------------------------------------------------------------------
# The credit modes: a rollout of train_policy.draw_batch's batch, its advantages


def stepwise_rollout(cfg, batch, window):
    """The paper's rollout (grpo.sample_rollout) with a rival's score rule or window."""
    candidates = Candidates(cfg.k, batch.scorer, score_rule(cfg.rival.score), cfg.follow)
    return sample_rollout(batch.sampler, batch.noise, noise_level=cfg.noise_level,
                          candidates=candidates, window=window, train_last=cfg.train_last_step,
                          draws=batch.draws)


def chain_rollout(cfg, batch, window):
    """One SDE trajectory a row of noise, scored at its end only."""
    return sample_rollout(batch.sampler, batch.noise, noise_level=cfg.noise_level, window=window,
                          train_last=cfg.train_last_step, draws=batch.draws)


def tree_rollout(cfg, batch, window):
    """A prompt's leaves grow from one root, its first noise (a prompt's leaves adjacent)."""
    roots, rival = slice(None, None, per_prompt(cfg)), cfg.rival
    return sample_tree(batch.sampler.rows(roots), batch.noise[roots],
                       split_steps=rival.split_steps, branch=rival.branch,
                       noise_level=cfg.noise_level, split_noise=rival.split_noise,
                       split_eta=rival.split_eta, window=window, train_last=cfg.train_last_step,
                       draws=batch.draws)


def stepwise(cfg, rollout, final_rewards, rows=slice(None), gather=lambda t: t):
    return stepwise_advantages(rollout.rewards)


def sparse(cfg, rollout, final_rewards, rows=slice(None), gather=lambda t: t):
    advantages = terminal_advantages(final_rewards, cfg.per_prompt, group_std=cfg.rival.group_std)
    return advantages[rows].expand(rollout.states.shape[0], -1).unsqueeze(-1)


def cosine(cfg, rollout, final_rewards, rows=slice(None), gather=lambda t: t):
    weights = gather(cosine_weights(rollout.x0_hat, rollout.final,
                                    cfg.rival.coca_window).T.contiguous()).T
    advantages = cosine_advantages(weights, final_rewards, cfg.per_prompt, cfg.adv_clip)
    return advantages[:, rows].unsqueeze(-1)


def tree(cfg, rollout, final_rewards, rows=slice(None), gather=lambda t: t):
    T = rollout.states.shape[0]
    advantages = tree_advantages(final_rewards, cfg.rival.split_steps, cfg.rival.branch, T,
                                 cfg.rival.tree_norm)
    return advantages[:, rows]


# every credit mode: its rollout, its advantages, whether it needs the final images' DRM rewards
# ("stepwise" is the paper's with a rival's score rule or SDE window)
CREDIT = {
    "stepwise": Mode(stepwise_rollout, stepwise, terminal=False),
    "sparse": Mode(chain_rollout, sparse, terminal=True),
    "cosine": Mode(chain_rollout, cosine, terminal=True),
    "tree": Mode(tree_rollout, tree, terminal=True),
}

# -----------------------------------------------------------------------------
# Windows: only some steps stochastic and trained (Flow-GRPO-Fast, MixGRPO)


def parse_window(text, steps):
    """--sde_window -> ("all",), ("fixed", a, b), ("random", n) or ("slide", n, every), checked
    against --steps."""
    kind, _, rest = text.partition(":") if ":" in text else ("", "", "")
    T = steps
    if not text:
        return ("all",)
    if kind in ("random", "slide"):
        numbers = rest.split(":")
        if not all(n.isdigit() for n in numbers) or len(numbers) != (1 if kind == "random" else 2):
            raise UserError(f"--sde_window={text}: give random:n or slide:n:every, e.g. random:3 "
                            "(Flow-GRPO-Fast) or slide:2:12 (MixGRPO)")
        n, *every = map(int, numbers)
        top = T // 2 if kind == "random" else T - 2  # Flow-GRPO-Fast's range (0, num_steps // 2)
        if top < 1:
            raise UserError(f"--sde_window={text}: a {kind} window needs --steps >= "
                            f"{2 if kind == 'random' else 3} (its range is the first "
                            f"{'half' if kind == 'random' else 'steps - 2'} of the steps)")
        if not 1 <= n <= top or every == [0]:
            raise UserError(f"--sde_window={text}: n in [1, {top}] for --steps={T}, every >= 1")
        return (kind, n, *every)
    bounds = rest and text.split(":")
    if not (bounds and len(bounds) == 2 and all(b.isdigit() for b in bounds)
            and 0 <= int(bounds[0]) < int(bounds[1]) <= T):
        raise UserError(f"--sde_window={text}: give a:b, 0 <= a < b <= --steps={T}, or random:n, "
                        "slide:n:every")
    return ("fixed", int(bounds[0]), int(bounds[1]))


def window_at(window, steps, update, generator):
    """The SDE window (a, b) of an update, or None (every step), from parse_window's `window`.
    random: Flow-GRPO-Fast's window of n steps, its start uniform in [0, steps // 2 - n], one draw
    an update for all its trajectories (its code: one a GPU batch); slide: MixGRPO's, which moves
    one step every `every` updates through [0, steps - 2) (it never trains the last two steps) and
    rolls back to 0 past the end (MixGRPO idles one interval with an empty window first; we roll
    back at once)."""
    kind, *numbers = window
    if kind == "all":
        return None
    if kind == "fixed":
        return tuple(numbers)
    if kind == "random":
        n = numbers[0]
        start = int(torch.randint(steps // 2 - n + 1, (1,), generator=generator))
        return start, start + n
    n, every = numbers
    start = (update - 1) // every % (steps - 2)
    return start, min(start + n, steps - 2)
