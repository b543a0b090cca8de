"""The benchmarks' analytic FLOP count against PyTorch's own FLOP counter; the memory simulation
against arithmetic; the first-GPU check on the CPU toy."""
import dataclasses
import json
import math
import os

import pytest
import torch
from conftest import max_abs, within
from torch.utils.flop_counter import FlopCounterMode

from bench import search
from bench.dit_speed import forward_flops
from bench.sd3_memory import Config, flops, frozen, peak, policy_model, sd35
from common import run_main
from lora import add_lora
from model import DiTConfig, build_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dual", [(), (0, 1)])
def test_forward_flops_match_pytorchs_counter(dual):
    config = DiTConfig(in_channels=4, out_channels=4, patch_size=2, dim=128, depth=3, heads=2,
                       context_dim=32, pooled_dim=24, pos_embed_max_size=8, qk_norm=True,
                       dual_attention_layers=dual)
    dit, batch, text_tokens = build_dit(config, device="meta"), 3, 5
    x = torch.randn(batch, 4, 16, 16, device="meta")
    with FlopCounterMode(display=False) as counter:
        dit(x, torch.rand(batch, device="meta"), torch.randn(batch, text_tokens, 32, device="meta"),
            torch.randn(batch, 24, device="meta"))
    counted = counter.get_total_flops()
    within(abs(forward_flops(config, batch, 64, text_tokens) - counted) / counted, 1e-6,
           "FLOPs, relative")


def test_simulated_flops_count_the_cpu_attention_kernel():
    """bench/sd3_memory.py counts FLOPs under fake tensors on the CPU device, where bf16 attention
    dispatches to the CPU's flash kernel, which PyTorch's counter does not know: its count must
    still be the analytic one."""
    config = DiTConfig(in_channels=4, out_channels=4, patch_size=2, dim=128, depth=3, heads=2,
                       context_dim=32, pooled_dim=24, pos_embed_max_size=8, qk_norm=True,
                       dual_attention_layers=(0,))
    batch, text_tokens = 3, 5

    def build():
        return (frozen(lambda: build_dit(config)),
                torch.randn(batch, 4, 16, 16, dtype=torch.bfloat16),
                torch.rand(batch), torch.randn(batch, text_tokens, 32, dtype=torch.bfloat16),
                torch.randn(batch, 24, dtype=torch.bfloat16))

    def run(dit, x, t, context, pooled):
        with torch.no_grad():
            dit(x, t, context, pooled)
    analytic = forward_flops(config, batch, 64, text_tokens)
    within(abs(flops(build, run)[0] - analytic) / analytic, 1e-6, "FLOPs, relative")


def test_simulated_parameter_bytes_are_the_parameter_count():
    """bench/sd3_memory.py's fake-tensor tracker against arithmetic: SD3.5-medium's LoRA policy
    holds 2 bytes a frozen bf16 weight and 4 an adapter's float32 one, counted on the meta
    device."""
    shapes = sd35(512, Config())
    meta = build_dit(shapes.dit, device="meta")
    add_lora(meta, rank=16, alpha=16.0)
    adapters = sum(p.numel() for name, p in meta.named_parameters() if ".lora_" in name)
    frozen = sum(p.numel() for p in meta.parameters()) - adapters
    buffers = sum(b.numel() for b in meta.buffers())
    simulated = peak(lambda: (policy_model(shapes, 16, False),), lambda policy: None)
    assert simulated["Parameter"] * 2 ** 30 == 2 * frozen + 4 * adapters
    assert simulated["Buffer"] * 2 ** 30 == 2 * buffers
    assert 2.2e9 < frozen < 2.3e9  # SD3.5-medium's 2.24B parameters


def run_gpu_check(capsys, *flags):
    """bench.gpu_check at its smallest (2 trajectories of 2 steps), in this process -> (exit code,
    what it printed). Both runs below share their shapes, so the second reuses the first's compiled
    graphs."""
    from bench import gpu_check
    code = 0
    try:
        run_main(gpu_check.main, gpu_check.Config, ["--device=cpu", "--trajectories=2",
                                                    "--per_prompt=2", "--steps=2", *flags])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().out


@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_gpu_check_passes_on_the_cpu_toy_and_fails_loudly(capsys, compiled):
    """Every check passes on the toy, the memory simulation within a hair of the real tensors'
    tracker; a limit no run can meet (a clip range of 1e-9: bf16 rounding alone exceeds it) fails
    its line and exits 1."""
    code, out = run_gpu_check(capsys)
    assert code == 0, out[-3000:]
    table = [line for line in out.splitlines() if line.startswith("| ") and line.endswith(" |")]
    checks = {line.split(" | ")[0][2:]: line for line in table
              if line.endswith(("| pass |", "| **FAIL** |"))}
    assert len(checks) == 6 and all(line.endswith("| pass |") for line in checks.values())
    assert checks["ratio, the rollout's own batches: max abs(ratio - 1)"].split(" | ")[1] == "0"
    memory = next(line for name,
                  line in checks.items() if name.startswith("one update step's peak memory"))
    assert float(memory.split(" | ")[1]) < 0.01  # fake tensors allocate what real ones do
    code, out = run_gpu_check(capsys, "--clip_range=1e-9")
    assert code == 1 and "**FAIL**" in out and "check(s) failed" in out
    assert "ratio, the rollout's own batches: max abs(ratio - 1) | 0 | 0 | pass" in out


@pytest.mark.ex3_sde_step
@pytest.mark.ex5_beam_search
def test_the_search_bench_counts_every_method_at_its_budget(tmp_path):
    """bench/search.py end to end at toy size: each method's DiT and DRM passes per image as its
    algorithm implies (4 steps, guidance: 2 DiT passes a step a trajectory), the verdicts and the
    files written."""
    rows = run_main(search.main, search.Config,
                    ["--methods=ode,sde,stepwise,lookahead,smc", "--lmbdas=1,10", "--per_prompt=2",
                     "--steps=4", f"--out={tmp_path / 'search'}", "--device=cpu"])
    by = {r["label"]: (r["dit_passes"], r["drm_passes"]) for r in rows}
    assert by["ODE"] == by["SDE"] == (8, 0)
    # one policy mean a step, k successors scored
    assert by["step-wise k=4"] == (8, 4 * 4)
    # lookahead every 5th step of 4: the last step alone is scored, its successors' completions take
    # no step
    assert by["step-wise k=2, lookahead every 5th step"] == (8, 2)
    # FK's schedule on 4 steps: steps 1, 2 and the last, N particles scored there, then the
    # favourite at sigma 0
    saved = json.loads((tmp_path / "search.json").read_text())
    # SMC's lambda tuned first on the training prompts, the better of the two
    tuning = saved["smc_tuning"]
    assert set(tuning["gold_on_train"]) == {"1", "10"}
    assert tuning["gold_on_train"][f"{tuning['lmbda']:g}"] == max(tuning["gold_on_train"].values())
    assert by[f"SMC N=4, lambda {tuning['lmbda']:g}"] == (4 * 8, 4 * 3 + 4)
    assert all(r["ms"] > 0 and r["gold_se"] > 0 for r in rows)
    assert list(dict.fromkeys(r["curve"] for r in rows)) == ["ode", "sde", "stepwise", "lookahead",
                                                             f"smc, lambda {tuning['lmbda']:g}"]
    report = (tmp_path / "search.md").read_text()
    # 2 DRM costs
    assert report.count("| method | DiT-pass equivalents / image | gold | best-of-N there (N) "
                        "|") == 2
    assert "| best-of-16 |" in report and "| step-wise k=8 |" in report
    assert saved["rows"][0]["label"] == "ODE" and len(saved["best_of"]["16"]) == 20
    assert f"SMC's lambda: {tuning['lmbda']:g}, the best on the training prompts" in report


def test_the_best_of_n_curve_is_the_mean_over_every_subset():
    """search.best_of_n_curve against brute force: for each N, every N-subset of an image's M
    samples, the gold of the DRM's favourite among them, averaged."""
    import itertools
    g = torch.Generator().manual_seed(0)
    scores, gold = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    for n in range(1, 8):
        brute = torch.tensor([[sum(gold[i, list(s)][scores[i, list(s)].argmax()].item()
                                   for s in itertools.combinations(range(7), n)) / math.comb(7, n)]
                              for i in range(3)]).flatten()
        within(max_abs(search.best_of_n_curve(scores, gold, n), brute), 1e-6, f"best-of-{n}")
    within(max_abs(search.best_of_n_curve(scores, gold, 1), gold.mean(1)), 1e-6, "best-of-1")
    assert torch.equal(search.best_of_n_curve(scores, gold, 7).float(),
                       gold.gather(1, scores.argmax(1, True)).flatten())


def test_clustered_standard_errors_by_hand():
    """bench.stats.clustered: CR1 written out for 3 clusters; with one image a cluster it is the
    paired s.e. times sqrt(G / (G - 1)) x sqrt((G - 1) / G) = the usual s.e. (sample std over
    sqrt(n))."""
    from bench.stats import clustered, verdict
    d = torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 2.0], dtype=torch.float64)
    clusters = torch.tensor([0, 0, 1, 1, 2, 2])
    mean = d.mean().item()
    sums = [(d[0] + d[1] - 2 * mean), (d[2] + d[3] - 2 * mean), (d[4] + d[5] - 2 * mean)]
    expected = math.sqrt(3 / 2 * sum(s.item() ** 2 for s in sums)) / 6
    found_mean, found_se = clustered(d, clusters)
    within(abs(found_mean - mean) / mean, 1e-12, "mean, relative")
    within(abs(found_se - expected) / expected, 1e-12, "clustered s.e., relative")
    paired = d.std().item() / math.sqrt(6)
    within(abs(clustered(d, torch.arange(6))[1] - paired) / paired, 1e-12, "paired s.e., relative")
    # 9 df (10 prompts): t = 2.262
    assert [verdict(0.3, 0.1, 9), verdict(0.2, 0.1, 9), verdict(-0.3, 0.1, 9)] == ["beats", "tie",
                                                                                   "loses"]


def test_a_verdict_needs_its_interval_at_its_degrees_of_freedom():
    """Student's t against closed forms (1 df: tan(pi (p - 1/2)); 2 df: (2p - 1) sqrt(2 / (4 p
    (1 - p)))) and scipy; a difference beats only when mean - t s.e. > 0. The cases the 2-s.e. rule
    got wrong: 3 s.e. with 1 df (2 seeds: p = 0.20) and 2.09 s.e. with 9 df (p = 0.066) are ties;
    29.5 s.e. with 1 df is a win. Bisection's error: 1e-12 of t; a wrong tail (one-sided 95%):
    6.314 at 1 df, 50% off."""
    from bench.stats import interval, t_critical, verdict
    p = 0.975
    within(abs(t_critical(1) - math.tan(math.pi * (p - 0.5))) / 12.706, 1e-10, "t, 1 df")
    within(abs(t_critical(2) - (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))) / 4.303, 1e-10,
           "t, 2 df")
    scipy = pytest.importorskip("scipy.stats")
    within(max(abs(t_critical(df) - scipy.t.ppf(p, df)) / scipy.t.ppf(p, df)
               for df in (*range(1, 61), 100, 1000)), 1e-10, "t against scipy")
    within(abs(t_critical(4, 0.9) - scipy.t.ppf(0.95, 4)) / 2.132, 1e-10, "t at 90%")
    assert [verdict(0.3, 0.1, 1), verdict(2.09, 1.0, 9), verdict(29.5, 1.0, 1)] == ["tie", "tie",
                                                                                    "beats"]
    assert verdict(1.0, 0.1, 0) == "tie" and verdict(1.0, 0.0, 5) == "tie"
    # the interval at 2 df: diff -+ t s.e., t in the closed form above (4.3027); float64 rounding
    # ~1e-15, the normal's 1.96 in place of t moves it by 2.3
    low, high = interval(1.0, 0.5, 2)
    t2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    within(abs(low - (1.0 - t2 * 0.5)) + abs(high - (1.0 + t2 * 0.5)), 1e-10, "interval")


def test_gold_at_the_budget_and_the_first_evaluation_at_the_target():
    """grpo_credit.gold_at: linear between the evaluations on either side, None outside; reaching:
    the first evaluation whose mean gold over the seeds reaches the target, and the one before."""
    from bench.grpo_credit import gold_at, reaching
    run = [{"dit_equivalents": x, "gold": g} for x, g in ((0, -1.0), (100, -0.5), (200, -0.3))]
    assert gold_at(run, 100) == -0.5 and gold_at(run, 0) == -1.0 and gold_at(run, 250) is None
    within(abs(gold_at(run, 150) - -0.4), 1e-12, "halfway")
    within(abs(gold_at(run, 25) - -0.875), 1e-12, "a quarter")
    runs = {("a", 0): run, ("a", 1): [{"dit_equivalents": x, "gold": g}
                                      for x, g in ((0, -1.0), (100, -0.9), (200, -0.5))]}
    # means -1, -0.7, -0.4
    assert reaching(runs, "a", [0, 1], -0.5) == (200, 100)
    assert reaching(runs, "a", [0, 1], -1.0) == (0, 0.0)
    assert reaching(runs, "a", [0, 1], 0.0) is None


def test_the_credit_table_by_hand():
    """grpo_credit.summarise on made-up runs of 3 seeds: gold at the budget interpolated, the paired
    difference, its interval at 2 df (t = 4.3027), the verdict, the counts."""
    from bench.grpo_credit import Config, summarise

    def run(golds, calls=10):
        return [{"step": 5 * i, "dit_equivalents": 50.0 * i, "gold": g, "drm": 0.1 * i,
                 "nfe": 40 * i, "backward_passes": 4 * i, "backward_cost": 2.0,
                 "drm_calls": calls * i} for i, g in enumerate(golds)]
    # at the budget 75: halfway between the evaluations at 50 and 100
    runs = {("ref", 0): run([-1.0, -0.8, -0.6]), ("ref", 1): run([-1.0, -0.9, -0.7]),
            ("ref", 2): run([-1.0, -0.7, -0.5]),
            ("new", 0): run([-1.0, -0.5, -0.3]), ("new", 1): run([-1.0, -0.6, -0.4]),
            ("new", 2): run([-1.0, -0.6, -0.2])}
    table = summarise(Config(max_nfe=75), runs, ["ref", "new"], "ref", [0, 1, 2])
    # ref at 75: -0.7, -0.8, -0.6 (mean -0.7); new: -0.4, -0.5, -0.4; differences 0.3, 0.3, 0.2:
    # mean 0.2667, s.e. sqrt(((1/30)^2 * 2 + (2/30)^2) / 2 / 3) = 0.03333; half-width 4.3027 x
    # 0.03333 = 0.1434
    new = next(line for line in table.splitlines() if line.startswith("| new |"))
    assert ("| new | 3 | -1.0000 | -0.4333 ± 0.0333 | +0.2667 ± 0.0333 | [+0.1232, +0.4101] | 2 | "
            "beats |") in new, new
    # target -0.7: new's mean gold reaches it at the evaluation at 50 (-0.5667), the one before 0
    assert "| 50 (0) |" in new and "| 0.000 -> 0.200 | 10 | 80 (8) | 20 |" in new, new
    # equivalents at SD3.5-medium's DRM cost: 80 + 2 x 8 + 0.8975 x 20
    assert f"({80 + 16 + 20 * 2.19 / 2.44:,.0f})" in new


def test_a_long_runs_curves_by_hand():
    """With a budget of updates (the collapse), summarise adds the curves: at every
    --curve_every-th update, gold's mean ± s.e. over seeds / the DRM's mean score of the
    evaluation's samples / of the rollouts' credited states."""
    from bench.grpo_credit import Config, summarise
    from common import UserError, check_flags

    def run(golds, drms, rewards):
        rows = [{"step": 10 * i, "dit_equivalents": 50.0 * i, "gold": g, "drm": d,
                 "train_reward": r} for i, (g, d, r) in enumerate(zip(golds, drms, rewards))]
        del rows[0]["train_reward"]  # update 0: no rollout yet
        return rows
    runs = {("a", 0): run([-1.0, -0.5, -2.0], [0.2, 1.0, 0.4], [0, 1.5, 2.5]),
            ("a", 1): run([-1.0, -0.7, -3.0], [0.2, 0.8, 0.2], [0, 1.7, 2.7]),
            ("b", 0): run([-1.0, -0.9, -1.2], [0.2, 0.5, 0.6], [0, 1.0, 2.0]),
            ("b", 1): run([-1.0, -0.9, -1.0], [0.2, 0.7, 0.8], [0, 1.2, 2.2])}
    table = summarise(Config(updates=20, curve_every=10), runs, ["a", "b"], "a", [0, 1])
    # a at 20: gold -2.0, -3.0: mean -2.5, s.e. 0.5; DRM 0.4, 0.2: 0.3; credited 2.5, 2.7: 2.6
    assert "| a | -1.00 ± 0.00 / 0.20 | -0.60 ± 0.10 / 0.90 / 1.60 | -2.50 ± 0.50 / 0.30 / 2.60 |" \
        in table, table
    assert "| b | -1.00 ± 0.00 / 0.20 | -0.90 ± 0.00 / 0.60 / 1.10 | -1.10 ± 0.10 / 0.70 / 2.10 |" \
        in table, table
    # every other update: the columns 0 and 20 alone
    table = summarise(Config(updates=20, curve_every=20), runs, ["a"], "a", [0, 1])
    assert "| a | -1.00 ± 0.00 / 0.20 | -2.50 ± 0.50 / 0.30 / 2.60 |" in table, table
    # a budget of DiT-pass equivalents has no curves: --curve_every alone is refused
    with pytest.raises(UserError, match="--curve_every is a flag of --updates"):
        check_flags(Config(curve_every=10))


def test_the_headline_tables_at_sd35s_drm_cost_and_re_scored_by_hand():
    """grpo_credit: gold at the budget on the axis that counts a DRM pass at SD3.5-medium's cost
    (summarise's sd35_equivalents), and the re-scored final checkpoints, each paired by seed with
    its interval at 2 df and verdict."""
    from bench.grpo_credit import Config, summarise

    def run(golds):
        return [{"step": 5 * i, "dit_equivalents": 50.0 * i, "gold": g, "drm": 0.1 * i,
                 "nfe": 40 * i, "backward_passes": 4 * i, "backward_cost": 2.0,
                 "drm_calls": 10 * i} for i, g in enumerate(golds)]
    runs = {("ref", 0): run([-1.0, -0.8, -0.6]), ("ref", 1): run([-1.0, -0.9, -0.7]),
            ("ref", 2): run([-1.0, -0.7, -0.5]),
            ("new", 0): run([-1.0, -0.5, -0.3]), ("new", 1): run([-1.0, -0.6, -0.4]),
            ("new", 2): run([-1.0, -0.6, -0.2])}
    # an evaluation i sits at 40 i + 2 x 4 i + 10 i x 2.19 / 2.44 = 56.975 i on that axis: the
    # budget 75 is 0.31637 of the way from evaluation 1 to evaluation 2
    f = (75 - 56.975) / 56.975
    ref = [-0.8 + 0.2 * f, -0.9 + 0.2 * f, -0.7 + 0.2 * f]
    new = [-0.5 + 0.2 * f, -0.6 + 0.2 * f, -0.6 + 0.4 * f]
    diffs = [a - b for a, b in zip(new, ref)]
    mean = sum(diffs) / 3
    se = (sum((d - mean) ** 2 for d in diffs) / 2 / 3) ** 0.5
    rescored = {"gold": {("ref", 0): -0.5, ("ref", 1): -0.6, ("ref", 2): -0.4, ("new", 0): -0.4,
                         ("new", 1): -0.6, ("new", 2): -0.2}}
    table = summarise(Config(max_nfe=75, rescore=32), runs, ["ref", "new"], "ref", [0, 1, 2],
                      rescored).split("SD3.5-medium's DRM cost (")[1]
    at_sd35, again = table.split("re-scored")
    row = next(line for line in at_sd35.splitlines() if line.startswith("| new |"))
    spread = (sum((g - sum(new) / 3) ** 2 for g in new) / 6) ** 0.5
    assert (f"| new | 3 | {sum(new) / 3:.4f} ± {spread:.4f} | {mean:+.4f} ± {se:.4f} | "
            f"[{mean - 4.302653 * se:+.4f}, {mean + 4.302653 * se:+.4f}] | 2 | beats |") == row, row
    # re-scored: differences 0.1, 0, 0.2: mean 0.1, s.e. 0.1 / sqrt(3) = 0.0577, half-width 0.2484
    row = next(line for line in again.splitlines() if line.startswith("| new |"))
    assert row == "| new | 3 | -0.4000 ± 0.1155 | +0.1000 ± 0.0577 | [-0.1484, +0.3484] | 2 | tie |"


def test_the_table_at_the_authors_guidance_pairs_with_the_reference_where_it_was_evaluated():
    """grpo_credit.summarise: a mode evaluated at a second guidance (NFT and AWM at 1: their
    authors') gets that guidance's gold at the budget, paired by seed with the reference's where
    the reference was evaluated there too (--reference=NFT_sparse), else the figure alone."""
    from bench.grpo_credit import Config, summarise

    def run(golds, at_1):
        return [{"step": 5 * i, "dit_equivalents": 50.0 * i, "gold": g, "drm": 0.1 * i,
                 "nfe": 40 * i, "backward_passes": 4 * i, "backward_cost": 2.0,
                 "drm_calls": 10 * i, **({"gold_cfg1": at_1[i]} if at_1 else {})}
                for i, g in enumerate(golds)]
    # at the budget 75 (halfway between the evaluations at 50 and 100), guidance 1: ref -0.7,
    # -0.8, -0.6; new -0.4, -0.5, -0.4 (the credit table's, at guidance 4 there)
    ref_at_1 = [[-1.0, -0.8, -0.6], [-1.0, -0.9, -0.7], [-1.0, -0.7, -0.5]]
    new_at_1 = [[-1.0, -0.5, -0.3], [-1.0, -0.6, -0.4], [-1.0, -0.6, -0.2]]
    for ref_evaluated in (True, False):
        runs = {**{("ref", s): run([-1.0, -1.0, -1.0], ref_at_1[s] if ref_evaluated else None)
                   for s in range(3)},
                **{("new", s): run([-1.0, -1.0, -1.0], new_at_1[s]) for s in range(3)}}
        # re-scored, every mode at guidance 1: differences 0.1, 0, 0.2 (the headline test's)
        rescored = {"gold": {(m, s): -1.0 for m in ("ref", "new") for s in range(3)},
                    "gold_cfg1": {("ref", 0): -0.5, ("ref", 1): -0.6, ("ref", 2): -0.4,
                                  ("new", 0): -0.4, ("new", 1): -0.6, ("new", 2): -0.2}}
        table = summarise(Config(max_nfe=75, rescore=32), runs, ["ref", "new"], "ref", [0, 1, 2],
                          rescored)
        at_1, again = table.split("At guidance 1, where their authors evaluate (gold start: "
                                  "-1.0000")[1].split("re-scored as above, at guidance 1")
        row = next(line for line in again.splitlines() if line.startswith("| new |"))
        assert row == ("| new | 3 | -0.4000 ± 0.1155 | +0.1000 ± 0.0577 | [-0.1484, +0.3484] | 2 "
                       "| tie |"), row
        row = next(line for line in at_1.splitlines() if line.startswith("| new |"))
        if ref_evaluated:  # differences 0.3, 0.3, 0.2 (the credit table's, by hand there)
            assert row == ("| new | 3 | -0.4333 ± 0.0333 | +0.2667 ± 0.0333 | [+0.1232, +0.4101] "
                           "| 2 | beats |"), row
            assert "| ref | 3 | -0.7000 ± 0.0577 |" in at_1
        else:  # the reference has no gold at guidance 1: nothing to pair with
            assert row == "| new | 3 | -0.4333 ± 0.0333 |  |  |  |  |", row
            assert "| ref |" not in at_1


def test_the_search_table_by_hand():
    """search.best_of_at interpolates best-of-N's per-image gold in N at a budget; compare's line:
    the per-image difference, its clustered s.e., the interval at prompts - 1 df, the verdict."""
    g = torch.Generator().manual_seed(0)
    curves = {n: torch.randn(6, generator=g, dtype=torch.float64)
              for n in range(1, search.POOL + 1)}
    # best-of-2 costs 2 x 10 + 2 x 0.5 = 21, best-of-3 31.5: 26.25 is halfway
    at = search.best_of_at(curves, 26.25, 10, 0.5)
    within(max_abs(at, (curves[2] + curves[3]) / 2), 1e-12, "best-of-N halfway")
    assert search.best_of_at(curves, 5, 10, 0.5) is None
    clusters = torch.tensor([0, 0, 1, 1, 2, 2])
    gold = (at + torch.tensor([0.5, 0.3, 0.4, 0.6, 0.2, 0.4], dtype=torch.float64)).tolist()
    line = search.compare([{"label": "m", "dit_passes": 26.0, "drm_passes": 0.5, "gold": 0.0,
                            "gold_per_image": gold}], curves, clusters, 10, 0.5).splitlines()[-1]
    # differences' mean 0.4; clusters' sums of deviations 0, 0.2, -0.2: s.e. sqrt(3 / 2 x 0.08) / 6
    # = 0.05774; t at 2 df 4.3027: half-width 0.2484
    assert "| 6 (3) | +0.4000 ± 0.0577 | [+0.1516, +0.6484] | 2 |" in line, line
    assert line.endswith("| beats |")


def test_the_credit_bench_tells_a_finished_run_from_a_cut_one(tmp_path):
    """A run is finished when its last metrics row is at the budget (rows are JSON lines with
    spaces inside: read line by line, a resumed experiment skips it)."""
    from bench.grpo_credit import Config, finished
    cfg = Config(max_nfe=100)
    rows = [{"step": 0, "dit_equivalents": 0.0}, {"step": 5, "dit_equivalents": 60.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not finished(cfg, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "dit_equivalents": 101.5}) + "\n\n")
    assert finished(cfg, tmp_path) and not finished(cfg, tmp_path / "nowhere")


def test_a_budget_of_updates_runs_and_reads_each_run_to_that_update(tmp_path, monkeypatch):
    """--updates=N (the collapse): a run is finished at update N whatever its equivalents, its
    command asks for N updates and no equivalents' budget, and the table reads gold at update N
    (not at --max_nfe) without the SD3.5 section, which is about a budget of equivalents."""
    import subprocess

    from bench.grpo_credit import Config, finished, run_all, summarise
    cfg = Config(updates=120, max_nfe=100, out_dir=str(tmp_path))
    rows = [{"step": 0, "dit_equivalents": 0.0}, {"step": 100, "dit_equivalents": 1e6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not finished(cfg, tmp_path)  # far past --max_nfe, short of 120 updates
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 120, "dit_equivalents": 2e6}) + "\n")
    assert finished(cfg, tmp_path)
    commands = []

    class Finished:  # a child that "ran": records its command, leaves a finished metrics file
        def __init__(self, command, **kwargs):
            commands.append(command)
            self.args, self.returncode = command, 0
            out = next(a for a in command if a.startswith("--out_dir="))[len("--out_dir="):]
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"step": 120, "dit_equivalents": 5.0}) + "\n")

        def wait(self):
            return 0
    monkeypatch.setattr(subprocess, "Popen", Finished)
    run_all(cfg, [("stepwise", 0, 3e-5)])
    assert "--max_nfe=0" in commands[0] and "--updates=120" in commands[0]
    # its own folder: never the one a run to the budget of equivalents stopped in
    assert f"--out_dir={tmp_path}/stepwise_lr3e-05_seed0_updates120" in commands[0]

    def run(golds):
        return [{"step": 60 * i, "dit_equivalents": 1000.0 * i, "gold": g, "drm": 0.1 * i}
                for i, g in enumerate(golds)]
    runs = {("ref", 0): run([-1.0, -0.8, -0.6]), ("ref", 1): run([-1.0, -0.9, -0.7]),
            ("new", 0): run([-1.0, -0.5, -0.4]), ("new", 1): run([-1.0, -0.6, -0.3])}
    table = summarise(cfg, runs, ["ref", "new"], "ref", [0, 1])
    # at update 120: ref -0.6, -0.7 (mean -0.65); new -0.4, -0.3: differences 0.2, 0.4
    row = next(line for line in table.splitlines() if line.startswith("| new |"))
    assert "| new | 2 | -1.0000 | -0.3500 ± 0.0500 | +0.3000 ± 0.1000 |" in row, row
    assert "120 updates a run, gold read at the last" in table and "counted at SD3.5" not in table


def test_each_arm_takes_the_lr_best_on_the_tuning_seeds(tmp_path):
    """grpo_credit.choose_lr: the best mean gold at the budget over the tuning seeds; the sparse
    variants take sparse's; a verdict's seeds are never the tuning seeds; a second call with every
    run done runs nothing."""
    from bench.grpo_credit import Config, choose_lr, chosen, report, run_all, tuned_as
    from common import UserError, parse_flags

    def run(gold):
        return [{"dit_equivalents": 0.0, "gold": -1.0}, {"dit_equivalents": 100.0, "gold": gold}]
    # at the budget 50: halfway from -1 -> lr 1e-5: (-0.8 - 0.7) / 2 = -0.75; 3e-5: -0.7; 1e-4: -0.9
    runs = {(1e-5, 100): run(-0.6), (1e-5, 101): run(-0.4), (3e-5, 100): run(-0.4),
            (3e-5, 101): run(-0.4), (1e-4, 100): run(-0.9), (1e-4, 101): run(-0.7)}
    lr, means = choose_lr(runs, (1e-5, 3e-5, 1e-4), (100, 101), 50)
    assert lr == 3e-5 and [round(means[x], 6) for x in (1e-5, 3e-5, 1e-4)] == [-0.75, -0.7, -0.9]
    runs[1e-5, 101] = run(-0.2)  # now 1e-5 ties 3e-5 at -0.7: the smaller lr
    assert choose_lr(runs, (1e-5, 3e-5, 1e-4), (100, 101), 50)[0] == 1e-5
    assert tuned_as("sparse, random window (Flow-GRPO-Fast)") == "sparse" == tuned_as("sparse")
    assert tuned_as("stepwise, window 0:5") == "stepwise, window 0:5" and tuned_as("tree") == "tree"
    with pytest.raises(UserError, match="must not be those its learning rates were chosen on"):
        chosen(parse_flags(Config(), ["--seeds=0,100"]))
    # another reference: compared with it, its table apart from the experiment's
    cfg = parse_flags(Config(), ["--modes=stepwise,stepwise_x0_score", "--reference=stepwise"])
    assert chosen(cfg)[1] == "stepwise" and chosen(Config())[1] == "sparse"
    assert report(cfg).endswith("credit_vs_stepwise") and report(Config()).endswith("credit")
    with pytest.raises(UserError, match="--reference=tree: not among the modes compared"):
        chosen(parse_flags(Config(), ["--modes=stepwise,sparse", "--reference=tree"]))
    # every run done (an experiment run again to remake its table): nothing runs, no IndexError
    cfg = Config(max_nfe=100, out_dir=str(tmp_path))
    done = tmp_path / "sparse_lr3e-05_seed0"
    done.mkdir()
    (done / "metrics.jsonl").write_text(json.dumps({"dit_equivalents": 100.0}) + "\n")
    run_all(cfg, [("sparse", 0, 3e-5)])


@pytest.mark.ex1_flow_matching  # it samples by the ODE
def test_the_best_of_n_pool_holds_the_ode_rows_samples():
    """Best-of-N is over ODE samples: the pool's first sample of each image is the ODE row's image
    (the same noise, the same Euler steps), so best-of-1 and the ODE row are one distribution. (It
    once drew SDE samples, noise level 0.7, and every method "beat" best-of-N by the SDE's loss.)"""
    from data.toy import ToyBase
    from sde import initial_noise
    cfg = search.Config(steps=4, per_prompt=2)
    base = ToyBase.load(cfg.base, "cpu")
    drm, drm_text, _ = base.load_drm(cfg.drm, "cpu")
    prompts = base.heldout_prompts("", [])[:2]
    pool = initial_noise(base.dit, 2 * search.POOL, torch.Generator().manual_seed(0))
    pool = pool.view(2, search.POOL, *pool.shape[1:])
    _, gold, passes = search.pool_of_samples(cfg, base, drm, drm_text, pool, prompts)
    ode = search.measure(cfg, ("ode", "ODE", {"search": "ode"}), base, drm, drm_text, pool,
                         prompts)
    assert passes == 8
    # the same computation in a batch of 32 and one of 2: float32 rounding of the gold alone
    expected = torch.tensor(ode["gold_per_image"], dtype=torch.float64)
    within(max_abs(gold[:, 0], expected), 1e-4, "gold")


def test_the_drm_table_by_hand(tmp_path):
    """bench/drm_table.py on two evaluations written by hand: the accuracy rows as saved; the
    difference pair by pair over the pairs gold orders, its s.e. clustered by prompt and its 95%
    interval at prompts - 1 df, against the same worked out here cluster by cluster (CR1: G / (G -
    1) x the sum of squared cluster sums of deviations, over n^2) with scipy's t quantile."""
    from bench import drm_table
    from common import UserError
    t = pytest.importorskip("scipy.stats").t
    prompts = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    outcomes = {"a": {"0": "1-0101" + "1" * 6, "0.5": "0" * 12},
                "b": {"0": "1-" + "1" * 10, "0.5": "1" * 11 + "0"}}
    folders = []
    for name, by_sigma in outcomes.items():
        ordered = {label: [int(c) for c in text if c != "-"] for label, text in by_sigma.items()}
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({
            "accuracy": {label: {"gold_accuracy": sum(v) / len(v),
                                 "gold_accuracy_close_pairs": 0.5}
                         for label, v in ordered.items()},
            "per_pair": {"prompt": prompts, "gold": by_sigma,
                         "measured": {"pairs": "abc", "noise_draws": 2}}}))
        folders.append(str(tmp_path / name))
    text = drm_table.main(drm_table.Config(evals=tuple(folders)))
    assert "| a | 81.8% | 0.0% | 50.0% |" in text and "| b | 100.0% | 91.7% | 50.0% |" in text
    for label, verdict in (("0", "tie"), ("0.5", "beats")):
        pairs = [(p, int(y) - int(x)) for p, x, y in zip(prompts, outcomes["a"][label],
                                                        outcomes["b"][label]) if x != "-"]
        n, mean = len(pairs), sum(d for _, d in pairs) / len(pairs)
        sums = {}
        for p, d in pairs:
            sums[p] = sums.get(p, 0.0) + d - mean
        G = len(sums)
        se = math.sqrt(G / (G - 1) * sum(v * v for v in sums.values())) / n
        half = t.ppf(0.975, G - 1) * se
        assert (f"| b | {label} | {mean:+.2%} ± {se:.2%} | [{mean - half:+.2%}, "
                f"{mean + half:+.2%}] | {G - 1} | {verdict} |") in text
    def refused(name, evaluation, says):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(evaluation))
        with pytest.raises(UserError, match=says):
            drm_table.main(drm_table.Config(evals=(folders[0], str(tmp_path / name))))
    refused("old", {"accuracy": {}}, "keeps no pair-by-pair outcomes")
    other = json.loads((tmp_path / "b" / "eval.json").read_text())
    other["per_pair"]["measured"]["noise_draws"] = 4
    refused("other_noise", other, "other_noise was evaluated on other pairs or with other noise")
    one = json.loads((tmp_path / "b" / "eval.json").read_text())
    one["per_pair"]["prompt"] = [0] * 12
    (tmp_path / "a_one").mkdir()
    (tmp_path / "a_one" / "eval.json").write_text(json.dumps({**json.loads(
        (tmp_path / "a" / "eval.json").read_text()), "per_pair": {**one["per_pair"],
                                                                "gold": outcomes["a"]}}))
    (tmp_path / "b_one").mkdir()
    (tmp_path / "b_one" / "eval.json").write_text(json.dumps(one))
    with pytest.raises(UserError, match="fewer than 2 prompts"):
        drm_table.main(drm_table.Config(evals=(str(tmp_path / "a_one"), str(tmp_path / "b_one"))))


@pytest.mark.ex5_beam_search
def test_a_stopped_search_sweep_measures_only_what_is_left(tmp_path, monkeypatch):
    """bench/search.py stopped at its third point (a kill's torn line left behind), run again and
    stopped again, then run to its end: the points kept are not measured again, nor is best-of-N's
    pool, every line kept reads back, and every row equals a sweep run in one go (each point draws
    from its own seeded generator)."""
    cfg = search.Config(methods=("ode", "stepwise"), per_prompt=2, steps=2, device="cpu",
                        out=str(tmp_path / "whole"))
    whole = search.main(cfg)
    real_measure, real_pool, calls = search.measure, search.pool_of_samples, []
    stops = {"step-wise k=2", "step-wise k=4"}  # each stops one run

    def measure(*args):
        calls.append(args[1][1])
        if args[1][1] in stops:
            stops.remove(args[1][1])
            raise KeyboardInterrupt
        return real_measure(*args)
    monkeypatch.setattr(search, "measure", measure)
    monkeypatch.setattr(search, "pool_of_samples",
                        lambda *args: (calls.append("pool"), real_pool(*args))[1])
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    kept = tmp_path / "cut.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        search.main(cut)
    assert calls == ["ODE", "pool", "ODE", "step-wise k=2"]  # the warm-up first
    with open(kept, "a") as f:
        f.write('{"key": "step-wise k=2", "val')  # a write cut short
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        search.main(cut)
    assert calls == ["ODE", "step-wise k=2", "step-wise k=4"]
    assert [json.loads(line) for line in kept.read_text().splitlines()]  # the torn line gone
    calls.clear()
    resumed = search.main(cut)
    assert calls == ["ODE", "step-wise k=4", "step-wise k=8"]
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "ms"} for r in rows]  # noqa: E731
    assert timeless(resumed) == timeless(whole)
    assert not kept.exists()
    assert "| step-wise k=8 |" in (tmp_path / "cut.md").read_text()


@pytest.mark.ex1_flow_matching  # it samples by the ODE
def test_a_run_is_re_scored_once_a_checkpoint_and_again_when_trained_on(tmp_path):
    """grpo_credit.rescore: the run's final policy (here the shipped base, as a run folder holds
    it) on the held-out prompts x N noises of seed 5678, sampled as the run's evaluations sample
    (its saved steps, guidance, shift) -> evaluation.evaluate's gold for that model; cached for the
    checkpoint's step, scored afresh when the folder holds a later one."""
    import shutil

    from bench.grpo_credit import RESCORE_SEED, Config, rescore, run_dir
    from data.toy import ToyBase
    from evaluation import evaluate
    cfg = Config(out_dir=str(tmp_path), rescore=1)
    path = run_dir(cfg, "stepwise", 0, 1e-4)
    os.makedirs(path)
    shutil.copy("data/base.safetensors", os.path.join(path, "model.safetensors"))
    saved = {"eval_prompts": "", "eval_steps": 3, "eval_cfg_scale": 2.0, "shift": 1.0}
    torch.save({"step": 7, "config": saved}, os.path.join(path, "train_state.pt"))
    base = ToyBase.load("data/base.safetensors", "cpu")
    expected = evaluate(base.dit, base, base.heldout_prompts("", []), 1, seed=RESCORE_SEED,
                        steps=3, cfg_scale=2.0, shift=1.0)[0]["gold"]
    # the same model, prompts, noise and steps: equal but for the batch's float32 rounding
    # (measured 0; a wrong seed or step count moves it by ~0.1)
    within(abs(rescore(cfg, "stepwise", 0, 1e-4) - expected), 1e-5, "re-scored gold")
    cache = os.path.join(path, "rescore_1.json")
    json.dump({"step": 7, "gold": 123.0}, open(cache, "w"))  # a cached score is read back
    assert rescore(cfg, "stepwise", 0, 1e-4) == 123.0
    torch.save({"step": 9, "config": saved}, os.path.join(path, "train_state.pt"))
    within(abs(rescore(cfg, "stepwise", 0, 1e-4) - expected), 1e-5, "a later checkpoint's gold")
    assert json.load(open(cache))["step"] == 9
    # at a rival's second guidance: sampled at that guidance (guidance 1 against the saved 2 moves
    # gold by 0.23 here), cached apart
    at_1 = evaluate(base.dit, base, base.heldout_prompts("", []), 1, seed=RESCORE_SEED, steps=3,
                    cfg_scale=1.0, shift=1.0)[0]["gold"]
    within(abs(rescore(cfg, "stepwise", 0, 1e-4, cfg_scale=1.0) - at_1), 1e-5, "gold at 1")
    assert json.load(open(os.path.join(path, "rescore_1_cfg1.json")))["gold"] == pytest.approx(at_1)
    assert json.load(open(cache))["step"] == 9 and rescore(cfg, "stepwise", 0, 1e-4) != at_1


@pytest.mark.ex1_flow_matching  # it samples by the ODE,
@pytest.mark.ex2_drm  # scores with the DRM
@pytest.mark.ex3_sde_step  # and samples by the SDE
def test_the_collapse_cause_samples_as_the_evaluation_and_the_rollouts_do(tmp_path):
    """bench.collapse on two run folders. Seed 0's final policy is the shipped base, perturbed: its
    "ODE, 20 steps" is evaluation.evaluate's sampler on that file (the same gold for the same
    noises), its rollout (no window) is sample.py's SDE (stepwise_sample, k = 1, the same
    generator), the last state's DRM score is the unclamped sample's and the finished sample's the
    clamped one's. Seed 1's policy is its base and its rollout has a window from step 2: its first
    step is the Euler step of "ODE, 10 steps", every rise is exactly 0, and its credited steps are
    the window's less the last. The result is cached for the checkpoint's step."""
    import shutil

    from bench.collapse import NOISE_SEED, SAMPLED_WITH, SDE_SEED, Config, score_run, table
    from bench.grpo_credit import run_dir
    from data.toy import ToyBase
    from evaluation import evaluate
    from sample import stepwise_sample
    from sde import Sampler, drm_on, initial_noise, sigma_schedule
    cfg = Config(out_dir=str(tmp_path), per_prompt=2, seeds=(0, 1), modes=("stepwise",),
                 updates=3)
    saved = {"base": "data/base.safetensors", "drm": "data/drm.safetensors", "eval_prompts": "",
             "eval_steps": 4, "eval_cfg_scale": 2.0, "steps": 3, "cfg_scale": 4.0, "shift": 1.0,
             "noise_level": 0.7, "sde_window": "", "train_last_step": False}
    base = ToyBase.load("data/base.safetensors", "cpu")
    perturbed = ToyBase.load("data/base.safetensors", "cpu")
    with torch.no_grad():
        for p in perturbed.dit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    for seed, window in ((0, ""), (1, "1:3")):
        path = run_dir(cfg, "stepwise", seed, cfg.lr)
        os.makedirs(path)
        if seed == 0:
            perturbed.save_policy(path, perturbed.dit.state_dict(), perturbed.dit.config, 0, 3)
        else:
            shutil.copy("data/base.safetensors", os.path.join(path, "model.safetensors"))
        torch.save({"step": 3, "config": {**saved, "sde_window": window}},
                   os.path.join(path, "train_state.pt"))
        with open(os.path.join(path, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 3}) + "\n")
    bases = {}  # the base's scores by its sampling settings, shared across runs
    scores = score_run(cfg, run_dir(cfg, "stepwise", 0, cfg.lr), bases)

    heldout = base.heldout_prompts("", [])
    prompts = [p for p in heldout for _ in range(2)]
    for who, model in (("base", base), ("policy", perturbed)):
        expected = evaluate(model.dit, model, heldout, 2, seed=NOISE_SEED, steps=4, cfg_scale=2.0,
                            shift=1.0)[0]["gold"]
        ode = scores[who]["ODE, 20 steps"]["gold"]
        # the same model, noises and Euler steps: measured equal; another seed, grid or model
        # moves it by ~0.1 or more
        within(abs(sum(ode) / len(ode) - expected), 1e-5, f"the evaluation's gold ({who})")
    noise = initial_noise(perturbed.dit, len(prompts), torch.Generator().manual_seed(NOISE_SEED),
                          32)
    cond, uncond = perturbed.encode(prompts)
    with torch.no_grad():
        x, _ = stepwise_sample(Sampler(perturbed.dit, sigma_schedule(3), cond, uncond, 4.0), noise,
                               noise_level=0.7, generator=torch.Generator().manual_seed(SDE_SEED))
        drm, drm_text, _ = base.load_drm("data/drm.safetensors", "cpu")
        reward = drm_on(drm.eval(), drm_text.encode(prompts))
        rows, zeros = torch.arange(len(x)), torch.zeros(len(x))
        raw, clamped = reward(x, zeros, rows), reward(x.clamp(-1, 1), zeros, rows)
    rollout = scores["policy"]["rollout"]
    gold = base.judge(base.to_images(x.clamp(-1, 1)), prompts)["gold"].float()
    # one sampler, one generator, the same draws: equal up to the batch's rounding (measured 0); a
    # draw out of order or another noise level moves gold by ~1 and the scores by ~0.1
    assert max_abs(torch.tensor(rollout["gold"]), gold) < 1e-4
    assert max_abs(torch.tensor(rollout["drm_by_step"][-1]), raw) < 1e-4
    assert max_abs(torch.tensor(rollout["drm_by_step_clamped"][-1]), clamped) < 1e-4
    assert max_abs(torch.tensor(rollout["drm"]), clamped) < 1e-4
    assert max_abs(raw, clamped) > 0.01  # the clamp matters: the two scores are told apart
    within(max_abs(torch.tensor(rollout["outside"]), (x.abs() > 1).flatten(1).float().mean(1)),
           1e-6, "the share of pixels beyond [-1, 1]")
    within(max_abs(torch.tensor(rollout["excess"]),
                   (x.abs() - 1).clamp(min=0).flatten(1).mean(1)), 1e-6, "their mean excess")
    windowed = score_run(cfg, run_dir(cfg, "stepwise", 1, cfg.lr), bases)
    assert len(bases) == 2  # another window samples the base another way: its own entry
    first = [windowed["base"][name]["drm_by_step"][0] for name in ("rollout", "ODE, 10 steps")]
    assert first[0] == first[1]  # step 1 lies outside the window 1:3: an Euler step, as the ODE's
    assert windowed["base"]["rollout"]["drm_by_step"][1] != windowed["base"]["ODE, 10 steps"][
        "drm_by_step"][1]  # step 2 inside it: an SDE step
    assert windowed["credited"] == [False, True, False]  # the window's steps, less the last
    report = table(cfg)
    rise = [line for line in report.splitlines() if line.startswith("| stepwise, seed 1")][-1]
    cells = rise.split("|")[2:-1]
    # the policy is its base: every difference is exactly 0, and so is its interval
    assert {c.strip("* ") for c in cells} == {"+0.00 [+0.00, +0.00]"}, rise
    assert cells[1].startswith(" **") and not cells[0].startswith(" **"), rise  # step 2 credited
    cache = os.path.join(run_dir(cfg, "stepwise", 0, cfg.lr), "samplers_2.json")
    json.dump({**scores, "step": 3, "marker": 1}, open(cache, "w"))
    assert score_run(cfg, run_dir(cfg, "stepwise", 0, cfg.lr))["marker"] == 1  # read back
    os.remove(cache)  # sampled again, with a base of the same settings known: that one is taken
    for settings in bases:
        bases[settings] = {**bases[settings], "marker": settings}
    again = score_run(cfg, run_dir(cfg, "stepwise", 0, cfg.lr), bases)
    assert json.loads(again["base"]["marker"])[SAMPLED_WITH.index("sde_window")] == ""  # seed 0's
    assert again["policy"] == scores["policy"]
    filled = {}  # a cached run gives its base to the runs scored after it
    score_run(cfg, run_dir(cfg, "stepwise", 0, cfg.lr), filled)
    assert list(filled.values()) == [again["base"]]
