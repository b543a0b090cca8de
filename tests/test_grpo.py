"""The spec of sde.py's step and grpo.py: the SDE step against an independent Gaussian, rollouts
(candidates around one mean, the last step untrained), step-wise advantages, replayed ratios, and
that training raises the reward. The rivals' credit rules are tests/test_rivals.py's."""
import pytest
import torch
from conftest import max_abs, within
from conftest import random_prompts as prompts
from conftest import random_small_dit as random_dit

from common import in_chunks
from grpo import PPO, Candidates, grpo_loss, sample_rollout, stepwise_advantages
from sde import Draws, Sampler, guided_velocity, propose, score_noisy, sde_step, sigma_schedule


@pytest.mark.ex3_sde_step
@pytest.mark.parametrize("sigma, sigma_next", [(0.8, 0.6), (0.3, 0.1), (0.1, 0.0), (1.0, 0.9)])
def test_sde_step_matches_an_independent_gaussian(sigma, sigma_next):
    """Flow-GRPO's step written out in float64 against ours in float32. Rounding seen (8
    arithmetic variants, tests/arithmetic.py): 3.6e-7 on x_next and the mean (values up to 4), 6e-8
    on the std; tolerances 1e-5 and 1e-6. A bug: the score term without its (1 - sigma) moves the
    mean by 1e-2 to 1 (by sigma), dropping -log(std) the log_prob by 0.36-2.6
    (tests/mutations.py)."""
    g = torch.Generator().manual_seed(0)
    x, velocity, noise = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    a = 0.7
    x_next, log_prob, mean, std = sde_step(x, velocity, sigma, sigma_next, a, noise)
    x, velocity, noise = x.double(), velocity.double(), noise.double()
    # Flow-GRPO's form of the same step, written out separately; at sigma = 1 the schedule's next
    # sigma stands in the denominator of sigma_t
    dt = sigma_next - sigma
    sigma_t = a * (sigma / (1 - (sigma_next if sigma == 1 else sigma))) ** 0.5
    expected_mean = (x * (1 + sigma_t ** 2 / (2 * sigma) * dt)
                     + velocity * (1 + sigma_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    expected_std = sigma_t * (-dt) ** 0.5
    within(max_abs(mean, expected_mean), 1e-5, "mean")
    within(max_abs(std.flatten(), torch.full((3,), expected_std)), 1e-6, "std")
    within(max_abs(x_next, expected_mean + expected_std * noise), 1e-5, "x_next")
    normal = torch.distributions.Normal(expected_mean, expected_std)
    within(max_abs(log_prob, normal.log_prob(x_next).flatten(1).mean(1)), 1e-5, "log_prob")


@pytest.mark.ex3_sde_step
def test_sde_step_without_noise_is_euler():
    g = torch.Generator().manual_seed(0)
    x, velocity = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    sigma, sigma_next = torch.tensor([0.7, 0.4]), torch.tensor([0.5, 0.2])
    x_next, _, _, _ = sde_step(x, velocity, sigma, sigma_next, noise_level=0.0)
    assert torch.equal(x_next, x + (sigma_next - sigma).view(-1, 1, 1, 1) * velocity)


@pytest.mark.ex3_sde_step
def test_sde_step_is_float32_for_a_bf16_model():
    x, velocity = torch.randn(2, 1, 8, 8).bfloat16(), torch.randn(2, 1, 8, 8).bfloat16()
    x_next, log_prob, mean, std = sde_step(x, velocity, 0.5, 0.4, 0.7)
    assert x_next.dtype == log_prob.dtype == mean.dtype == std.dtype == torch.float32


@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
@pytest.mark.parametrize("k, cfg_scale", [(1, 1.0), (3, 2.0)])
def test_replayed_rollout_has_ratio_one(k, cfg_scale):
    """With the policy unchanged, log-probs recomputed from the stored states equal the
    rollout's."""
    policy, B = random_dit(), 4
    cond, uncond = prompts(B, 1), prompts(B, 2)
    sigmas = sigma_schedule(5)
    reward = lambda x, sigma, rows: -x.flatten(1).sum(1)  # noqa: E731
    rollout = sample_rollout(Sampler(policy, sigmas, cond, uncond, cfg_scale),
                             torch.randn(B, 1, 16, 16), noise_level=0.7,
                             candidates=Candidates(k, reward) if k > 1 else None,
                             draws=Draws(torch.Generator().manual_seed(0)))
    advantages = torch.randn(5, B, k)
    for step in range(5):  # the rollout's own batches: the same arithmetic, so exactly 1
        _, stats = grpo_loss(policy, rollout, advantages, torch.full((B,), step), torch.arange(B))
        assert stats["ratio_max_deviation"].item() == 0.0
    shuffled = torch.randperm(5 * B)  # mixed steps in one batch: equal up to float rounding
    _, stats = grpo_loss(policy, rollout, advantages, shuffled // B, shuffled % B)
    within(stats["ratio_max_deviation"].item(), 1e-5, "ratio's deviation from 1")


@pytest.mark.ex3_sde_step
def test_candidates_share_the_stored_mean_and_the_trajectory_goes_on_from_the_chosen_one():
    policy, B, k = random_dit(), 3, 4
    cond = prompts(B)
    reward = lambda x, sigma, rows: x.mean((1, 2, 3))  # noqa: E731
    rollout = sample_rollout(Sampler(policy, sigma_schedule(4), cond, None, 1.0),
                             torch.randn(B, 1, 16, 16), noise_level=0.7,
                             candidates=Candidates(k, reward, follow="best"))
    for t in range(4):
        candidates = rollout.candidates[t]                                   # (B, k, ...)
        chosen = candidates[torch.arange(B), rollout.chosen[t]]
        nxt = rollout.states[t + 1] if t < 3 else rollout.final
        assert torch.equal(chosen, nxt)
        assert torch.equal(rollout.chosen[t], rollout.rewards[t].argmax(1))
        # the k candidates were drawn around the one stored mean: their log-probs under it are the
        # stored ones
        sigma, sigma_next = rollout.sigmas[t].item(), rollout.sigmas[t + 1].item()
        std = 0.7 * (sigma / (1 - (sigma_next if sigma == 1
                                   else sigma))) ** 0.5 * (sigma - sigma_next) ** 0.5
        normal = torch.distributions.Normal(rollout.means[t].unsqueeze(1), std)
        within(max_abs(normal.log_prob(rollout.candidates[t]).flatten(2).mean(2),
                       rollout.log_probs[t]), 1e-4, f"log_prob at step {t}")


@pytest.mark.ex3_sde_step
def test_a_default_rollout_samples_the_last_step_but_never_trains_it():
    """The last step (sigma_{T-1} -> 0) stays an SDE step, but with one candidate, unscored and
    untrained; train_last=True trains it as any other."""
    import train_policy
    policy, B, T, k = random_dit(), 3, 4, 3
    cond, uncond = prompts(B, 1), prompts(B, 2)
    noise, sigmas = torch.randn(B, 1, 16, 16), sigma_schedule(T)
    scored = []

    def reward(x, sigma, rows):
        return scored.append(sigma[0].item()) or x.mean((1, 2, 3))
    sampler = Sampler(policy, sigmas, cond, uncond, 2.0)
    rollout = sample_rollout(sampler, noise, noise_level=0.7, candidates=Candidates(k, reward),
                             draws=Draws(torch.Generator().manual_seed(0)))
    assert rollout.trained.tolist() == [[t < T - 1] * B for t in range(T)]
    # the DRM at steps 0 .. T-2 only
    assert scored == sigmas[1:T].tolist()
    assert (rollout.rewards[T - 1] == 0).all() and rollout.nfe == B * T * 2
    last = rollout.states[T - 1]
    euler = last - sigmas[T - 1] * guided_velocity(policy, last, sigmas[T - 1], cond, uncond, 2.0)
    assert not torch.equal(rollout.final, euler)                          # still sampled with noise
    assert torch.equal(rollout.candidates[T - 1, :, 0], rollout.final)
    scored.clear()
    every = sample_rollout(sampler, noise, noise_level=0.7, candidates=Candidates(k, reward),
                           train_last=True, draws=Draws(torch.Generator().manual_seed(0)))
    assert every.trained.all() and scored == sigmas[1:].tolist()
    assert train_policy.Config().train_last_step is False


@pytest.mark.ex3_sde_step
def test_the_drm_scores_the_noisy_candidates_where_they_are():
    """The paper's rule: the DRM sees x_next at sigma_next, each candidate with its state's
    prompt (the rivals' rules: tests/test_rivals.py)."""
    policy, B, k, i = random_dit(), 2, 3, 1
    cond, uncond = prompts(B, 1), prompts(B, 2)
    sampler, x = Sampler(policy, sigma_schedule(4), cond, uncond, 2.0), torch.randn(B, 1, 16, 16)
    seen = []

    def reward(x, sigma, rows):
        return seen.append((x, sigma, rows)) or x.flatten(1).mean(1)
    step = propose(sampler, x, i, noise_level=0.7, k=k,
                   draws=Draws(torch.Generator().manual_seed(0)))
    scores, spent = score_noisy(reward, step, i, torch.tensor([1, 0]), sampler)
    assert spent == 0 and torch.equal(seen[-1][0], step.candidates.flatten(0, 1))
    assert torch.equal(seen[-1][1], sampler.sigmas[i + 1].expand(B * k))
    assert seen[-1][2].tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.equal(scores, step.candidates.flatten(2).mean(2))


@pytest.mark.ex4_grpo
def test_stepwise_advantages_have_zero_mean_within_each_group():
    rewards = torch.randn(6, 5, 4) * 3 + torch.arange(5).view(1, 5, 1)
    advantages = stepwise_advantages(rewards)
    within(advantages.mean(-1).abs().max().item(), 1e-5, "advantages' mean")
    # numpy's std (ddof 0) over (std + eps 1e-4): the eps's own 1e-4 is no rounding, so the std is
    # held to std / (std + 1e-4) in float64. Rounding seen 1e-7 (tests/arithmetic.py); ddof 1
    # (tests/mutations.py): 1.3e-1
    std = rewards.double().std(-1, correction=0)
    within(max_abs(advantages.std(-1, correction=0), std / (std + 1e-4)), 1e-5, "advantages' std")
    assert torch.equal(advantages.argsort(-1), rewards.argsort(-1))


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_short_stepwise_training_raises_the_drm_score():
    """Step-wise GRPO on the shipped base model and DRM, a few updates with a large step: the DRM's
    mean score of ODE samples of fixed noise on the training prompts goes up."""
    from data.toy import ToyBase
    from data.world import TRAIN_PROMPTS
    from sde import sample_ode
    torch.manual_seed(0)
    base = ToyBase.load("data/base.safetensors", "cpu")
    policy = base.dit
    drm, drm_text, _ = base.load_drm("data/drm.safetensors", "cpu")
    chosen = TRAIN_PROMPTS[::10]  # 8 prompts
    cond, _ = base.encode(chosen)
    drm_cond = drm_text.encode(chosen)
    noise = torch.randn(len(chosen), 1, 32, 32, generator=torch.Generator().manual_seed(1))
    sigmas = sigma_schedule(4)

    def mean_drm_score():
        with torch.no_grad():
            images = sample_ode(policy.eval(), noise, cond, steps=8)
            return drm(images, torch.zeros(len(chosen)), *drm_cond).mean().item()

    def reward(x, sigma, rows):
        return drm(x, sigma, drm_cond[0][rows], drm_cond[1][rows])

    before = mean_drm_score()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        rollout = sample_rollout(Sampler(policy.eval(), sigmas, cond, None, 1.0),
                                 torch.randn(len(chosen), 1, 32, 32, generator=g),
                                 noise_level=0.7, candidates=Candidates(4, reward),
                                 draws=Draws(g))
        advantages = stepwise_advantages(rollout.rewards)
        pairs = torch.arange(4 * len(chosen))
        loss, _ = grpo_loss(policy.train(), rollout, advantages, pairs // len(chosen),
                            pairs % len(chosen), ppo=PPO(clip_range=0.2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert mean_drm_score() > before + 0.05


@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_compiled_rollout_and_loss_agree_with_eager_and_compile_once(compiled):
    """Rollout (SDE step and log-prob compiled with the DiT's blocks) and loss gradients match
    eager; a second update of the same shapes compiles nothing new."""
    import copy

    from model import compile_regions
    eager_policy, B, k = random_dit(), 3, 2
    policy = compile_regions(copy.deepcopy(eager_policy))
    cond, uncond = prompts(B, 1), prompts(B, 2)
    reward = lambda x, sigma, rows: -x.flatten(1).sum(1)  # noqa: E731

    def update(policy):
        policy.zero_grad()
        rollout = sample_rollout(Sampler(policy, sigma_schedule(3), cond, uncond, 2.0),
                                 torch.randn(B, 1, 16, 16,
                                             generator=torch.Generator().manual_seed(0)),
                                 noise_level=0.7, candidates=Candidates(k, reward),
                                 draws=Draws(torch.Generator().manual_seed(1)))
        advantages = stepwise_advantages(rollout.rewards)
        steps, rows = torch.arange(3).repeat_interleave(B), torch.arange(B).repeat(3)
        loss, _ = grpo_loss(policy, rollout, advantages, steps, rows)
        loss.backward()
        return rollout, [p.grad.clone() for p in policy.parameters()]
    rollout, grads = update(policy)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    update(policy)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["recompiles"]
    eager_rollout, eager_grads = update(eager_policy)
    within(max_abs(rollout.final, eager_rollout.final), 1e-5, "final")
    within(max_abs(rollout.log_probs, eager_rollout.log_probs), 1e-5, "log_probs")
    # per tensor, relative to its norm: SD3's grid ends with a step from sigma 0.001 to 0 whose std
    # is ~1e-3, so float32 rounding in x_next - mean reaches single gradient entries amplified
    # (measured: 3e-4 of the norm; Inductor's transposed-input bug was 3-25%)
    # The denominator's floor (an absolute 1e-9 over the tolerance) keeps the last block's unused
    # context-side weights, with no gradient at all, from 0 / 0
    for i, (grad, eager_grad) in enumerate(zip(grads, eager_grads)):
        error = (grad - eager_grad).double().norm() / (eager_grad.double().norm() + 1e-9 / 2e-3)
        within(error.item(), 2e-3, f"gradient {i}")


@pytest.mark.ex3_sde_step
def test_micro_batched_rollout_equals_the_full_batch():
    """in_chunks over the policy and the DRM changes memory, not the rollout: the same numbers up to
    the rounding of another batch size (seen: 2.9e-6 on the rewards, under 8 arithmetic variants;
    tolerance 1e-4); a chunk's rows out of order would move them by O(1)."""
    policy, B = random_dit(), 5
    cond, uncond = prompts(B, 1), prompts(B, 2)
    calls = []

    def reward(x, sigma, rows):
        calls.append(x.shape[0])
        return -x.flatten(1).sum(1) * sigma
    chunked_policy = lambda *args: in_chunks(policy, 3, *args)  # noqa: E731

    def chunked_reward(x, sigma, rows):
        return in_chunks(lambda a, b: reward(a, b, rows), 4, x, sigma)
    runs = [sample_rollout(Sampler(p, sigma_schedule(3), cond, uncond, 2.0),
                           torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                           noise_level=0.7, candidates=Candidates(3, r),
                           draws=Draws(torch.Generator().manual_seed(1)))
            for p, r in ((policy, reward), (chunked_policy, chunked_reward))]
    # the first two steps scored (the last is not trained), really chunked: 15 candidates, 4 at a
    # time
    assert calls[:2] == [15] * 2 and calls[2:6] == [4, 4, 4, 3] and len(calls) == 10
    for name in ("final", "log_probs", "rewards", "chosen"):
        within(max_abs(getattr(runs[0], name), getattr(runs[1], name)), 1e-4, name)
