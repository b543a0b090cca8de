"""Step-wise sampling and best-of-N: the ODE special case, the DRM's choice at every step, and
honest counters."""
import pytest
import torch
from conftest import max_abs, random_prompts, random_small_dit, within

from sample import Search, best_of_n, stepwise_sample
from sde import Sampler, drm_on, sample_ode, sigma_schedule


class Recorder(torch.nn.Module):
    """Wraps a model (or a function of the same inputs) and keeps each call's x and batch size."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.inputs = fn, []

    def forward(self, x, sigma, context, pooled):
        self.inputs.append(x.clone())
        return self.fn(x, sigma, context, pooled)

    @property
    def passes(self):
        return sum(len(x) for x in self.inputs)


def minus_pixel_sum(x, sigma, context, pooled):
    return -x.flatten(1).sum(1)


@pytest.mark.ex1_flow_matching
@pytest.mark.ex3_sde_step
def test_one_candidate_without_noise_is_the_ode_sampler():
    policy, noise = random_small_dit(), torch.randn(3, 1, 16, 16)
    cond, uncond = random_prompts(3, 1), random_prompts(3, 2)
    ode = sample_ode(policy, noise, cond, uncond, steps=6, cfg_scale=3.0, shift=2.0)
    ours, counts = stepwise_sample(Sampler(policy, sigma_schedule(6, 2.0), cond, uncond, 3.0),
                                   noise, search=Search(k=1, beam=1), noise_level=0.0)
    assert torch.equal(ours, ode)
    assert counts == {"nfe": 3 * 6 * 2, "drm_calls": 0}


@pytest.mark.ex3_sde_step
@pytest.mark.ex5_beam_search
def test_greedy_keeps_the_successor_the_drm_likes_best():
    N, k, steps = 3, 4, 5
    policy, drm = Recorder(random_small_dit()), Recorder(minus_pixel_sum)
    cond = random_prompts(N)
    final, counts = stepwise_sample(Sampler(policy, sigma_schedule(steps), cond, None, 1.0),
                                    torch.randn(N, 1, 16, 16), drm_on(drm, cond),
                                    search=Search(k=k), generator=torch.Generator().manual_seed(0))
    assert len(drm.inputs) == steps
    kept = policy.inputs[1:] + [final]  # the state each step handed on
    for successors, state in zip(drm.inputs, kept):
        successors = successors.view(N, k, -1)
        lowest = successors.sum(2).argmin(1)
        assert torch.equal(state.flatten(1), successors[torch.arange(N), lowest])
    assert counts == {"nfe": policy.passes, "drm_calls": drm.passes} == {"nfe": N * steps,
                                                                         "drm_calls": N * steps * k}


@pytest.mark.ex3_sde_step
@pytest.mark.ex5_beam_search
def test_beam_keeps_the_top_beam_of_all_successors():
    N, k, beam = 2, 3, 2
    policy, drm = Recorder(random_small_dit()), Recorder(minus_pixel_sum)
    cond = random_prompts(N)
    stepwise_sample(Sampler(policy, sigma_schedule(3), cond, None, 1.0), torch.randn(N, 1, 16, 16),
                    drm_on(drm, cond), search=Search(k=k, beam=beam),
                    generator=torch.Generator().manual_seed(0))
    for step, (successors, state) in enumerate(zip(drm.inputs[:-1], policy.inputs[1:])):
        sums = successors.view(N, beam * k, -1).sum(2)
        # the beam lowest pixel sums per image
        top = sums.sort(1).values[:, :beam]
        within(max_abs(state.view(N, beam, -1).sum(2).sort(1).values, top), 1e-4,
               f"beam's pixel sums at step {step}")


@pytest.mark.ex3_sde_step
@pytest.mark.ex5_beam_search
@pytest.mark.parametrize("k, beam, score_every, ode_last, cfg_scale", [
    (4, 1, 1, 0, 1.0), (3, 2, 2, 0, 2.5), (2, 3, 1, 2, 2.5), (2, 2, 3, 0, 1.0)])
def test_counters_match_the_calls_made(k, beam, score_every, ode_last, cfg_scale):
    N, steps = 2, 6
    policy, drm = Recorder(random_small_dit()), Recorder(minus_pixel_sum)
    cond, uncond = random_prompts(N, 1), random_prompts(N, 2)
    final, counts = stepwise_sample(Sampler(policy, sigma_schedule(steps), cond, uncond, cfg_scale),
                                    torch.randn(N, 1, 16, 16), drm_on(drm, cond),
                                    search=Search(k, beam, score_every, ode_last))
    assert final.shape == (N, 1, 16, 16)
    assert counts == {"nfe": policy.passes, "drm_calls": drm.passes}
    assert counts["nfe"] == N * beam * steps * (2 if cfg_scale != 1 else 1)


@pytest.mark.ex1_flow_matching
@pytest.mark.ex3_sde_step
def test_best_of_n_picks_the_drms_favourite_of_n_whole_samples():
    N, n = 2, 5
    policy, drm = Recorder(random_small_dit()), Recorder(minus_pixel_sum)
    cond, noise = random_prompts(N), torch.randn(N * n, 1, 16, 16)
    picked, counts = best_of_n(Sampler(policy, sigma_schedule(4), cond, None, 1.0), noise,
                               drm_on(drm, cond), n=n)
    everything = sample_ode(policy.fn, noise, tuple(t.repeat_interleave(n, 0) for t in cond),
                            steps=4)
    best = everything.view(N, n, -1).sum(2).argmin(1)
    within(max_abs(picked, everything.view(N, n, 1, 16, 16)[torch.arange(N), best]), 1e-6,
           "picked sample")
    assert counts == {"nfe": policy.passes, "drm_calls": drm.passes} == {"nfe": N * n * 4,
                                                                         "drm_calls": N * n}


def test_bad_search_settings_are_refused():
    policy, cond = random_small_dit(), random_prompts(1)
    sampler = Sampler(policy, sigma_schedule(4), cond, None, 1.0)
    with pytest.raises(ValueError, match="needs a DRM"):
        stepwise_sample(sampler, torch.randn(1, 1, 16, 16), search=Search(k=4))
    with pytest.raises(ValueError, match="ode_last"):
        stepwise_sample(sampler, torch.randn(1, 1, 16, 16), search=Search(ode_last=5))
