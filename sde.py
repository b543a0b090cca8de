"""SD3's sampling grid and Flow-GRPO's ODE-to-SDE step: the primitives every sampler and rollout is
made of.

    sigmas = sigma_schedule(20)                                  # 1 -> 0, SD3's grid
    sampler = Sampler(policy, sigmas, cond, uncond, cfg_scale=4.0)  # the policy on the grid
    step = propose(sampler, x, i, noise_level=0.7, k=4)          # one pass, k candidates
    scores, _ = score_noisy(reward, step, i, rows, sampler)      # the DRM's, at sigma_next

1. The grid (SD3, Esser et al. 2024): `steps` sigmas evenly from 1 to bend(1/1000), bent by the
   shift, then a final 0 (diffusers' FlowMatchEulerDiscreteScheduler, Stability's sd3_impls.py).
   Rectified flow integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data); one Euler step is
   x_next = x + (sigma_next - sigma) v, guided: v = v_uncond + w (v_cond - v_uncond) (Ho &
   Salimans 2022): `sample_ode`.
2. The ODE-to-SDE step (Flow-GRPO, Liu et al. 2025). The Euler step of the flow ODE,
   x_next = x + dt v, is deterministic, so it has no log-probability to push on. Flow-GRPO
   replaces it by an SDE with the same marginals; one step is Gaussian:

       g       = a sqrt(sigma / (1 - sigma))                                  (a = noise_level)
       mean    = x + dt (v + g^2 / (2 sigma) (x + (1 - sigma) v)),   dt = sigma_next - sigma
       std     = g sqrt(-dt)
       x_next  = mean + std z,   z ~ N(0, I)

   (g is the SDE's diffusion coefficient; x + (1 - sigma) v is the model's estimate of the noise:
   the added term is the score correction that keeps the marginals while noise is injected.)
   a = 0 gives back the Euler step. The log-density of x_next under N(mean, std^2) is what GRPO's
   importance ratio needs; as Flow-GRPO we average it over pixels.
3. `propose`: one guided policy pass and k candidates around its one mean (the step-wise methods'
   group), `score_noisy`: the DRM's scores of the candidates where they are, at sigma_next (the
   paper: a noisy-latent reward), and `favourite`: the DRM's pick among n samples.
"""
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# 1. SD3's sampling grid, and the Euler ODE sampler on it


def bend(sigma, shift):
    """SD3's time shift s sigma / (1 + (s - 1) sigma): s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(steps, shift=1.0, dtype=torch.float32):
    """SD3's sampling grid (steps + 1,), from 1 down to 0, as diffusers' FlowMatchEulerDiscrete-
    Scheduler and Stability's sd3_impls.py make it: `steps` points evenly from 1 to bend(1/1000)
    (the least noise SD3 trained at), bent again, then a final 0. The low end is bent twice and
    the last step is short; that is SD3's grid (our samples are diffusers'). Made in float64."""
    sigmas = bend(torch.linspace(1, bend(1 / 1000, shift), steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def guided_velocity(model, x, sigma, cond, uncond, cfg_scale, *, uncond_grad=True):
    """Classifier-free guidance with the conditional and unconditional passes in one batch.
    cond, uncond: (context, pooled) pairs. cfg_scale = 1 (or uncond None) skips the unconditional
    pass. uncond_grad=False stops the gradient through the unconditional branch (as Flow-GRPO)."""
    sigma = sigma.expand(x.shape[0])
    if uncond is None or cfg_scale == 1.0:
        return model(x, sigma, *cond)
    both = model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                 torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))
    v_cond, v_uncond = both.chunk(2)
    if not uncond_grad:
        v_uncond = v_uncond.detach()
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_ode(model, noise, cond, uncond=None, *, steps=20, cfg_scale=1.0, shift=1.0,
               progress=False):
    """Euler from sigma 1 to 0: noise (B, C, H, W), cond, uncond (context, pooled) -> x0."""
    sigmas = sigma_schedule(steps, shift, noise.dtype).to(noise.device)
    x = noise
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        # BEGIN SOLUTION ex1_flow_matching: the guided velocity at sigmas[i], then one Euler step
        velocity = guided_velocity(model, x, sigmas[i], cond, uncond, cfg_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        # END SOLUTION
    return x


def latent_bytes(dit, size):
    """The bytes of one float32 latent of side `size` of the DiT's (what a count of them costs)."""
    return 4 * dit.config.in_channels * size ** 2


def initial_noise(dit, n, generator, size=None):
    """n draws of N(0, I) on the CPU, of side `size` (default: the DiT's full position grid)."""
    size = size or dit.config.pos_embed_max_size * dit.config.patch_size
    return torch.randn(n, dit.config.in_channels, size, size, generator=generator)


# -----------------------------------------------------------------------------
# 2. The SDE step and its log-probability (float32 inside, float64 for float64 inputs)


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
    # BEGIN SOLUTION ex3_sde_step: the docstring's g, mean and std (dt < 0); mind sigma = 1
    dt = sigma_next - sigma
    g = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x + dt * (velocity + g ** 2 / (2 * sigma) * (x + (1 - sigma) * velocity))
    return mean, g * torch.sqrt(-dt)
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

# -----------------------------------------------------------------------------
# 3. One step of every sampler: k candidates around one mean, the DRM's scores, its favourite


@dataclass
class Sampler:
    """The policy on a grid: what every sampler steps with, and what a scoring rule may need of it.
    policy(x, sigma, context, pooled) -> velocity; sigmas (T + 1,) the grid; cond, uncond
    (context, pooled) of the states' prompts and of the empty prompt (or None); the guidance
    weight."""
    policy: object
    sigmas: torch.Tensor
    cond: tuple
    uncond: tuple | None
    cfg_scale: float

    def rows(self, rows):
        """The same sampler for the states of these rows (their prompts)."""
        return Sampler(self.policy, self.sigmas, take(self.cond, rows), take(self.uncond, rows),
                       self.cfg_scale)


@dataclass
class Draws:
    """Where a sampler's random numbers come from: the SDE's noise (generator), the step-wise
    candidate picks (picks; None: the generator), and this process's slice of them (shard =
    (rank, world) under torchrun: draw_noise)."""
    generator: torch.Generator | None = None
    picks: torch.Generator | None = None
    shard: tuple = (0, 1)


@dataclass
class Step:
    """One denoising step from B states: k candidates around the step's one mean."""
    candidates: torch.Tensor   # (B, k, C, H, W); noise_level 0: (B, 1, ...), the Euler step's
    log_probs: torch.Tensor    # (B, k) under the policy that proposed them
    mean: torch.Tensor         # (B, C, H, W)
    x0_hat: torch.Tensor       # (B, C, H, W): the clean-image estimate x - sigma v of the states
    velocity: torch.Tensor     # (B, C, H, W): the guided velocity v at the states


def propose(sampler, x, i, *, noise_level, k=1, draws=None, noise_scale=1.0):
    """The primitive every sampler and rollout is made of: from states x (B, ...) at the grid's
    sigma i, one guided policy pass and k candidates for sigma i + 1 around its one mean -> Step.
    noise_scale: the candidates drawn with noise_scale x std, their log-probs taken under the
    step's own std (BranchGRPO's split steps)."""
    draws = draws or Draws()
    sigma, sigma_next = sampler.sigmas[i], sampler.sigmas[i + 1]
    velocity = guided_velocity(sampler.policy, x, sigma, sampler.cond, sampler.uncond,
                               sampler.cfg_scale).to(x.dtype)
    noise = (noise_scale * draw_noise(x.shape[0], k, x.shape[1:], draws.generator, draws.shard,
                                      x.device) if noise_level else None)
    candidates, log_probs, mean, _ = sde_step(x, velocity, sigma, sigma_next, noise_level, noise)
    if noise is None:
        candidates, log_probs = candidates.unsqueeze(1), log_probs.unsqueeze(1)
    return Step(candidates, log_probs, mean, x - sigma * velocity, velocity)


def passes(uncond, cfg_scale):
    """Forward passes of one guided velocity (guided_velocity): 2, or 1 unguided."""
    return 2 if uncond is not None and cfg_scale != 1 else 1


def take(pair, rows):
    """The rows of a (context, pooled) pair, or None."""
    return None if pair is None else tuple(t[rows] for t in pair)


def drm_on(drm, drm_cond):
    """The DRM on N images' prompts (drm_cond: their (context, pooled)): reward(x, sigma, images)
    -> scores, `images` (M,) the prompt of each state."""
    return lambda x, sigma, images: drm(x, sigma, *take(drm_cond, images))


def score_noisy(reward, step, i, rows, sampler):
    """The paper's rule: the DRM's scores (B, k) of step i's candidates (B, k, ...) at sigma_next,
    where they are, and the DiT passes it spent (none). reward(x (N, ...), sigma (N,), rows (N,))
    scores N states of the prompts `rows`; rows (B,): each state's. The rival rules (the clean
    estimate, an ODE look-ahead) take the same arguments: rivals/scores.py."""
    B, k = step.candidates.shape[:2]
    sigma = sampler.sigmas[i + 1].expand(B * k)
    scores = reward(step.candidates.flatten(0, 1), sigma, rows.repeat_interleave(k))
    return scores.float().view(B, k), 0


def favourite(reward, x, n, counts, scores=None):
    """Each image's DRM favourite among its n samples x (N * n, ...), an image's adjacent, scored
    at sigma 0 (reward(x, sigma, images)) unless scores (N * n,) are given -> (N, ...)."""
    if n == 1:
        return x
    if scores is None:
        owners = torch.arange(len(x) // n, device=x.device).repeat_interleave(n)
        scores = reward(x, torch.zeros(len(x), device=x.device), owners).float()
        counts["drm_calls"] += len(x)
    best = scores.view(-1, n).argmax(1)
    return x.view(-1, n, *x.shape[1:])[torch.arange(len(best), device=x.device), best]
