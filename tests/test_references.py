"""Where nanoDRM says it matches a peer, it matches the peer's own code.

- SD3's sampler: diffusers' StableDiffusion3Pipeline itself (a test extra), on a tiny random
  transformer.
- CoCA's cosine credit: the formula of Lil-Shake/CoCA's pipeline_with_logprob_coca.py and
  scripts/train_coca.py, written out here in numpy as their code computes it.
- Flow-GRPO's loss: scripts/train_sd3.py's compute_log_prob and its PPO / KL lines and
  flow_grpo/stat_tracking.py's group statistics, written out here as their code computes them.
"""
import math

import numpy as np
import pytest
import torch
from conftest import max_abs, relative, within

from sde import sample_ode, sigma_schedule

diffusers = pytest.importorskip("diffusers")


# -----------------------------------------------------------------------------
# SD3's schedule and sampler


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (4, 1.0), (10, 3.0), (28, 3.0), (20, 1.0)])
def test_sigma_schedule_is_diffusers_flow_match_euler(steps, shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    # allclose's |a - b| <= atol + rtol |b|, written as |a - b| / (atol / rtol + |b|) <= rtol
    ours, theirs = sigma_schedule(steps, shift), scheduler.sigmas
    within(((ours - theirs).abs() / (1e-7 / 1e-6 + theirs.abs())).max().item(), 1e-6,
           "sigmas vs diffusers")
    # Stability's sd3_impls.py by hand: timesteps linspace(1000 sigma_max, 1000 sigma_min, steps),
    # each bent, then 0
    bend = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    by_hand = [bend(t / 1000)
               for t in np.linspace(1000 * bend(1.0), 1000 * bend(1 / 1000), steps)] + [0.0]
    ours, by_hand = sigma_schedule(steps, shift, torch.float64), torch.tensor(by_hand,
                                                                             dtype=torch.float64)
    within(((ours - by_hand).abs() / (1e-15 / 1e-12 + by_hand.abs())).max().item(), 1e-12,
           "sigmas vs by hand")


@pytest.mark.ex1_flow_matching
@pytest.mark.parametrize("steps", [10, 28])
def test_sample_ode_gives_the_sd3_pipelines_latents(steps):
    """StableDiffusion3Pipeline (prompt embeddings given, guidance 4.5, shift 3) and our sampler,
    from the same noise, in float64, on a tiny random SD3.5-like transformer loaded into our DiT
    from diffusers' own folder."""
    import tempfile

    from sd3.mmdit import load_sd3
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=64, num_attention_heads=1, joint_attention_dim=32,
        caption_projection_dim=64, pooled_projection_dim=16, pos_embed_max_size=8,
        qk_norm="rms_norm", dual_attention_layers=(0,))
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    transformer = transformer.double().eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    # no VAE: the pipeline only needs the factor to size latents (ours: given)
    pipe.vae_scale_factor = 8
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    context, negative = (torch.randn(2, 5, 32, generator=g, dtype=torch.float64) for _ in range(2))
    pooled, negative_pooled = (torch.randn(2, 16, generator=g, dtype=torch.float64)
                               for _ in range(2))
    theirs = pipe(prompt_embeds=context, negative_prompt_embeds=negative,
                  pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                  latents=noise.clone(), num_inference_steps=steps, guidance_scale=4.5, height=64,
                  width=64, output_type="latent").images
    with tempfile.TemporaryDirectory() as folder:
        transformer.save_pretrained(folder)
        dit = load_sd3(folder, dtype=torch.float64)
    ours = sample_ode(dit, noise, (context, pooled), (negative, negative_pooled), steps=steps,
                      cfg_scale=4.5, shift=3.0)
    within(relative(ours, theirs), 1e-5, "latents")
    # the old grid, linspace(1, 0, steps + 1) then shifted, is 1-2% away: the test can tell the two
    # apart
    linear = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.clone()
    for sigma, sigma_next in zip(*(3 * s / (1 + 2 * s) for s in (linear[:-1], linear[1:]))):
        with torch.no_grad():
            v = dit(torch.cat([x, x]), sigma.expand(4), torch.cat([context, negative]),
                    torch.cat([pooled, negative_pooled]))
        v_cond, v_uncond = v.chunk(2)
        x = x + (sigma_next - sigma) * (v_uncond + 4.5 * (v_cond - v_uncond))
    assert relative(x, theirs) > 1e-3

# -----------------------------------------------------------------------------
# CoCA's cosine credit, written out from Lil-Shake/CoCA


def coca_weights(x0_hat, final, window_size):
    """pipeline_with_logprob_coca.py after its denoising loop: all_x0 holds each step's x0 estimate,
    then the final latents; `sim_weight` (B, T) is what it returns."""
    all_x0 = list(x0_hat) + [final]
    latents_flat = final.reshape(final.shape[0], -1)
    all_x0_diff = torch.stack([torch.nn.functional.cosine_similarity(x0.reshape(x0.shape[0], -1),
                                                                     latents_flat, dim=-1)
                               for x0 in all_x0], dim=1)
    all_x0_diff_next = all_x0_diff[:, 1:]
    bs, timestep = all_x0_diff_next.shape
    all_x0_diff_mean = all_x0_diff_next.view(bs, timestep // window_size, window_size).mean(dim=2)
    all_x0_gain = torch.zeros_like(all_x0_diff_mean)
    for i in range(timestep // window_size):
        if i == 0:
            all_x0_gain[:, i] = all_x0_diff_mean[:, i] - all_x0_diff[:, 0]
        else:
            all_x0_gain[:, i] = all_x0_diff_mean[:, i] - all_x0_diff_mean[:, i - 1]
    gain_sum = all_x0_gain.sum(-1).unsqueeze(-1)
    all_x0_gain = all_x0_gain / (gain_sum * window_size)
    return all_x0_gain.unsqueeze(-1).repeat(1, 1, window_size).flatten(start_dim=1)


def coca_advantages(prompts, rewards, sim_weight, adv_clip_max):
    """scripts/train_coca.py steps 1-4 with temporal_alpha = 0 (its config), in numpy. Its
    PerPromptStatTracker is taken with this update's statistics alone (a fresh buffer, min_count no
    more than a prompt's group): per prompt, (r - mean) / (std + 1e-6); then
    update_temporal_rewards' pooled mean and std of the prompt's (trajectory, step) values, from its
    buffer's two entries, the per-trajectory means and stds."""
    prompts, rewards = np.array(prompts), np.array(rewards)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        advantages[prompts == prompt] = ((prompt_rewards - np.mean(prompt_rewards))
                                         / (np.std(prompt_rewards) + 1e-6))
    advantages = np.clip(advantages, -adv_clip_max, adv_clip_max)
    samples, num_timesteps = sim_weight.shape
    ts_processed, ts_sum = np.zeros_like(sim_weight), np.zeros(samples)
    for i in reversed(range(num_timesteps)):
        ts_processed[:, i] = sim_weight[:, i] + ts_sum
        ts_sum = ts_processed[:, i]
    temporal_rewards = np.zeros((samples, num_timesteps))
    for i in range(num_timesteps):
        temporal_rewards[:, i] += advantages * (0.0 + (1 - 0.0) * ts_processed[:, i])
    final = np.empty_like(temporal_rewards)
    for prompt in np.unique(prompts):
        prompt_temporal_rewards = temporal_rewards[prompts == prompt]
        means, stds = np.mean(prompt_temporal_rewards, axis=1), np.std(prompt_temporal_rewards,
                                                                       axis=1)
        mean = np.mean(means)
        std = np.sqrt(np.mean(np.square(means) + np.square(stds)) - np.square(mean))
        final[prompts == prompt] = (prompt_temporal_rewards - mean) / (std + 1e-6)
    return final


def trajectories_towards(final, T, seed):
    """x0 estimates (T, B, ...) that drift, unevenly and with setbacks, from noise towards the final
    images."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(final.shape, generator=g, dtype=torch.float64)
    progress = torch.rand(T, final.shape[0], generator=g, dtype=torch.float64).cumsum(0) / T
    # some steps go back
    progress = progress + 0.15 * torch.randn(progress.shape, generator=g, dtype=torch.float64)
    p = progress.view(T, -1, *[1] * (final.dim() - 1))
    return (1 - p) * start + p * final + 0.1 * torch.randn((T, *final.shape), generator=g,
                                                           dtype=torch.float64)


@pytest.mark.parametrize("T, window", [(10, 5), (20, 5), (12, 4), (10, 1)])
def test_cosine_weights_are_cocas(T, window):
    from rivals.credit import cosine_weights
    final = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    x0_hat = trajectories_towards(final, T, seed=window)
    theirs = coca_weights(x0_hat, final, window).T                                   # (T, B)
    ours = cosine_weights(x0_hat, final, window)
    within(max_abs(ours, theirs), 1e-9, "weights")
    # not clamped: a window that moved away from the end is debited, as in CoCA
    assert (ours < 0).any()


def test_cosine_weights_where_cocas_code_has_no_answer():
    from rivals.credit import cosine_weights
    final = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # T = 7 with windows of 5: CoCA's view() fails; ours: windows of 5 and 2, each divided by its
    # own size
    x0_hat = trajectories_towards(final, 7, seed=1)
    weights = cosine_weights(x0_hat, final, window=5)
    cos = torch.nn.functional.cosine_similarity(torch.cat([x0_hat, final[None]]).flatten(2),
                                                final.flatten(1)[None], dim=2)
    first, second = cos[1:6].mean(0), cos[6:8].mean(0)
    gains = torch.stack([first - cos[0], second - first])
    expected = torch.cat([(gains[0] / gains.sum(0) / 5).expand(5, -1),
                          (gains[1] / gains.sum(0) / 2).expand(2, -1)])
    within(max_abs(weights, expected), 1e-12, "weights")
    within(max_abs(weights.sum(0), 1.0), 1e-12, "sum of weights - 1")
    # an estimate that ends where it started (sum of gains 0: CoCA divides by zero) or further away
    # (a negative sum: CoCA flips every sign): 1 / T on each step
    still = final.expand(5, -1, -1, -1, -1).clone()
    worse = torch.stack([final * (1 - 0.1 * t) + 0.3 * t * torch.ones_like(final)
                         for t in range(5)])
    for x0_hat in (still, worse):
        assert torch.equal(cosine_weights(x0_hat, final, window=5),
                           torch.full((5, 3), 0.2, dtype=torch.float64))
    assert torch.isinf(coca_weights(still, final,
                                    5)).any() or torch.isnan(coca_weights(still, final, 5)).any()


@pytest.mark.ex4_grpo
@pytest.mark.parametrize("adv_clip", [5.0, 0.6])
def test_cosine_advantages_follow_cocas_two_normalisations(adv_clip):
    from rivals.credit import cosine_advantages, cosine_weights
    T, prompts, group = 10, 3, 4
    g = torch.Generator().manual_seed(2)
    final = torch.randn(prompts * group, 1, 4, 4, generator=g, dtype=torch.float64)
    weights = cosine_weights(trajectories_towards(final, T, seed=3), final)
    rewards = (torch.randn(prompts * group, generator=g, dtype=torch.float64)
               * torch.tensor([0.1, 1.0, 3.0]).double().repeat_interleave(group))
    names = [f"prompt {i}" for i in range(prompts) for _ in range(group)]
    theirs = coca_advantages(names, rewards.numpy(), weights.T.numpy(), adv_clip)      # (B, T)
    ours = cosine_advantages(weights, rewards, group, adv_clip)                          # (T, B)
    within(max_abs(ours.T, theirs), 1e-9, "advantages")

# -----------------------------------------------------------------------------
# Flow-GRPO's group statistics and loss, written out from yifan123/flow_grpo


def flow_grpo_group_advantages(prompts, rewards):
    """flow_grpo/stat_tracking.py, PerPromptStatTracker.update (type 'grpo', per-prompt std),
    cleared every epoch."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(prompt_rewards, axis=0, keepdims=True)
        std = np.std(prompt_rewards, axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


@pytest.mark.ex4_grpo
def test_group_advantages_are_flow_grpos():
    from grpo import stepwise_advantages
    from rivals.credit import terminal_advantages
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g,
                          dtype=torch.float64) * torch.tensor([0.01, 1.0,
                                                               7.0]).double().repeat_interleave(4)
    names = [f"p{i // 4}" for i in range(12)]
    expected = flow_grpo_group_advantages(names, rewards.numpy())
    within(max_abs(terminal_advantages(rewards, 4), expected), 1e-12, "terminal advantages")
    # step-wise credit normalises the k candidates of a state the same way
    within(max_abs(stepwise_advantages(rewards.view(1, 3, 4)).flatten(), expected), 1e-12,
           "step-wise advantages")


def flow_grpo_loss(transformer, sample, j, embeds, pooled_embeds, sigmas, guidance_scale,
                   noise_level, clip_range, adv_clip_max, beta, reference):
    """scripts/train_sd3.py's compute_log_prob (train.cfg on: the unconditional branch detached),
    its sde_step_with_logprob (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py) and its PPO and KL
    lines, for timestep j of every sample. transformer(latents, sigma, embeds, pooled): our DiT,
    which takes sigma where diffusers' takes 1000 sigma. embeds: negative rows first, as the script
    concatenates them."""
    def compute_log_prob(model):
        noise_pred = model(torch.cat([sample["latents"][:, j]] * 2),
                           torch.cat([sample["sigmas"][:, j]] * 2), embeds, pooled_embeds)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred_uncond = noise_pred_uncond.detach()
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        # the script casts to float32 (.float()); float64 here, to compare beyond float32's rounding
        model_output, latents, prev_sample = (noise_pred, sample["latents"][:, j],
                                              sample["next_latents"][:, j])
        sigma, sigma_prev, sigma_max = sigmas[j], sigmas[j + 1], sigmas[1].item()
        dt = sigma_prev - sigma
        std_dev_t = (torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
                     * noise_level)
        prev_sample_mean = (latents * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
                            + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
        log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2)
                    / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                    - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                    - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
        return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t
    log_prob, prev_sample_mean, std_dev_t = compute_log_prob(transformer)
    with torch.no_grad():
        _, prev_sample_mean_ref, _ = compute_log_prob(reference)
    advantages = torch.clamp(sample["advantages"][:, j], -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - sample["log_probs"][:, j])
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3),
        keepdim=True) / (2 * std_dev_t ** 2)
    return policy_loss + beta * torch.mean(kl_loss)


@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
@pytest.mark.parametrize("j", [0, 2, 4])
def test_loss_with_uncond_grad_off_is_flow_grpos(j):
    """One of Flow-GRPO's per-timestep losses: value and every gradient, with kl_weight = beta
    |dt|."""
    import copy

    from conftest import random_prompts, random_small_dit

    from grpo import PPO, grpo_loss, sample_rollout
    from sde import Draws, Sampler
    # float64: exact to 1e-6 even at
    policy, B, steps, guidance, beta = random_small_dit().double(), 4, 5, 4.5, 0.04
    # the last, 0.003-long step
    reference = copy.deepcopy(policy)
    cond, uncond = (tuple(t.double() for t in random_prompts(B, seed)) for seed in (1, 2))
    sigmas = sigma_schedule(steps, 3.0, torch.float64)
    rollout = sample_rollout(Sampler(policy, sigmas, cond, uncond, guidance),
                             torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64),
                             noise_level=0.7, draws=Draws(torch.Generator().manual_seed(4)))
    with torch.no_grad():
        # the policy moves after the rollout, so ratios leave 1 and some are clipped
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 2e-2)
    advantages = torch.randn(steps, B, 1, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64) * 2
    dt = (sigmas[j] - sigmas[j + 1]).item()
    ours, stats = grpo_loss(policy, rollout, advantages, torch.full((B,), j), torch.arange(B),
                            ppo=PPO(1e-3, 2.0, beta * dt, uncond_grad=False), reference=reference)
    assert stats["clip_fraction"] > 0  # the clipped branch takes part (at j = 0 half the samples)
    ours.backward()
    our_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    sample = {"latents": rollout.states.transpose(0, 1),
              "next_latents": rollout.candidates[:, :, 0].transpose(0, 1),
              "sigmas": sigmas[:-1].expand(B, -1), "log_probs": rollout.log_probs[..., 0].T,
              "advantages": advantages[..., 0].T}
    theirs = flow_grpo_loss(policy, sample, j, torch.cat([uncond[0], cond[0]]),
                            torch.cat([uncond[1], cond[1]]), sigmas,
                            guidance, 0.7, 1e-3, 2.0, beta, reference)
    theirs.backward()
    # approx's |a - b| <= max(rel |b|, abs), written as |a - b| / max(|b|, abs / rel) <= rel
    within(abs(ours.item() - theirs.item()) / max(abs(theirs.item()), 1e-7 / 1e-6), 1e-6, "loss")
    # each parameter's ||g - g'|| <= 1e-6 ||g'|| + 1e-9, written as
    # ||g - g'|| / (||g'|| + 1e-9 / 1e-6) <= 1e-6
    within(max(((ours_grad - p.grad).norm() / (p.grad.norm() + 1e-9 / 1e-6)).item()
               for ours_grad, p in zip(our_grads, policy.parameters())), 1e-6, "gradients")
    # the default, the exact gradient of guidance, differs: the flag is what makes the two equal
    policy.zero_grad()
    exact, _ = grpo_loss(policy, rollout, advantages, torch.full((B,), j), torch.arange(B),
                         ppo=PPO(1e-3, 2.0, beta * dt), reference=reference)
    exact.backward()
    within(abs(exact.item() - ours.item()) / abs(ours.item()), 1e-6, "exact-gradient loss")
    assert sum((g - p.grad).norm() for g,
               p in zip(our_grads, policy.parameters())) > 1e-3 * sum(g.norm() for g in our_grads)
