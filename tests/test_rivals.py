"""The rivals on the one SDE-candidate core: tree rollouts and SDE windows (training),
particle search and pruned best-of-N (sampling), the Thurstone loss and the noise ensemble (the
DRM). Each against an independent reference: numbers by hand, a reference's formula written out from
its code, a plain Euler loop, or a property that must hold."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import max_abs, within
from conftest import random_prompts as prompts
from conftest import random_small_dit as random_dit
from test_sample import Recorder

import grpo
import train_ops
import train_policy
from common import run_main
from grpo import Candidates, grpo_loss, sample_rollout
from rivals.credit import (CREDIT, cosine_advantages, cosine_weights, parse_window, sample_tree,
                           terminal_advantages, tree_advantages, window_at)
from rivals.reward import thurstone_loss, with_ensemble
from rivals.search import prune_sample, smc_sample
from sample import best_of_n, stepwise_sample
from sde import (Draws, Sampler, drm_on, gaussian_log_prob, guided_velocity, propose, sample_ode,
                 sde_mean_std, sigma_schedule, take)

TRAINING = [pytest.mark.ex1_flow_matching, pytest.mark.ex2_drm, pytest.mark.ex3_sde_step,
            pytest.mark.ex4_grpo]

# -----------------------------------------------------------------------------
# A. Tree rollouts


@pytest.mark.ex4_grpo
def test_tree_advantages_by_hand():
    """One root, splits at steps 1 and 3 of 5, two children each: leaves (a, b) under the first
    child, (c, d) under the second, rewards 1, 3, 2, 6."""
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=torch.float64)
    eps = 1e-4
    # level 1: the children's values are their leaves' means, 2 and 4: mean 3, population std 1
    first = 1 / (1 + eps)
    # level 2: siblings (1, 3): std 1; siblings (2, 6): std 2
    second = [-1 / (1 + eps), 1 / (1 + eps), -2 / (2 + eps), 2 / (2 + eps)]
    # before the first split: one node
    expected = torch.tensor([[0.0] * 4,
                             [-first, -first, first, first], [-first, -first, first, first],
                             second, second], dtype=torch.float64)
    advantages = tree_advantages(rewards, (1, 3), 2, T=5, by="siblings")
    assert advantages.shape == (5, 4, 1)
    within(max_abs(advantages.squeeze(-1), expected), 1e-12, "advantages")


def test_tree_advantages_by_depth_are_branchgrpos():
    """BranchGRPO's compute_hierarchical_advantages_by_depth (fastvideo/train_branchgrpo_flux.py),
    written out: all of a tree's nodes at one depth together, torch's std (ddof 1), zero when std <
    1e-6, else (r - mean) / (std + 1e-8); the default."""
    torch.manual_seed(0)
    rewards = torch.randn(2 * 8, dtype=torch.float64)                  # 2 roots, 3 splits of 2
    ours = tree_advantages(rewards, (0, 2, 4), 2, T=6).squeeze(-1)
    for root in range(2):
        leaves = rewards[root * 8:(root + 1) * 8]
        for depth, step in zip((1, 2, 3), (0, 2, 4)):
            nodes = leaves.view(2 ** depth, -1).mean(1)
            std = nodes.std()
            branchgrpo = (torch.zeros_like(nodes) if std < 1e-6
                          else (nodes - nodes.mean()) / (std + 1e-8))
            n = len(nodes)
            mine = ours[step, root * 8:(root + 1) * 8].view(n, -1)
            assert torch.equal(mine, mine[:, :1].expand_as(mine))          # one value per node
            within(((mine[:, 0] - branchgrpo).abs() / branchgrpo.abs()).max().item(), 1e-12,
                   f"root {root}'s advantages at depth {depth}")
    # equal leaves: 0, not 0 / 0
    same = torch.zeros(8, dtype=torch.float64)
    assert torch.equal(tree_advantages(same, (0, 2, 4), 2, T=6),
                       torch.zeros(6, 8, 1, dtype=torch.float64))


@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_tree_rollout_shares_prefixes_trains_each_edge_once_and_replays(cfg_scale):
    policy, roots, T = random_dit(), 2, 5
    cond, uncond = prompts(roots, 1), prompts(roots, 2)
    noise = torch.randn(roots, 1, 16, 16)
    tree = sample_tree(Sampler(policy, sigma_schedule(T), cond, uncond, cfg_scale), noise,
                       split_steps=(1, 3), branch=2, noise_level=0.7,
                       draws=Draws(torch.Generator().manual_seed(0)))
    L = roots * 4
    assert tree.states.shape[:2] == (T, L) and tree.candidates.shape[:3] == (T, L, 1)
    assert torch.equal(tree.states[0], noise.repeat_interleave(4, 0))
    # a root's states, and edges, a step
    nodes, children = [1, 1, 2, 2, 4], [1, 2, 2, 4, 4]
    for t in range(T):
        distinct = [torch.unique(tree.states[t, r * 4:(r + 1) * 4].flatten(1), dim=0)
                    for r in range(roots)]
        assert [len(d) for d in distinct] == [nodes[t]] * roots
        nxt = tree.states[t + 1] if t < T - 1 else tree.final
        assert torch.equal(tree.candidates[t, :, 0], nxt)
    # every edge from the first split on is trained once: a root has 2 + 2 + 4 children at steps
    # 1..3; the last step's 4 are sampled, not trained
    assert (tree.trained[0].sum() == tree.trained[T - 1].sum() == 0
            and tree.trained.sum() == roots * 8)
    for t in range(1, T - 1):
        edges = tree.candidates[t, tree.trained[t], 0].flatten(1)
        assert len(torch.unique(edges, dim=0)) == len(edges) == roots * children[t]
    assert tree.nfe == roots * sum(nodes) * (2 if cfg_scale != 1 else 1)
    step_ids, rows = tree.trained.nonzero(as_tuple=True)
    _, stats = grpo_loss(policy, tree, torch.randn(T, L, 1), step_ids, rows)
    # the stored log-probs replay
    within(stats["ratio_max_deviation"].item(), 1e-5, "ratio's deviation from 1")
    # each leaf keeps its root's prompt
    assert torch.equal(tree.cond[0], cond[0].repeat_interleave(4, 0))


def test_credit_advantages_slice_a_ranks_trees():
    rewards = torch.randn(16)
    tree = type("Rollout", (), {"states": torch.zeros(6, 8)})()
    whole = tree_advantages(rewards, (0, 3), 2, T=6)
    cfg = policy_config("--credit=tree", "--split_steps=0,3", "--branch=2")
    mine = CREDIT["tree"].advantages(cfg, tree, rewards, slice(8, 16))
    assert torch.equal(mine, whole[:, 8:16])

# -----------------------------------------------------------------------------
# A. SDE windows


def euler(policy, x, sigmas, steps, cond, uncond, cfg_scale):
    """A plain Euler loop over the given step indices: the reference path outside a window."""
    for i in steps:
        x = x + (sigmas[i + 1] - sigmas[i]) * guided_velocity(policy, x, sigmas[i], cond, uncond,
                                                              cfg_scale)
    return x


@pytest.mark.ex3_sde_step
def test_a_window_is_the_ode_path_outside_it_and_scores_only_inside():
    policy, B, T, k = random_dit(), 3, 6, 3
    cond, uncond = prompts(B, 1), prompts(B, 2)
    noise, sigmas = torch.randn(B, 1, 16, 16), sigma_schedule(T)
    scored = []

    def reward(x, sigma, rows):
        return scored.append(sigma[0].item()) or x.mean((1, 2, 3))
    rollout = sample_rollout(Sampler(policy, sigmas, cond, uncond, 2.0), noise, noise_level=0.7,
                             candidates=Candidates(k, reward), window=(2, 4),
                             draws=Draws(torch.Generator().manual_seed(0)))
    assert torch.equal(rollout.states[2], euler(policy, noise, sigmas, range(2), cond, uncond, 2.0))
    assert torch.equal(rollout.final,
                       euler(policy, rollout.states[4], sigmas, range(4, 6), cond, uncond, 2.0))
    assert not torch.equal(rollout.states[3],
                           euler(policy, rollout.states[2], sigmas, [2], cond, uncond, 2.0))
    # the DRM only inside the window
    assert scored == [sigmas[3].item(), sigmas[4].item()]
    assert rollout.trained.tolist() == [[t in (2, 3)] * B for t in range(T)]
    assert (rollout.rewards[[0, 1, 4, 5]] == 0).all() and rollout.nfe == B * T * 2


@pytest.mark.parametrize("credit, window, splits, last", [
    pytest.param("stepwise", "1:3", "", False, marks=TRAINING),
    # the last step (3) left out
    pytest.param("sparse", "2:4", "", False, marks=TRAINING),
    # --train_last_step: steps 2 and 3
    pytest.param("sparse", "2:4", "", True, marks=TRAINING),
    pytest.param("cosine", "0:2", "", False, marks=TRAINING),
    pytest.param("tree", "1:4", "1,2", False, marks=TRAINING)])
def test_a_window_trains_exactly_the_steps_inside_it(credit, window, splits, last, tmp_path,
                                                     monkeypatch):
    """The real training loop, its loss spied on: every pair it trains lies in the window (less the
    last step unless --train_last_step), each once."""
    seen = []

    def spy(policy, rollout, advantages, step_ids, rows, **settings):
        seen.extend(zip(step_ids.tolist(), rows.tolist()))
        return grpo_loss(policy, rollout, advantages, step_ids, rows, **settings)
    monkeypatch.setattr(grpo, "grpo_loss", spy)
    a, b = map(int, window.split(":"))
    args = ["--steps=4", "--trajectories=8", "--per_prompt=4", "--updates=1",
            "--eval_every=1", "--eval_per_prompt=1", "--eval_steps=2", f"--credit={credit}",
            f"--sde_window={window}", f"--train_last_step={last}", f"--out_dir={tmp_path}"]
    args += ["--k=2"] if credit == "stepwise" else []
    args += [f"--split_steps={splits}"] if credit == "tree" else []
    run_main(train_policy.main, train_policy.Config, args)
    steps = [t for t in range(a, b) if t < 3 or last]
    assert len(seen) == len(set(seen)) and {t for t, _ in seen} <= set(steps)
    if credit != "tree":
        assert sorted(seen) == [(t, r) for t in steps for r in range(8)]
    else:
        # 2 roots, splits at 1 and 2: children at steps 1, 2 = 2 + 4 a root (step 3, the last,
        # untrained)
        assert len(seen) == 2 * 6

# -----------------------------------------------------------------------------
# B. Particle search and pruned best-of-N


def constant(x, sigma, context, pooled):
    return torch.full((len(x),), 3.0)


def mean_pixel(x, sigma, context, pooled):
    return x.flatten(1).mean(1)


@pytest.mark.ex3_sde_step
@pytest.mark.parametrize("potential", ["diff", "max"])
def test_smc_with_a_constant_potential_and_the_ess_test_never_resamples_and_is_plain_sde_sampling(
        potential):
    N, P, steps = 2, 3, 4
    policy, cond, uncond = random_dit(), prompts(N, 1), prompts(N, 2)
    noise = torch.randn(N * P, 1, 16, 16)
    ours, counts = smc_sample(policy, noise, cond, uncond, constant, cond, particles=P, steps=steps,
                              cfg_scale=2.0, potential=potential, adaptive=True,
                              generator=torch.Generator().manual_seed(0))
    owners = torch.arange(N).repeat_interleave(P)
    plain, _ = stepwise_sample(Sampler(policy, sigma_schedule(steps), take(cond, owners),
                                       take(uncond, owners), 2.0), noise, noise_level=0.7,
                               generator=torch.Generator().manual_seed(0))
    assert counts["resampled"] == 0
    # equal weights: the first particle
    assert torch.equal(ours, plain.view(N, P, 1, 16, 16)[:, 0])
    _, counts = smc_sample(policy, noise, cond, uncond, constant, cond, particles=P, steps=steps,
                           cfg_scale=2.0, potential=potential,
                           generator=torch.Generator().manual_seed(0))
    # FK's schedule resamples steps 1 and 2 regardless; the last asks the ESS
    assert counts["resampled"] == N * 2


@pytest.mark.ex3_sde_step  # its particles take the SDE step
def test_smc_resamples_on_fk_steerings_interval():
    """fkd_class.py's rule: np.arange(resampling_t_start, resampling_t_end + 1, resample_frequency)
    and the last step; its launch scripts' settings, and ours scaled to 20 steps; on a hand-made
    run, the DRM scores those steps alone."""
    def fk(steps, every, start, end):
        return sorted(set(range(start, end + 1, every)) | {steps - 1})
    from rivals.search import resampling_steps
    for settings in ((100, 5, 5, 30), (100, 20, 20, 80), (20, 1, 1, 6), (20, 4, 4, 16)):
        assert resampling_steps(*settings) == fk(*settings)
    assert resampling_steps(20) == [1, 2, 3, 4, 5, 6, 19]
    N, P, steps = 1, 2, 8
    cond, sigmas, seen = prompts(N), sigma_schedule(8), []

    def drm(x, sigma, context, pooled):
        seen.append(sigma[0].item())
        return x.flatten(1).mean(1)
    smc_sample(random_dit(), torch.randn(N * P, 1, 16, 16), cond, None, drm, cond, particles=P,
               steps=steps, score="noisy", schedule=(2, 1, 5),
               generator=torch.Generator().manual_seed(0))
    # then the final favourite at sigma 0
    assert seen == [sigmas[i + 1].item() for i in (1, 3, 5, 7)] + [0.0]


@pytest.mark.ex3_sde_step
@pytest.mark.parametrize("potential", ["diff", "max"])
def test_smc_with_one_dominant_particle_keeps_only_its_copies(potential):
    N, P = 2, 4
    drm = Recorder(mean_pixel)
    cond = prompts(N)
    noise = torch.randn(N * P, 1, 16, 16)
    # particle 0 of each image: far ahead
    noise[::P] += 10
    smc_sample(random_dit(), noise, cond, None, drm, cond, particles=P, steps=3,
               potential=potential, generator=torch.Generator().manual_seed(0))
    first, second = drm.inputs[0].flatten(1).mean(1), drm.inputs[1].flatten(1).mean(1)
    # before: one leader an image
    assert (first > 5).sum() == N
    # after resampling: its copies only
    assert (second > 5).all()


@pytest.mark.ex3_sde_step
@pytest.mark.parametrize("potential", ["diff", "max"])
def test_smc_runs_at_any_lambda_in_range(potential):
    """Weights in log space: every particle's score falls by ~1 between two scored steps, so at
    lambda 1e4 every exp(lambda x gain) of an image underflows to 0 in float32 (it normalised to
    NaN and torch.multinomial raised); in log space the particle that fell least takes all the
    weight, as the limit says."""
    N, P, calls = 2, 4, []

    def falling(x, sigma, context, pooled):  # each call's scores 1 below the last; particle 2 best
        calls.append(x)
        return -float(len(calls)) + 0.01 * (torch.arange(len(x)) % P == 2).float()
    cond = prompts(N)
    x0, _ = smc_sample(random_dit(), torch.randn(N * P, 1, 16, 16), cond, None, falling, cond,
                       particles=P, steps=4, potential=potential, lmbda=1e4,
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x0).all()
    if potential == "diff":  # (max's potential, max(r, 0), is 0 for every particle here)
        # after the second scoring, every image's particles are copies of its particle 2
        assert all(torch.equal(calls[2][i * P], calls[2][i * P + j]) for i in range(N)
                   for j in range(P))


@pytest.mark.ex3_sde_step
def test_pruning_keeps_the_trajectory_the_drm_prefers():
    N, P, steps = 2, 4, 6
    policy, cond, uncond = random_dit(), prompts(N, 1), prompts(N, 2)
    noise = torch.randn(N * P, 1, 16, 16)
    # the DRM will prefer particle 2
    noise[2::P] += 3
    ours, counts = prune_sample(policy, noise, cond, uncond, mean_pixel, cond, particles=P,
                                steps=steps, cfg_scale=2.0, prune_at=(0.7,), keep=0.25)
    owners = torch.arange(N).repeat_interleave(P)
    ode = sample_ode(policy, noise, take(cond, owners), take(uncond, owners), steps=steps,
                     cfg_scale=2.0)
    within(max_abs(ours, ode.view(N, P, 1, 16, 16)[:, 2]), 1e-5, "survivor")
    # one survivor: no final pick
    assert counts["drm_calls"] == N * P


@pytest.mark.ex3_sde_step
@pytest.mark.parametrize("method, settings", [
    ("smc", dict(particles=3, schedule=(2, 0, 3))),
    ("smc", dict(particles=2, potential="max", score="noisy")),
    ("prune", dict(particles=4, prune_at=(0.8, 0.4), keep=0.5)),
    ("prune", dict(particles=3, prune_at=(0.5,), keep=0.7)), ("best_of", dict(n=3))])
def test_search_counters_match_the_calls_made(method, settings):
    N, steps = 2, 5
    policy, drm = Recorder(random_dit()), Recorder(mean_pixel)
    cond, uncond = prompts(N, 1), prompts(N, 2)
    width = settings.get("particles", settings.get("n"))
    noise = torch.randn(N * width, 1, 16, 16)
    if method == "best_of":
        final, counts = best_of_n(Sampler(policy, sigma_schedule(steps), cond, uncond, 2.0), noise,
                                  drm_on(drm, cond), **settings)
    else:
        sampler = {"smc": smc_sample, "prune": prune_sample}[method]
        extra = dict(generator=torch.Generator().manual_seed(0)) if method == "smc" else {}
        final, counts = sampler(policy, noise, cond, uncond, drm, cond, steps=steps, cfg_scale=2.0,
                                **settings, **extra)
    assert final.shape == (N, 1, 16, 16)
    assert counts["nfe"] == policy.passes and counts["drm_calls"] == drm.passes

# -----------------------------------------------------------------------------
# C. The DRM beside DiNa-LRM: the Thurstone loss and the noise ensemble


def test_thurstone_loss_is_dina_lrms():
    """diffusion_rm/train/engine.py's compute_loss, model_type "thurstone", written out per pair
    with math.erf: var = 2 sigma^2 + 0.05, p = Phi((s_c - s_r) / sqrt(var + var + 1e-6)), loss 1 -
    sqrt(p + 1e-6)."""
    torch.manual_seed(0)
    win, lose, sigma = torch.randn(16, dtype=torch.float64), torch.randn(16,
        dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    ours = thurstone_loss(win, lose, sigma)
    for i in range(16):
        var = 2.0 * sigma[i].item() ** 2 + 0.05
        cur = (win[i].item() - lose[i].item()) / (var + var + 1e-6) ** 0.5
        p = 0.5 * (1 + math.erf(cur / math.sqrt(2)))
        within(abs(ours[i].item() - (1 - math.sqrt(p + 1e-6))), 1e-12, f"loss {i}")
    margin = torch.tensor([0.5, 0.5])
    low, high = thurstone_loss(margin, torch.zeros(2), torch.tensor([0.1, 0.9]))
    # the same margin is less sure at higher noise
    assert high > low


def test_noise_ensemble_carries_states_forward_by_the_flow_and_averages():
    drm = Recorder(mean_pixel)
    x0, z = torch.randn(4, 1, 64, 64), torch.randn(4, 1, 64, 64)
    sigma = torch.tensor([0.0, 0.1, 0.3, 0.6])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * z
    ensemble = with_ensemble(drm, 3, 0.3)
    scores = ensemble(x, sigma, *prompts(4))
    assert len(drm.inputs) == 3
    draws = torch.stack(drm.inputs)                       # (3, 4, 1, 64, 64)
    within(max_abs(scores, draws.flatten(2).mean(2).mean(0)), 1e-6, "scores")
    for row, u in ((0, 0.3), (1, 0.3)):                   # below 0.3: (1 - u) x0 + u z', z' fresh
        residual = (draws[:, row] - (1 - u) * x0[row]) / u
        # sampling, not rounding: 256 draws' mean and std within 0.05 of N(0, 1)'s (seen 0.008)
        assert residual.mean().abs().item() < 0.05 and (residual.std() - 1).abs().item() < 0.05
    assert torch.equal(draws[:, 2:], x[2:].expand(3, -1, -1, -1, -1))   # at or above 0.3: as it is
    assert with_ensemble(drm, 1, 0.0) is drm

# -----------------------------------------------------------------------------
# C. Rivals as their code runs them, and one accounting for all (train_policy.py)


def policy_config(*args):
    from common import parse_flags
    return parse_flags(train_policy.Config(), list(args))


@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
def test_two_credit_modes_draw_the_same_prompts_and_initial_noise():
    """Common random numbers: with one seed, the paper's batch and a rival's (sparse: the same
    groups) start each update from the same prompts and noises, a tree grows its prompt's leaves
    from the same first noise; the next update draws anew."""
    from base import load_base
    from common import Ranks
    base = load_base(policy_config().pretrained, torch.device("cpu"))
    drm, drm_text, _ = base.load_drm("data/drm.safetensors", "cpu")
    prompts = base.train_prompts("")
    models = train_ops.Models(base.dit, base.dit, None, drm, drm_text, None)
    starts = {}
    for name, args in (("stepwise", ["--credit=stepwise", "--trajectories=8"]),
                       ("sparse", ["--credit=sparse", "--trajectories=8"]),
                       ("tree", ["--credit=tree", "--split_steps=0", "--trajectories=2",
                                 "--per_prompt=2"])):
        cfg = policy_config(*args, "--steps=2")
        for update in (1, 2):
            batch = train_ops.draw_batch(cfg, base, models, prompts, Ranks(), update=update,
                                         per_prompt=2 if name == "tree" else 4)
            rollout = (CREDIT["tree"].rollout(cfg, batch, None) if name == "tree"
                       else sample_rollout(batch.sampler, batch.noise, draws=batch.draws))
            starts[name, update] = rollout.states[0], rollout.cond[0]
    for update in (1, 2):
        (noise, context), (noise2, context2) = starts["stepwise", update], starts["sparse", update]
        assert torch.equal(noise, noise2) and torch.equal(context, context2)
        # one prompt, 2 leaves from one root
        tree_noise, tree_context = starts["tree", update]
        assert torch.equal(tree_noise[0], noise[0]) and torch.equal(tree_context[0], context[0])
    assert not torch.equal(starts["sparse", 1][0], starts["sparse", 2][0])
    assert train_ops.streams(0, 3).sde.initial_seed() != train_ops.streams(1, 3).sde.initial_seed()


def test_windows_are_flow_grpo_fasts_and_mixgrpos():
    """random:3 (Flow-GRPO-Fast's sd3_pipeline_with_logprob_fast.py: start = randint(0, num_steps //
    2 - size), inclusive) and slide:2:3 (MixGRPO's grpo_states.py: the start moves one step every 3
    updates, the window cut at steps - 2, back to 0 past it), on 10 steps."""
    window = parse_window("random:3", 10)
    windows = [window_at(window, 10, u, train_ops.streams(0, u).window) for u in range(1, 61)]
    assert {w[0] for w in windows} == {0, 1, 2} and all(b - a == 3 for a, b in windows)
    assert windows[4] == window_at(window, 10, 5, train_ops.streams(0, 5).window)  # one an update
    window = parse_window("slide:2:3", 10)
    # MixGRPO's GRPOTrainingStates (fastvideo/utils/grpo_states.py) with group_size 2,
    # iters_per_group 3, max_timesteps = sampling_steps - 2 = 8, prog_overlap_step 1, written out
    # by hand for its iterations 0-23: range(s, min(s + 2, 8)), s = iteration // 3
    mixgrpo = ([(0, 2)] * 3 + [(1, 3)] * 3 + [(2, 4)] * 3 + [(3, 5)] * 3 + [(4, 6)] * 3
               + [(5, 7)] * 3 + [(6, 8)] * 3 + [(7, 8)] * 3)
    assert [window_at(window, 10, u, None) for u in range(1, 25)] == mixgrpo
    # its iterations 24-26 (s = 8) train no step (range(8, 8)), then roll back; ours rolls back
    # at once (the documented difference)
    assert [window_at(window, 10, u, None) for u in range(25, 28)] == [(0, 2)] * 3
    assert window_at(parse_window("2:6", 10), 10, 7, None) == (2, 6)
    assert window_at(parse_window("", 10), 10, 7, None) is None


@pytest.mark.ex4_grpo
def test_global_std_is_flow_grpos_stat_tracker():
    """Flow-GRPO's stat_tracking.py with global_std=True: (r - the prompt's mean) / (np.std(all
    rewards) + 1e-4)."""
    import numpy as np

    rewards = torch.randn(12,
                          dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]).repeat_interleave(4)
    r = rewards.numpy()
    theirs = np.concatenate([(r[i:i + 4] - r[i:i + 4].mean()) / (np.std(r) + 1e-4)
                             for i in range(0, 12, 4)])
    # element-wise relative (np.allclose's default atol 1e-8 dropped)
    ours, theirs_t = terminal_advantages(rewards, 4, group_std="global"), torch.from_numpy(theirs)
    within(((ours - theirs_t).abs() / theirs_t.abs()).max().item(), 1e-12, "advantages")
    assert not np.allclose(terminal_advantages(rewards, 4).numpy(), theirs)


@pytest.mark.ex3_sde_step
def test_a_split_draws_branchgrpos_std_and_keeps_the_steps_log_prob():
    """BranchGRPO's split (train_branchgrpo_flux.py, flux_step_with_split): the children are the
    step's mean plus split_noise_scale x eta sqrt(dsigma) x z, DanceGRPO's std (eta 0.3) times its
    script's 4.0, written here from its code; their log-probs under the step's own std, so a replay
    has ratio 1. Float32 rounding of x_next - mean: ~1e-7; the x4-of-our-std bug: 4e-1."""
    policy, noise = random_dit(), torch.randn(1, 1, 16, 16)
    cond, sigmas = prompts(1, 1), sigma_schedule(3)
    tree = sample_tree(Sampler(policy, sigmas, cond, None, 1.0), noise, split_steps=(0,), branch=2,
                       split_noise=4.0, split_eta=0.3,
                       draws=Draws(torch.Generator().manual_seed(0)))
    z = torch.randn((1, 2, 1, 16, 16), generator=torch.Generator().manual_seed(0))[0]
    branchgrpo = 4.0 * 0.3 * math.sqrt(sigmas[0] - sigmas[1]) * z                     # (2, ...)
    within(max_abs(tree.candidates[0, :2, 0] - tree.means[0, :2], branchgrpo), 1e-5,
           "children - mean")
    _, std = sde_mean_std(tree.states[0], torch.zeros_like(noise), sigmas[0], sigmas[1], 0.7)
    within(max_abs(tree.log_probs[0, :, 0],
                   gaussian_log_prob(tree.candidates[0, :, 0], tree.means[0], std)), 1e-5,
           "log_prob")
    step_ids, rows = tree.trained.nonzero(as_tuple=True)
    _, stats = grpo_loss(policy, tree, torch.randn(3, 2, 1), step_ids, rows)
    within(stats["ratio_max_deviation"].item(), 1e-5, "ratio's deviation from 1")


@pytest.mark.ex3_sde_step
def test_a_trees_leaves_are_images_of_the_bases_quality():
    """On the shipped base model, untrained: the leaves of BranchGRPO's trees (splits 0, 1, 3, 4 of
    10 steps, 16 leaves a root) score the gold of plain SDE chains from the same roots, within 0.15
    (measured: -1.109 against -1.111 over 4 roots x 16). With the split noise x4 on our SDE's
    std (2.6 at sigma 1, larger than the state) the leaves scored -15.2."""
    from data.toy import ToyBase
    base = ToyBase.load("data/base.safetensors", "cpu")
    names = base.train_prompts("")[:4]
    roots = torch.randn((4, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    cond, uncond = base.encode(names)
    sigmas, leaves = sigma_schedule(10), [p for p in names for _ in range(16)]
    sampler = Sampler(base.dit, sigmas, cond, uncond, 4.0)
    tree = sample_tree(sampler, roots, split_steps=(0, 1, 3, 4), branch=2,
                       draws=Draws(torch.Generator().manual_seed(1)))
    chains = sample_rollout(sampler.rows(torch.arange(4).repeat_interleave(16)),
                            roots.repeat_interleave(16, 0), noise_level=0.7,
                            draws=Draws(torch.Generator().manual_seed(2)))
    gold = [base.judge(base.to_images(base.finish(x)), leaves)["gold"].mean().item()
            for x in (tree.final, chains.final)]
    assert abs(gold[0] - gold[1]) < 0.15, gold  # sampling, not rounding


@pytest.mark.ex3_sde_step  # its candidates take the SDE step
@pytest.mark.parametrize("score", ["noisy", "x0", "x0_proxy", "lookahead"])
def test_counters_are_the_passes_made(score, tmp_path, monkeypatch):
    """The real loop: the DiT passes and DRM passes an update reports are the rows the policy and
    the DRM were called on (a guided pass: two rows), lookahead's ODE completions included; the
    DiT-pass equivalents their weighted sum."""
    rows, hooks = {"dit": 0, "drm": 0}, []
    real_draw, real_evaluate = train_ops.draw_batch, train_ops.evaluate_and_save

    def stop_counting():
        while hooks:
            hooks.pop().remove()

    def counted(cfg, base, models, *args, **kwargs):  # an update starts: count its passes
        stop_counting()
        hooks.extend([models.policy.register_forward_hook(
                          lambda m, i, o: rows.__setitem__("dit", rows["dit"] + len(i[0]))),
                      models.drm.register_forward_hook(
                          lambda m, i, o: rows.__setitem__("drm", rows["drm"] + len(i[0])))])
        return real_draw(cfg, base, models, *args, **kwargs)

    def uncounted(*args, **kwargs):  # an evaluation: not the update's
        stop_counting()
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(train_ops, "draw_batch", counted)
    monkeypatch.setattr(train_ops, "evaluate_and_save", uncounted)
    args = ["--steps=3", "--trajectories=4", "--k=2", "--per_prompt=2", "--updates=2",
            "--eval_every=2", "--eval_per_prompt=1", "--eval_steps=2", f"--score={score}",
            f"--out_dir={tmp_path}"]
    run_main(train_policy.main, train_policy.Config, args)
    record = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert record["nfe"] == rows["dit"] and record["drm_calls"] == rows["drm"]
    # lookahead: 2 updates x 4 trajectories x k = 2 x guidance 2 x (2 + 1) steps to go from steps 0
    # and 1
    lookahead = 2 * 4 * 2 * 2 * (2 + 1) if score == "lookahead" else 0
    # x0: a guided pass per candidate at the 2 trained steps, 2 updates x 4 x k = 2 x 2 x 2
    own_x0 = 2 * 4 * 2 * 2 * 2 if score == "x0" else 0
    # rollout, loss, (lookahead, x0) x 2 updates
    assert rows["dit"] == 2 * (4 * 3 * 2 + 4 * 2 * 2) + lookahead + own_x0
    # 4 trajectories x 2 trained steps x k
    assert rows["drm"] == 2 * 4 * 2 * 2
    # the loss's policy passes, each with its backward: 2 updates x 4 x 2 trained steps x guidance
    assert record["backward_passes"] == 2 * 4 * 2 * 2
    weighted = (record["nfe"] + record["backward_cost"] * record["backward_passes"]
                + record["drm_cost"] * record["drm_calls"])
    within(abs(record["dit_equivalents"] - weighted) / abs(weighted), 1e-6, "DiT-pass equivalents")
    # 3 of the 6 blocks and a small head; a backward computes the inputs' and weights' gradients
    assert 0.4 < record["drm_cost"] < 0.7 and 1.8 < record["backward_cost"] < 2.2


class Precision:
    """A stand-in for Models.precision (bf16 autocast on a GPU) that says whether a pass is inside
    it, and how deep it was ever entered in itself."""
    depth = deepest = 0

    def __enter__(self):
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)

    def __exit__(self, *exc):
        self.depth -= 1


@pytest.mark.parametrize("args", [
    pytest.param(["--k=2"], marks=TRAINING, id="stepwise"),
    pytest.param(["--credit=sparse"], marks=TRAINING, id="sparse"),
    pytest.param(["--objective=nft", "--credit=sparse"],
                 marks=[pytest.mark.ex1_flow_matching, pytest.mark.ex2_drm], id="nft")])
def test_every_pass_of_an_update_runs_in_the_models_precision(args, tmp_path, monkeypatch):
    """The real loop: every policy and DRM pass of an update, the paper's and a rival's, runs
    inside the one precision context build_models makes (on a GPU a pass outside it would run in
    float32: twice the memory, no tensor cores, and numbers other than the rest's), and never
    inside it twice (one torch.autocast object entered in itself leaves autocast on after both
    exits)."""
    precision, inside, now = Precision(), [], SimpleNamespace(watching=False)
    real_draw, real_evaluate = train_ops.draw_batch, train_ops.evaluate_and_save

    def watched(cfg, base, models, *rest, **kwargs):  # an update starts: watch its passes
        if models.precision is not precision:  # the first: swap the context, hook the modules
            models.precision = precision
            for module in (models.policy, models.drm, *models.kept.values()):
                module.register_forward_pre_hook(
                    lambda m, i: inside.append(precision.depth > 0) if now.watching else None)
        now.watching = True
        return real_draw(cfg, base, models, *rest, **kwargs)

    def unwatched(*rest, **kwargs):  # an evaluation: not the update's
        now.watching = False
        return real_evaluate(*rest, **kwargs)
    monkeypatch.setattr(train_ops, "draw_batch", watched)
    monkeypatch.setattr(train_ops, "evaluate_and_save", unwatched)
    run_main(train_policy.main, train_policy.Config,
             ["--steps=3", "--trajectories=4", "--per_prompt=2", "--updates=1", "--eval_every=1",
              "--eval_per_prompt=1", "--eval_steps=2", *args, f"--out_dir={tmp_path}"])
    assert len(inside) >= 6 and all(inside), f"{inside.count(False)} of {len(inside)} outside"
    assert precision.deepest == 1, f"Models.precision entered {precision.deepest} deep"


@pytest.mark.ex3_sde_step  # a real update takes the SDE step
def test_a_drm_pass_costs_as_much_under_the_noise_ensemble(tmp_path):
    """drm_cost is one DRM pass's FLOPs, measured on the DRM before a rival wraps it: the counters
    count each of the ensemble's passes (NoiseEnsemble.passes), so a wrapped DRM re-noising at 0.75,
    above the measured state's sigma 0.5, would count its 4 passes as one pass and each 4 times."""
    costs = {}
    for name, rival in (("drm", []), ("ensemble", ["--drm_draws=4", "--drm_sigma=0.75"])):
        run_main(train_policy.main, train_policy.Config, [
            "--steps=2", "--trajectories=2", "--per_prompt=2", "--k=2", "--updates=1",
            "--eval_every=1", "--eval_per_prompt=1", "--eval_steps=1",
            f"--out_dir={tmp_path / name}", *rival])
        costs[name] = json.loads(open(tmp_path / name / "metrics.jsonl").readline())["drm_cost"]
    # FLOPs are counted, not timed: the same integers over the same integer
    assert costs["ensemble"] == costs["drm"], costs

# -----------------------------------------------------------------------------
# D. The rival scores and credit rules on a rollout


@pytest.mark.ex3_sde_step
def test_what_the_drm_scores_x0_and_lookahead():
    """The rival scoring rules against the quantities written out (the paper's noisy rule:
    tests/test_grpo.py): x0 sees x_next - sigma_next v at 0 (at noise level 0, the state's own
    x0_hat), lookahead sees a plain Euler loop from x_next to 0."""
    from rivals.scores import SCORES
    policy, B, k, i = random_dit(), 2, 3, 1
    cond, uncond = prompts(B, 1), prompts(B, 2)
    sigmas, x = sigma_schedule(4), torch.randn(B, 1, 16, 16)
    seen = []

    def reward(x, sigma, rows):
        return seen.append((x, sigma, rows)) or x.flatten(1).mean(1)
    rows, sampler = torch.tensor([1, 0]), Sampler(policy, sigmas, cond, uncond, 2.0)
    step = propose(sampler, x, i, noise_level=0.7, k=k,
                   draws=Draws(torch.Generator().manual_seed(0)))
    velocity = guided_velocity(policy, x, sigmas[i], cond, uncond, 2.0)
    SCORES["x0_proxy"](reward, step, i, rows, sampler)
    within(max_abs(seen[-1][0],
                   (step.candidates - sigmas[i + 1] * velocity.unsqueeze(1)).flatten(0, 1)), 1e-6,
           "x0 proxy")
    assert (seen[-1][1] == 0).all()
    euler = propose(sampler, x, i, noise_level=0.0)
    SCORES["x0_proxy"](reward, euler, i, rows, sampler)
    within(max_abs(seen[-1][0], euler.x0_hat), 1e-5, "Euler step's x0_hat")
    # each candidate's own: its velocity where it is, one guided pass each
    _, spent = SCORES["x0"](reward, step, i, rows, sampler)
    candidates = step.candidates.flatten(0, 1)
    context, empty = (tuple(t.repeat_interleave(k, 0) for t in pair) for pair in (cond, uncond))
    own = guided_velocity(policy, candidates, sigmas[i + 1], context, empty, 2.0)
    within(max_abs(seen[-1][0], candidates - sigmas[i + 1] * own), 1e-5, "candidate's x0")
    assert (seen[-1][1] == 0).all() and spent == B * k * 2
    _, spent = SCORES["lookahead"](reward, step, i, rows, sampler)
    completed = step.candidates.flatten(0, 1)
    context, empty = (tuple(t.repeat_interleave(k, 0) for t in pair) for pair in (cond, uncond))
    for j in (2, 3):
        completed = completed + (sigmas[j + 1] - sigmas[j]) * guided_velocity(policy, completed,
            sigmas[j], context, empty, 2.0)
    within(max_abs(seen[-1][0], completed), 1e-5, "lookahead's completion")
    assert (seen[-1][1] == 0).all()
    assert spent == B * k * 2 * 2                                         # 2 steps to go, guided


@pytest.mark.ex4_grpo
def test_terminal_advantages_normalise_per_prompt_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    advantages = terminal_advantages(rewards, group_size=3)
    # std sqrt(2/3), + eps 1e-4 (no rounding: written out). Rounding seen 1e-7; ddof 1: 2e-1
    within(max_abs(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]) / (2 / 3) ** 0.5
                   * (2 / 3) ** 0.5 / ((2 / 3) ** 0.5 + 1e-4)), 1e-5, "first group's advantages")
    within(advantages.view(2, 3).sum(1).abs().max().item(), 1e-5, "groups' advantage sums")
    with pytest.raises(ValueError):
        terminal_advantages(rewards, group_size=4)


def test_cosine_weights_sum_to_one_and_follow_progress():
    g = torch.Generator().manual_seed(0)
    final = torch.randn(3, 1, 8, 8, generator=g)
    # x0_hat moves from noise to the final image; all the progress happens in steps 5-9 of 10
    start = torch.randn(3, 1, 8, 8, generator=g)
    alphas = torch.tensor([0, 0, 0, 0, 0, 0, 0.2, 0.4, 0.6, 0.8])
    x0_hat = torch.stack([(1 - a) * start + a * final for a in alphas])
    weights = cosine_weights(x0_hat, final, window=5)
    within(max_abs(weights.sum(0), 1.0), 1e-6, "weights' sum")
    assert (weights >= 0).all()
    # no credit to steps that did not move towards the end
    within(weights[:5].sum().item(), 1e-6 * 3, "weight of the still steps")
    # a window shares its credit
    within(max_abs(weights[5:], 0.2), 1e-6, "window's weights")


@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_sparse_and_cosine_advantages_broadcast_the_terminal_one():
    policy, B = random_dit(), 4
    rollout = sample_rollout(Sampler(policy, sigma_schedule(6), prompts(B), None, 1.0),
                             torch.randn(B, 1, 16, 16), noise_level=0.7)
    final_rewards = torch.tensor([0.0, 1.0, 5.0, 2.0])
    sparse = CREDIT["sparse"].advantages(policy_config("--credit=sparse", "--per_prompt=2"),
                                         rollout, final_rewards)
    assert sparse.shape == (6, B, 1)
    # the group-normalised terminal reward
    assert torch.equal(sparse[0, :, 0], terminal_advantages(final_rewards, 2))
    assert torch.equal(sparse[0], sparse[-1])
    cfg = policy_config("--credit=cosine", "--per_prompt=2", "--adv_clip=0.5")
    cosine = CREDIT["cosine"].advantages(cfg, rollout, final_rewards)
    # CoCA's window scaled to our steps: 1 (--coca_window's default)
    expected = cosine_advantages(cosine_weights(rollout.x0_hat, rollout.final, 1), final_rewards,
                                 2, 0.5)
    assert cosine.shape == (6, B, 1) and torch.equal(cosine[..., 0], expected)
    # under torchrun a rank holds some of the trajectories: it gathers every rank's weights, keeps
    # its own rows
    # (B, T): what a gather returns
    everyone = cosine_weights(rollout.x0_hat, rollout.final, 1).T

    def on_rank(rows):
        mine = SimpleNamespace(states=rollout.states[:, rows], x0_hat=rollout.x0_hat[:, rows],
                               final=rollout.final[rows])

        def gather(weights):
            assert torch.equal(weights, everyone[rows])
            return everyone
        return CREDIT["cosine"].advantages(cfg, mine, final_rewards, rows, gather)
    assert torch.equal(torch.cat([on_rank(slice(0, 2)), on_rank(slice(2, 4))], dim=1), cosine)
