"""Step-wise GRPO on a flow-matching model: SDE rollouts with exact log-probs, credit, the PPO loss.

    rollout = sample_rollout(policy, noise, cond, uncond, sigmas, noise_level=0.7, k=4, reward=drm)
    advantages = stepwise_advantages(rollout.rewards)      # the paper: DRM score of each candidate
    loss, stats = grpo_loss(policy, rollout, advantages, step_ids, rows, clip_range=1e-3)

1. The ODE-to-SDE step (Flow-GRPO, Liu et al. 2025). The Euler step of the flow ODE,
   x_next = x + dt v, is deterministic, so it has no log-probability to push on. Flow-GRPO
   replaces it by an SDE with the same marginals; one step is Gaussian:

       sigma_t = a sqrt(sigma / (1 - sigma))                                  (a = noise_level)
       mean    = x + dt (v + sigma_t^2 / (2 sigma) (x + (1 - sigma) v)),   dt = sigma_next - sigma
       std     = sigma_t sqrt(-dt)
       x_next  = mean + std z,   z ~ N(0, I)

   (x + (1 - sigma) v is the model's estimate of the noise: the added term is the score
   correction that keeps the marginals while noise is injected.) a = 0 gives back the Euler
   step. The log-density of x_next under N(mean, std^2) is what GRPO's importance ratio needs;
   as Flow-GRPO we average it over pixels. `propose` is the one primitive every sampler is made
   of: one policy pass, k candidates around its one mean, their log-probs.

2. Credit. GRPO normalises rewards within a group of samples that share a starting point, so
   the group mean is the baseline (no value network).
   - `stepwise` (DRM, the paper): at every trained step the policy's one mean spawns k candidate
     next states; the DRM scores each at sigma_next (it can judge noisy states); advantages are
     normalised within those k, so a step is credited for what it did.
   - `sparse` (Flow-GRPO): G whole trajectories per prompt; the DRM scores the final images;
     each trajectory's normalised reward is the advantage of all its steps, good and bad alike.
   - `cosine` (CoCA, arXiv 2505.19196): as sparse, but the terminal advantage is spread over the
     steps by how much each moved the clean-image estimate x0_hat towards the final image.
   - `tree` (BranchGRPO, arXiv 2509.06040; TreeGRPO, arXiv 2512.08153): a prompt's trajectories
     share their prefix and branch into b children at chosen steps; leaves get the DRM's terminal
     reward, a node's value is the mean of its leaves'. The b children of one node are a group
     (they share a starting state, as stepwise's k candidates), so each split's children are
     normalised among their siblings; the steps after a split, up to the next, carry their
     child's advantage (`tree_advantages`).
   A window (Flow-GRPO-Fast, MixGRPO arXiv 2507.21802) makes only steps a..b-1 stochastic and
   trained, any mode: the same DiT passes a rollout, fewer steps to train, less variance. In every
   mode the last step (sigma 0.001 -> 0) is sampled but not trained, as Flow-GRPO: its std is so
   small that float32's rounding of the state is 1e-4 of it (`trained_steps`).

3. The loss: PPO's clipped importance ratio per (state, next state) pair,
   r = exp(log p_theta(x_next | x) - log p_old(x_next | x)), loss = -min(r A, clip(r, 1 +- eps) A),
   plus an optional KL to the frozen reference policy, which between two Gaussians of equal std
   is ||mean - mean_ref||^2 / (2 std^2).
"""
import math
from dataclasses import dataclass

import torch

from model import guided_velocity

CREDIT_MODES = ("stepwise", "sparse", "cosine", "tree")

# -----------------------------------------------------------------------------
# 1. The SDE step and its log-probability (float32 inside, float64 for float64 inputs)


def sde_mean_std(x, velocity, sigma, sigma_next, noise_level):
    """The Gaussian of one SDE step -> (mean (B, ...), std (B, 1, ..., 1)), float32 or wider.

    sigma, sigma_next: floats or (B,) tensors. At sigma = 1 the factor 1 / (1 - sigma) would be
    infinite; as Flow-GRPO, sigma_next (the schedule's next value) replaces sigma there.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, velocity = x.to(dtype), velocity.to(dtype)
    shape = (-1,) + (1,) * (x.dim() - 1)
    sigma, sigma_next = (torch.as_tensor(s, dtype=dtype, device=x.device).expand(x.shape[0])
                         .reshape(shape) for s in (sigma, sigma_next))
    # BEGIN SOLUTION ex3_sde_step: the docstring's sigma_t, mean and std (dt < 0); mind sigma = 1
    dt = sigma_next - sigma
    sigma_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x + dt * (velocity + sigma_t ** 2 / (2 * sigma) * (x + (1 - sigma) * velocity))
    return mean, sigma_t * torch.sqrt(-dt)
    # END SOLUTION


def gaussian_log_prob(sample, mean, std):
    """log N(sample; mean, std^2) averaged over all dimensions but the first: (B, ...) -> (B,).
    Only the mean carries gradient: the sample is a fixed action."""
    # BEGIN SOLUTION ex3_sde_step: the log-density per element, then the mean over all but the batch
    log_density = (-(sample.detach().to(mean.dtype) - mean) ** 2 / (2 * std ** 2)
                   - torch.log(std) - 0.5 * math.log(2 * math.pi))
    return log_density.flatten(1).mean(1)
    # END SOLUTION


def candidate_log_probs(candidates, mean, std):
    """Log-probs (N, k) of k candidates (N, k, ...) drawn around one mean (N, ...) each."""
    k = candidates.shape[1]
    return gaussian_log_prob(candidates.flatten(0, 1), mean.repeat_interleave(k, 0),
                             std.repeat_interleave(k, 0)).view(-1, k)


def sde_step(x, velocity, sigma, sigma_next, noise_level, noise=None):
    """One Flow-GRPO step from x (B, ...) -> (x_next, log_prob, mean, std). noise (B, ...): one
    next state, log_prob (B,); noise (B, k, ...): k candidates around the one mean, x_next
    (B, k, ...), log_prob (B, k). noise_level = 0: the Euler step (x_next = mean, log_prob 0)."""
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, noise_level)
    if noise_level == 0:
        return mean, torch.zeros(x.shape[0], device=x.device), mean, std
    if noise is None:
        noise = torch.randn_like(mean)
    if noise.dim() == x.dim():
        x_next = mean + std * noise.to(mean.dtype)
        return x_next, gaussian_log_prob(x_next, mean, std), mean, std
    x_next = mean.unsqueeze(1) + std.unsqueeze(1) * noise.to(mean.dtype)          # (B, k, ...)
    return x_next, candidate_log_probs(x_next, mean, std), mean, std


def draw_noise(n, k, shape, generator=None, shard=(0, 1), device=None):
    """N(0, I) of shape (n, k, *shape): every sampler's one random-number convention. Drawn on the
    CPU (a seed gives the same noise on any device) for all world * n rows, this process's n kept
    (shard = (rank, world) under torchrun): the ranks together draw what one process draws."""
    rank, world = shard
    noise = torch.randn((world * n, k, *shape), generator=generator)
    return noise[rank * n:(rank + 1) * n].to(device)


@dataclass
class Step:
    """One denoising step from B states: k candidates around the step's one mean."""
    candidates: torch.Tensor   # (B, k, C, H, W); noise_level 0: (B, 1, ...), the Euler step's
    log_probs: torch.Tensor    # (B, k) under the policy that proposed them
    mean: torch.Tensor         # (B, C, H, W)
    x0_hat: torch.Tensor       # (B, C, H, W): the clean-image estimate x - sigma v of the states
    velocity: torch.Tensor     # (B, C, H, W): the guided velocity v at the states


def propose(policy, x, sigma, sigma_next, cond, uncond, *, cfg_scale, noise_level, k=1,
            generator=None, shard=(0, 1), noise_scale=1.0):
    """The primitive every sampler and rollout is made of: from states x (B, ...) at sigma, one
    guided policy pass and k candidates for sigma_next around its one mean -> Step.
    noise_scale: the candidates drawn with noise_scale x std, their log-probs taken under the
    step's own std (BranchGRPO's split steps)."""
    velocity = guided_velocity(policy, x, sigma, cond, uncond, cfg_scale).to(x.dtype)
    noise = (noise_scale * draw_noise(x.shape[0], k, x.shape[1:], generator, shard, x.device)
             if noise_level else None)
    candidates, log_probs, mean, _ = sde_step(x, velocity, sigma, sigma_next, noise_level, noise)
    if noise is None:
        candidates, log_probs = candidates.unsqueeze(1), log_probs.unsqueeze(1)
    return Step(candidates, log_probs, mean, x - sigma * velocity, velocity)


SCORES = ("noisy", "x0", "lookahead")


def score_candidates(reward, step, sigmas, i, rows, *, score="noisy", policy=None, cond=None,
                     uncond=None, cfg_scale=1.0):
    """The DRM's scores (B, k) of step i's k candidates x_next (B, k, ...), and the DiT passes
    it spent. reward(x (N, ...), sigma (N,), rows (N,)) scores N states of the prompts `rows`;
    rows (B,): each state's. What the DRM sees, by `score`:
      noisy      x_next at sigma_next: the paper (a noisy-latent reward, no extra pass)
      x0         x_next - sigma_next v at sigma 0: the candidate's clean estimate from the step's
                 own velocity v (no extra pass; at noise level 0 it is the state's x0_hat)
      lookahead  the Euler ODE from x_next down the rest of the grid, at sigma 0: DenseGRPO's
                 step reward (arXiv 2601.20218, n = t); each candidate costs the remaining steps'
                 guided passes (policy, cond, uncond (B, ...), cfg_scale are needed)
    """
    B, k = step.candidates.shape[:2]
    x, passes_spent = step.candidates.flatten(0, 1), 0
    owners = rows.repeat_interleave(k)
    sigma = sigmas[i + 1].expand(B * k)
    if score == "x0":
        x = x - sigmas[i + 1] * step.velocity.repeat_interleave(k, 0)
        sigma = torch.zeros_like(sigma)
    elif score == "lookahead":
        context = take(cond, torch.arange(B, device=x.device).repeat_interleave(k))
        empty = take(uncond, torch.arange(B, device=x.device).repeat_interleave(k))
        for j in range(i + 1, len(sigmas) - 1):
            v = guided_velocity(policy, x, sigmas[j], context, empty, cfg_scale).to(x.dtype)
            x = x + (sigmas[j + 1] - sigmas[j]) * v
            passes_spent += B * k * passes(uncond, cfg_scale)
        sigma = torch.zeros_like(sigma)
    elif score != "noisy":
        raise ValueError(f"score={score!r}: choose one of {', '.join(SCORES)}")
    return reward(x, sigma, owners).float().view(B, k), passes_spent

# -----------------------------------------------------------------------------
# Rollouts: a trajectory per row of noise; with k > 1 every step branches into k candidates


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


def passes(uncond, cfg_scale):
    """Forward passes of one guided velocity (model.guided_velocity): 2, or 1 unguided."""
    return 2 if uncond is not None and cfg_scale != 1 else 1


@torch.no_grad()
def sample_rollout(policy, noise, cond, uncond, sigmas, *, noise_level=0.7, cfg_scale=1.0, k=1,
                   reward=None, score="noisy", follow="random", window=None, train_last=False,
                   generator=None, picks=None, shard=(0, 1)):
    """SDE trajectories from noise (B, C, H, W) along sigmas (T + 1,) -> Rollout. k > 1: at
    each trained step, k candidates share the step's one policy mean; the DRM scores them
    (score_candidates: reward(x (N, ...), sigma (N,), rows (N,)), rows: each state's trajectory,
    for its prompt) and the trajectory goes on from a random candidate (the paper's) or the best
    (follow="best"). window=(a, b): steps a..b-1 as above and trained; the others Euler steps,
    k = 1, untrained. train_last=False: the last step is an SDE step with one candidate, unscored
    and untrained (trained_steps). generator: the SDE noise; picks: the random candidate picks
    (default: generator). shard=(rank, world): these B are rows rank*B..(rank+1)*B of world*B
    (torchrun); the random draws are made for all world*B and sliced, so the ranks together
    sample what one process would.
    """
    if follow not in ("random", "best"):
        raise ValueError(f"follow={follow!r}: choose random or best")
    if k > 1 and reward is None:
        raise ValueError("k > 1 candidates need a reward function to score them")
    (B, T), (rank, world) = (noise.shape[0], len(sigmas) - 1), shard
    sde, trained = in_window(T, window), trained_steps(T, window, train_last)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    states, steps, chosen, rewards = [], [], [], []
    rows, nfe = torch.arange(B, device=noise.device), B * T * passes(uncond, cfg_scale)
    for i in range(T):
        step = propose(policy, x, sigmas[i], sigmas[i + 1], cond, uncond, cfg_scale=cfg_scale,
                       noise_level=noise_level if sde[i] else 0.0, k=k if trained[i] else 1,
                       generator=generator, shard=shard)
        pick = torch.zeros(B, dtype=torch.long, device=x.device)
        if reward is not None and k > 1:  # stepwise: the DRM's scores (0 at untrained steps)
            rewards.append(torch.zeros(B, k, device=x.device))
            if trained[i]:
                rewards[-1], spent = score_candidates(
                    reward, step, sigmas, i, rows, score=score, policy=policy, cond=cond,
                    uncond=uncond, cfg_scale=cfg_scale)
                nfe += spent
                stream = generator if picks is None else picks
                drawn = torch.randint(k, (world * B,), generator=stream)
                pick = (rewards[-1].argmax(1) if follow == "best"
                        else drawn[rank * B:(rank + 1) * B].to(x.device))
        states.append(x)
        steps.append(step)
        chosen.append(pick)
        x = step.candidates[torch.arange(B, device=x.device), pick]
    def stack(name, widen=False):  # widen: an Euler step's one candidate, k times (window)
        parts = [getattr(step, name) for step in steps]
        return torch.stack([p.expand(B, k, *p.shape[2:]) for p in parts] if widen else parts)
    return Rollout(torch.stack(states), stack("candidates", True), stack("mean"),
                   stack("log_probs", True), torch.stack(chosen), stack("x0_hat"), x,
                   torch.stack(rewards) if rewards else None, sigmas, cond, uncond, noise_level,
                   cfg_scale, torch.tensor(trained).unsqueeze(1).expand(T, B), nfe)


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


@torch.no_grad()
def sample_tree(policy, noise, cond, uncond, sigmas, *, split_steps, branch, noise_level=0.7,
                cfg_scale=1.0, split_noise=1.0, window=None, train_last=False, generator=None,
                shard=(0, 1)):
    """Tree rollouts: from each of R root noises (R, C, H, W) one trajectory that branches into
    `branch` children, which all go on, at each step of split_steps -> a Rollout over its
    L = R branch^m leaves (m splits; a root's leaves adjacent, each node's leaves contiguous),
    every leaf's path in full: shared prefixes repeated, `trained` marking each edge once (on the
    first leaf below it), from the first split on, at trained_steps. The policy runs once a
    node. split_noise: the children of a split drawn with split_noise x the step's std, their
    log-probs under the step's own std (BranchGRPO's split_noise_scale; its script: 4). shard as
    sample_rollout's (every rank the same R)."""
    T, leaves = len(sigmas) - 1, noise.shape[0] * branch ** len(split_steps)
    sde, trained_at = in_window(T, window), trained_steps(T, window, train_last)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    rows = torch.arange(len(x), device=x.device)                    # each node's root: its prompt
    states, steps, trained, nfe = [], [], [], 0
    for i in range(T):
        step = propose(policy, x, sigmas[i], sigmas[i + 1], take(cond, rows), take(uncond, rows),
                       cfg_scale=cfg_scale, noise_level=noise_level if sde[i] else 0.0,
                       k=branch if i in split_steps else 1, generator=generator, shard=shard,
                       noise_scale=split_noise if i in split_steps else 1.0)
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
    return Rollout(torch.stack(states), stack("candidates"), stack("mean"), stack("log_probs"),
                   torch.zeros(T, leaves, dtype=torch.long), stack("x0_hat"), x, None, sigmas,
                   take(cond, rows), take(uncond, rows), noise_level, cfg_scale,
                   torch.stack(trained), nfe)


def take(pair, rows):
    """The rows of a (context, pooled) pair, or None."""
    return None if pair is None else tuple(t[rows] for t in pair)

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
        raise ValueError("stepwise credit needs k >= 2 candidates per step to compare")
    return group_normalise(step_rewards, dim=-1)


def terminal_advantages(final_rewards, group_size, eps=1e-4, group_std="group"):
    """final_rewards (B,) of B = prompts x group_size trajectories (a prompt's group adjacent) ->
    (B,) less their group's mean, over the group's std (group_std="group") or the std of all B
    (group_std="global": Flow-GRPO's SD3 configs, global_std=True), + eps."""
    if group_size < 2 or final_rewards.shape[0] % group_size:
        raise ValueError(f"{final_rewards.shape[0]} trajectories do not split into groups of "
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


def credit_advantages(credit, rollout, final_rewards=None, group_size=None, adv_clip=5.0,
                      rows=slice(None), gather=lambda t: t, tree=None, group_std="group"):
    """Advantages (T, B, k) for one of CREDIT_MODES. final_rewards: of every trajectory of the
    update (under torchrun all ranks', so groups are normalised whole); rows: which of them are the
    rollout's; gather: collects every rank's tensor (B, ...) (cosine's 2nd normalisation); tree:
    tree_advantages' (split_steps, branch, by); group_std: sparse's (terminal_advantages)."""
    T = rollout.states.shape[0]
    if credit == "stepwise":
        return stepwise_advantages(rollout.rewards)
    if credit not in CREDIT_MODES:
        raise ValueError(f"credit={credit!r}: choose one of {', '.join(CREDIT_MODES)}")
    if credit == "tree":
        split_steps, branch, by = tree
        return tree_advantages(final_rewards, split_steps, branch, T, by)[:, rows]
    if credit == "sparse":
        advantages = terminal_advantages(final_rewards, group_size, group_std=group_std)
        return advantages[rows].expand(T, -1).unsqueeze(-1)
    weights = gather(cosine_weights(rollout.x0_hat, rollout.final).T.contiguous()).T
    return cosine_advantages(weights, final_rewards, group_size, adv_clip)[:, rows].unsqueeze(-1)

# -----------------------------------------------------------------------------
# 3. The loss, on a subset of the rollout's (step, trajectory) pairs


def grpo_loss(policy, rollout, advantages, step_ids, rows, *, clip_range=1e-3, adv_clip=5.0,
              kl_weight=0.0, reference=None, uncond_grad=True):
    """PPO-clipped GRPO loss over the candidates of the given (step, trajectory) pairs ->
    (loss, stats). step_ids, rows: (N,) indices into the rollout's T steps and B trajectories;
    each pair is one policy forward (with guidance, two) shared by its k candidates, with the
    rollout's noise level and guidance. uncond_grad=False: no gradient through guidance's
    unconditional branch (Flow-GRPO's loss). The KL is the exact one between the two Gaussians;
    Flow-GRPO's (its scripts/train_sd3.py) divides by 2 sigma_t^2, not 2 std^2 = 2 sigma_t^2 |dt|,
    so its beta at a step of length |dt| is kl_weight = beta |dt| here.
    """
    states = rollout.states[step_ids, rows]                                        # (N, C, H, W)
    sigma, sigma_next = rollout.sigmas[step_ids], rollout.sigmas[step_ids + 1]
    cond = tuple(t[rows] for t in rollout.cond)
    uncond = tuple(t[rows] for t in rollout.uncond) if rollout.uncond is not None else None
    velocity = guided_velocity(policy, states, sigma, cond, uncond, rollout.cfg_scale, uncond_grad)
    mean, std = sde_mean_std(states, velocity, sigma, sigma_next, rollout.noise_level)
    log_prob = candidate_log_probs(rollout.candidates[step_ids, rows], mean, std)  # (N, k)
    # BEGIN SOLUTION ex4_grpo: ratio to the rollout's log-probs; advantages clamped; PPO's clip
    ratio = torch.exp(log_prob - rollout.log_probs[step_ids, rows])
    advantage = advantages[step_ids, rows].clamp(-adv_clip, adv_clip)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.maximum(-advantage * ratio, -advantage * clipped).mean()
    # END SOLUTION
    stats = {"policy_loss": policy_loss.detach(), "ratio_max_deviation": (ratio - 1).abs().max(),
             "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean()}
    stats = {key: value.detach() for key, value in stats.items()}
    loss = policy_loss
    if kl_weight > 0:
        with torch.no_grad():
            v_ref = guided_velocity(reference, states, sigma, cond, uncond, rollout.cfg_scale)
            mean_ref, _ = sde_mean_std(states, v_ref, sigma, sigma_next, rollout.noise_level)
        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten() ** 2)
        loss = loss + kl_weight * kl.mean()
        stats["kl"] = kl.mean().detach()
    return loss, stats
