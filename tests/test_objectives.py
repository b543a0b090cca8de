"""DiffusionNFT and Advantage Weighted Matching (rivals/objectives.py): their losses on hand-made
tensors against the lines of their own code written out here, their gradients on a two-point toy,
where they train on the grid, the DRM's advantage per sigma, and a run of each."""
import json

import pytest
import torch
from conftest import max_abs, within

import train_policy
from common import parse_flags, run_main
from rivals.objectives import (advantages_at, awm_indices, awm_log_prob, awm_loss, draw_pairs,
                               nft_indices, nft_loss)

TRAINING = [pytest.mark.ex1_flow_matching, pytest.mark.ex2_drm]


def hand_made(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 4, 4)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)] + [
        torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)[:n],
        torch.tensor([7.0, -0.6, 2.5], dtype=torch.float64)[:n]]


def test_nft_loss_is_its_codes():
    """scripts/train_nft_sd3.py, lines 908-970 (config beta 1.0 and 0.1, adv_clip_max 5), written
    out as it computes: the advantage clipped and mapped to r, the implicit positive and negative
    predictions, their x0 errors over their detached mean absolute errors in float64."""
    forward_prediction, old_prediction, xt, x0, t, advantages = hand_made()
    for beta in (1.0, 0.1):
        adv_clip_max = 5.0
        advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
        normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
        r = torch.clamp(normalized_advantages_clip, 0, 1)
        t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
        positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
        implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * \
            forward_prediction
        x0_prediction = xt - t_expanded * positive_prediction
        weight_factor = (torch.abs(x0_prediction.double() - x0.double())
                         .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
        positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1,
                                                                                          x0.ndim)))
        negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
                                  .clip(min=0.00001))
        negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(
            dim=tuple(range(1, x0.ndim)))
        ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
        theirs = ori_policy_loss * adv_clip_max
        ours = nft_loss(forward_prediction, old_prediction, xt, x0, t, advantages, beta=beta)
        within(((ours - theirs).abs() / theirs.abs()).max().item(), 1e-12, f"loss at beta {beta}")
    # r clips: an advantage of 7 counts as 5 (r = 1), -0.6 as r = 0.44
    assert nft_loss(*hand_made()[:5], torch.tensor([7.0, 5.0, 0.0], dtype=torch.float64))[0] == \
        nft_loss(*hand_made()[:5], torch.tensor([5.0, 5.0, 0.0], dtype=torch.float64))[0]


def test_awm_loss_is_its_codes():
    """scripts/train_sd3_awm.py's compute_log_prob_awm (weighting "ghuber", ghuber_power 0.25) and
    its exp_first PPO loss (adv_clip_max 5, advantage_max 1, clip_range 1), written out: the value,
    and the gradient with respect to the velocity."""
    noise_pred, random_noise, _, clean_latents, timestep, sample_advantages = hand_made()
    noise_pred.requires_grad_(True)
    model_output = noise_pred.double()
    log_prob = -(model_output - (random_noise.double() - clean_latents.double())) ** 2
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    power = 0.25
    log_prob = -(torch.pow(-log_prob + 1e-10, power) - torch.pow(torch.tensor(1e-10,
                 dtype=log_prob.dtype), power)) * timestep.view(-1) / power
    advantages = torch.clamp(sample_advantages, -5.0, 5.0) / 5.0 * 1.0
    ratio = torch.exp(log_prob - log_prob.detach())
    theirs = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - 1, 1.0 + 1))
    grad_theirs, = torch.autograd.grad(theirs.mean(), noise_pred)
    ours_log_prob = awm_log_prob(noise_pred, random_noise, clean_latents, timestep)
    within(((ours_log_prob - log_prob).abs() / log_prob.abs()).max().item(), 1e-12, "log_prob")
    ours = awm_loss(ours_log_prob, sample_advantages)
    grad_ours, = torch.autograd.grad(ours.mean(), noise_pred)
    # element-wise relative errors (allclose's atol dropped: 1e-8 for the loss, 1e-14 for the
    # gradient)
    within(((ours - theirs).abs() / theirs.abs()).max().item(), 1e-12, "loss")
    within(((grad_ours - grad_theirs).abs() / grad_theirs.abs()).max().item(), 1e-10, "gradient")
    # on-policy the ratio is 1: the loss is minus the scaled advantage, whatever the error
    # (allclose's default rtol 1e-5, element-wise: the advantages are 1, -0.12 and 0.5)
    within(((ours + advantages) / advantages).abs().max().item(), 1e-5, "on-policy loss")


@pytest.mark.parametrize("name", ["nft", "awm"])
def test_the_gradient_points_towards_the_positive_sample(name):
    """Two clean samples, one rewarded (advantage +2), one not (-2), and a model whose clean
    estimate is a free vector theta: v(x_sigma, sigma) = (x_sigma - theta) / sigma, so x_sigma -
    sigma v = theta. A few descent steps on the loss bring theta nearer the positive sample and
    farther from the negative one."""
    g = torch.Generator().manual_seed(0)
    positive, negative = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    x0 = torch.cat([positive, negative])
    start = torch.tensor([0.5, 0.5])
    theta = start.clone().requires_grad_(True)
    advantages = torch.tensor([2.0, -2.0])
    optimizer = torch.optim.SGD([theta], lr=0.01)
    for _ in range(20):
        sigma = torch.rand(2, generator=g) * 0.8 + 0.1
        eps = torch.randn(2, 2, generator=g)
        x_sigma = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        velocity = (x_sigma - theta) / sigma[:, None]
        if name == "nft":  # the old policy: theta before this step
            old = (x_sigma - theta.detach()) / sigma[:, None]
            loss = nft_loss(velocity, old, x_sigma, x0, sigma, advantages).mean()
        else:
            loss = awm_loss(awm_log_prob(velocity, eps, x0, sigma), advantages).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theta = theta.detach()
    assert (theta - positive[0]).norm() < (start - positive[0]).norm() - 0.05
    assert (theta - negative[0]).norm() > (start - negative[0]).norm() + 0.05


def test_where_each_objective_trains_on_the_grid():
    """NFT: each sample 9 distinct of the 10 grid indices (timestep_fraction 0.99), in its own
    order. AWM: train_sd3_awm.py's "discrete" strata of [0, int(0.9 x 14) = 12): boundaries
    linspace(0, 12, 7).long() -> [0,2), [2,4), ..., [10,12), one index in each, the same for every
    sample; over many draws every index of the strata appears and none past them."""
    g = torch.Generator().manual_seed(0)
    nft = nft_indices(10, 5, g)
    assert nft.shape == (5, 9) and all(len(set(row.tolist())) == 9 for row in nft)
    assert len({tuple(row.tolist()) for row in nft}) == 5          # each sample its own order
    seen = set()
    for _ in range(200):
        awm = awm_indices(14, 3, g)
        assert awm.shape == (3, 6) and (awm == awm[:1]).all()      # shared by the samples
        for j, index in enumerate(awm[0].tolist()):
            assert 2 * j <= index < 2 * j + 2
            seen.add(index)
    assert seen == set(range(12))


class Judge:
    """A stand-in DRM: the score of x at sigma is the mean of x's first channel times (1 + sigma);
    counts its rows (every row is one prompt's here)."""
    calls = 0

    def __call__(self, x, sigma, _rows):
        self.calls += len(x)
        return x[:, 0].flatten(1).mean(1) * (1 + sigma)


def test_the_drms_advantage_per_sigma_is_normalised_within_groups_at_one_sigma():
    """stepwise: the DRM scores x_sigma = (1 - sigma) x0 + sigma eps at sigma, and each group of
    per_prompt samples is normalised at that sigma: less its mean, over the std of all (global) +
    1e-4. sparse: the terminal score at sigma 0, the same for every sigma of a sample."""
    cfg = parse_flags(train_policy.Config(), ["--objective=awm", "--per_prompt=2",
                                              "--group_std=global"])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 1, 2, 2, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([[0.9] * 4, [0.5] * 4, [0.2] * 4], dtype=torch.float64)
    for credit in ("stepwise", "sparse"):
        cfg.rival.credit = credit
        judge = Judge()
        advantages, _ = advantages_at(cfg, judge, x0, eps, sigmas)
        for j in range(3):
            s = sigmas[j, 0].item() if credit == "stepwise" else 0.0
            x = (1 - s) * x0 + s * eps[j] if credit == "stepwise" else x0
            score = x[:, 0].flatten(1).mean(1) * (1 + s)
            groups = score.view(2, 2)
            expected = ((groups - groups.mean(1, keepdim=True)) / (score.std(correction=0) + 1e-4)
                        ).flatten()
            within(max_abs(advantages[j], expected), 1e-12, f"{credit} advantages at step {j}")
        assert judge.calls == (12 if credit == "stepwise" else 4)


def test_a_group_shares_its_sigmas_and_noise_when_the_drm_compares_it():
    cfg = parse_flags(train_policy.Config(), ["--objective=nft", "--per_prompt=2",
                                              "--trajectories=4"])
    for credit in ("stepwise", "sparse"):
        cfg.rival.credit = credit
        sigmas, eps = draw_pairs(cfg, 4, (1, 2, 2), torch.Generator().manual_seed(0))
        assert sigmas.shape == (9, 4) and eps.shape == (9, 4, 1, 2, 2)
        same = [torch.equal(sigmas[:, 0], sigmas[:, 1]), torch.equal(eps[:, 0], eps[:, 1])]
        assert all(same) if credit == "stepwise" else not any(same)


@pytest.mark.parametrize("args, says", [
    (["--objective=nft", "--credit=tree"], "takes --credit=sparse"),
    (["--objective=awm", "--kl_weight=0.01"], "has its own loss and KL: drop --kl_weight"),
    # PPO's flags that NFT and AWM ignore are refused as their siblings are
    (["--objective=nft", "--noise_level=0.5", "--score=x0"], "drop --noise_level, --score"),
    (["--objective=dpo"], "--objective=dpo: choose one of ppo, nft, awm")])
def test_an_objective_refuses_what_it_cannot_do(args, says, tmp_path):
    with pytest.raises(SystemExit, match=says):
        run_main(train_policy.main, train_policy.Config, [*args, f"--out_dir={tmp_path}"])


def without_time(rows):
    """Metrics rows without their wall time, the one figure a resume may change."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.mark.parametrize("objective, credit", [
    pytest.param("nft", "sparse", marks=TRAINING), pytest.param("awm", "stepwise", marks=TRAINING)])
def test_a_run_counts_every_pass_and_resumes_exactly(objective, credit, tmp_path):
    """The DiT passes are the ODE rollouts' (no guidance: the authors') and three forwards a trained
    (sample, sigma) pair; the DRM's one a sample (sparse) or a pair (stepwise). NFT, whose rollouts
    are its old policy's: stopped after the first update and resumed, the second update's figures
    are the uninterrupted run's (the old policy is saved with the policy)."""
    args = [f"--objective={objective}", f"--credit={credit}", "--trajectories=4", "--per_prompt=2",
            "--steps=3", "--eval_every=1", "--eval_per_prompt=1", "--eval_steps=2"]
    updates = 2 if objective == "nft" else 1
    run_main(train_policy.main, train_policy.Config,
             [*args, f"--updates={updates}", f"--out_dir={tmp_path / 'straight'}"])
    straight = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    # NFT: int(0.99 x 3) = 2 sigmas a sample; AWM: 6 strata of [0, int(0.9 x 3) = 2), some empty
    pairs = 4 * (2 if objective == "nft" else 6)
    assert straight[-1]["nfe"] == updates * (3 * 4 + 3 * pairs)
    assert straight[-1]["backward_passes"] == updates * pairs  # the policy's pass of each pair
    assert straight[-1]["drm_calls"] == updates * (pairs if credit == "stepwise" else 4)
    if objective == "nft":
        for n in (1, 2):
            resume = ["--resume"] if n == 2 else []
            run_main(train_policy.main, train_policy.Config,
                     [*args, f"--updates={n}", f"--out_dir={tmp_path / 'cut'}", *resume])
        cut = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
        assert without_time(straight) == without_time(cut)
