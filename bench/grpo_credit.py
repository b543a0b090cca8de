"""The paper's credit-assignment experiment and its rivals, each as its authors' code runs it, at
one budget of DiT-pass equivalents (or of updates: --updates), with common random numbers and
paired statistics.

    python -m bench.grpo_credit --experiment=headline --eval_every=5 --rescore=32
                                                         # step-wise against sparse, 8 seeds
    python -m bench.grpo_credit                          # every credit mode x 4 seeds
    python -m bench.grpo_credit --experiment=collapse --updates=120 --out_dir=out/collapse
                                                         # step-wise: windows 0:5, 5:10, KL or not
    python -m bench.grpo_credit --experiment=objectives  # PPO, DiffusionNFT, AWM x sparse, stepwise
    python -m bench.grpo_credit --modes=tree,sparse --seeds=0   # some of them
    python -m bench.grpo_credit --plot_only              # redraw from out/credit/*/metrics.jsonl

Every run gets the same budget (--max_nfe): DiT passes (rollouts, look-aheads, training forwards,
and the training passes' backwards at their FLOPs, about 2 forwards) plus DRM passes times a DRM
pass's FLOPs over a DiT pass's (train_policy.py counts both: 0.535 a DRM pass on the toy). A run
that stops early is resumed (--resume); a finished one is skipped. With one seed every mode draws
the same prompts and initial noise at each update (train_ops.streams), so modes compare pairwise:
the table gives each mode's held-out gold at exactly the budget (interpolated between the
evaluations on either side) as mean +- s.e. over seeds, and its difference from the reference mode
per seed (paired), mean +- s.e., with its two-sided 95% interval at seeds - 1 degrees of freedom;
"beats" or "loses" only when the interval excludes 0, else "tie" (bench/stats.py). It also gives the
first evaluation at which the mode's mean gold reaches the target (the reference's gold at the
budget) and the one before it, and the budget at SD3.5-medium's DRM cost (0.90 DiT passes a DRM
pass: bench/sd3_memory.py's 2.19 against 2.44 TFLOPs). Runs go `jobs` at a time, one CPU thread
each, so wall times compare between modes. Writes OUT_DIR/<experiment>.md,
OUT_DIR/<experiment>_lrs.json and OUT_DIR/<experiment>.png (needs matplotlib, which the rest does
not); --rescore=N adds the final checkpoints' gold on the held-out prompts x N fresh noises (and,
where a rival is evaluated at its authors' guidance too, every mode's at that guidance).
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from base import ModelFlags, load_base
from bench.stats import SD35_MEDIUM_DRM_COST, interval, mean_se, t_critical, verdict
from checkpoints import check_writable, load_training_state, write_text
from common import UserError, check_flags, flag, print_config, read_text, run_main
from evaluation import evaluate

# Flow-GRPO's KL beta for a preference reward (its pickscore_sd3 config: 0.01; GenEval's: 0.04)
# x |dt| = 0.111 on our 10 steps (grpo.grpo_loss: its KL is ours x |dt|)
KL = "--kl_weight=0.0011"

FLOW_GRPO = "sparse, Flow-GRPO's PickScore recipe (groups of 24, global std, beta 0.01)"
# name in the tables -> train_policy.py flags; every mode 4 prompts an update (16 trajectories of 4,
# a tree 64 leaves of 16), but Flow-GRPO's recipe: its group of 24 and its 48 a batch (2 prompts,
# the first 2 of the others'); the same first prompts and noises for a seed
MODES = {
    "stepwise": "--credit=stepwise",
    "stepwise, last step trained": "--credit=stepwise --train_last_step",
    "stepwise, x0 score": "--credit=stepwise --score=x0",
    "stepwise, x0 proxy score": "--credit=stepwise --score=x0_proxy",
    "stepwise, lookahead score": "--credit=stepwise --score=lookahead --eval_every=5",
    "sparse": "--credit=sparse",
    FLOW_GRPO: (
        f"--credit=sparse --trajectories=48 --per_prompt=24 --group_std=global {KL} "
        "--eval_every=5"),
    "cosine": "--credit=cosine",
    "tree": "--credit=tree --trajectories=64 --eval_every=5",
    "sparse, random window (Flow-GRPO-Fast)": "--credit=sparse --sde_window=random:3",
    "sparse, sliding window (MixGRPO)": "--credit=sparse --sde_window=slide:2:12",
    "stepwise, window 0:5": "--credit=stepwise --sde_window=0:5",
    "stepwise, window 5:10": "--credit=stepwise --sde_window=5:10",
    "stepwise, KL": f"--credit=stepwise {KL}",
    "stepwise, window 0:5, KL": f"--credit=stepwise --sde_window=0:5 {KL}",
    "stepwise, window 5:10, KL": f"--credit=stepwise --sde_window=5:10 {KL}",
    "NFT, sparse": "--objective=nft --credit=sparse",
    "NFT, stepwise": "--objective=nft --credit=stepwise",
    "AWM, sparse": "--objective=awm --credit=sparse",
    "AWM, stepwise": "--objective=awm --credit=stepwise",
}
# experiment -> (its modes, the reference each is compared with, default seeds)
EXPERIMENTS = {
    # the paper's claim, powered: 8 paired seeds
    "headline": (["stepwise", "sparse"], "sparse", "0,1,2,3,4,5,6,7"),
    "credit": (["stepwise", "stepwise, last step trained", "stepwise, x0 score",
                "stepwise, x0 proxy score",
                "stepwise, lookahead score", "sparse", FLOW_GRPO, "cosine",
                "tree", "sparse, random window (Flow-GRPO-Fast)",
                "sparse, sliding window (MixGRPO)"], "sparse", "0,1,2,3"),
    "collapse": (["stepwise", "stepwise, window 0:5", "stepwise, window 5:10", "stepwise, KL",
                  "stepwise, window 0:5, KL", "stepwise, window 5:10, KL"], "stepwise", "0,1,2"),
    # the objectives (PPO: the rows above) with the terminal reward and the DRM's at each sigma
    "objectives": (["stepwise", "sparse", "NFT, sparse", "NFT, stepwise", "AWM, sparse",
                    "AWM, stepwise"], "sparse", "0,1,2,3"),
}


def folder(name):
    """A mode's run folder name: 'sparse, random window (Flow-GRPO-Fast)' ->
    sparse_random_window_Flow-GRPO-Fast."""
    for old, new in ((", ", "_"), (" ", "_"), (":", "-"), ("(", ""), (")", ""), ("'", "")):
        name = name.replace(old, new)
    return name


@dataclass
class Config:
    out_dir: str = "out/credit"
    # headline | credit | collapse | objectives (EXPERIMENTS)
    experiment: str = flag("credit", choices=EXPERIMENTS)
    # comma-separated folder names (stepwise,tree,...); "" = the experiment's
    modes: tuple = flag((), choices=[folder(name) for name in MODES], of=str)
    # the mode every other is compared with, a folder name ("" = the experiment's: sparse, or for
    # the collapse stepwise); another writes <experiment>_vs_<it>.md beside the experiment's table
    reference: str = ""
    # () = the experiment's (headline: 0-7, credit: 0-3, collapse: 0-2)
    seeds: tuple = flag((), "[0, inf)")
    # each mode's lr is the best of these on the tuning seeds (one lr: no tuning)
    lrs: tuple = flag((1e-5, 3e-5, 1e-4), "(0, inf)", of=float)
    tuning_seeds: tuple = flag((100, 101), "[0, inf)")  # never among --seeds
    max_nfe: int = flag(38400, "[1, inf)")  # DiT-pass equivalents a run
    # a budget of updates in place of --max_nfe (the collapse: 120), gold read at the last
    updates: int = flag(0, "[0, inf)", zero="none: the budget is --max_nfe")
    # with a budget of updates, the curves' table reads the evaluations every this many updates
    curve_every: int = flag(20, "[1, inf)", used=(lambda cfg: cfg.updates > 0, "--updates"))
    # updates between held-out evaluations (a mode's flags may say otherwise)
    eval_every: int = flag(10, "[1, inf)")
    jobs: int = flag(2, "[1, inf)")  # runs at a time, one thread each
    extra: str = ""                    # more train_policy.py flags for every run, space-separated
    plot_only: bool = False
    # the final checkpoints re-scored on the held-out prompts x this many noises (seed 5678, apart
    # from the evaluations' 1234), cached in each run folder (rescore_N.json; rescore_N_cfgW.json at
    # a rival's second guidance W)
    rescore: int = flag(0, "[0, inf)", zero="none")


def chosen(cfg):
    """-> (modes, the reference mode, seeds) of the experiment, narrowed by --modes and --seeds."""
    modes, reference, seeds = EXPERIMENTS[cfg.experiment]
    if cfg.modes:
        by_folder = {folder(name): name for name in MODES}
        modes = [by_folder[m] for m in cfg.modes]
    if cfg.reference:
        names = [folder(name) for name in modes]
        if cfg.reference not in names:
            raise UserError(f"--reference={cfg.reference}: not among the modes compared "
                            f"({', '.join(names)}); name one of them")
        reference = modes[names.index(cfg.reference)]
    seeds = list(cfg.seeds) or [int(s) for s in seeds.split(",")]
    shared = sorted(set(seeds) & set(cfg.tuning_seeds))
    if shared:
        raise UserError(f"--seeds and --tuning_seeds share {shared}: a verdict's seeds must not "
                        "be those its learning rates were chosen on")
    if not cfg.lrs or not cfg.tuning_seeds and len(cfg.lrs) > 1:
        raise UserError("--lrs and --tuning_seeds: give at least one lr, and tuning seeds to "
                        "choose among several")
    return modes, reference, seeds


def tuned_as(mode):
    """The mode whose tuned lr a mode takes: sparse's for the sparse variants (the same loss and
    reward, another rollout), its own otherwise."""
    return "sparse" if MODES[mode].startswith("--credit=sparse") else mode


def run_dir(cfg, mode, seed, lr):
    """A run's folder; a budget of updates in its name (such a run must never resume one that
    stopped at the budget of equivalents, nor the other way round)."""
    budgeted = f"_updates{cfg.updates}" if cfg.updates else ""
    return os.path.join(cfg.out_dir, f"{folder(mode)}_lr{lr:g}_seed{seed}{budgeted}")


def read_metrics(path):
    """A run's metrics rows; a last row cut short by a kill is dropped."""
    rows = []
    for line in open(path).read().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def budget(cfg):
    """(a run's budget, the metrics key that counts it): --updates, or --max_nfe equivalents."""
    return (cfg.updates, "step") if cfg.updates else (cfg.max_nfe, "dit_equivalents")


def finished(cfg, path):
    """Whether the run in path spent its budget (its last evaluation at or past it)."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(metrics):
        return False
    rows = read_metrics(metrics)
    limit, axis = budget(cfg)
    return bool(rows) and rows[-1].get(axis, 0) >= limit


def run_all(cfg, jobs):
    """Each (mode, seed, lr) of jobs to its budget, `cfg.jobs` at a time, resumed where cut short.
    A run that exits without spending its budget (stopped alone: SIGTERM, the OOM killer) is an
    error, not a finished run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue = [job for job in jobs if not finished(cfg, run_dir(cfg, *job))]
    running = []
    while queue or running:
        while queue and len(running) < cfg.jobs:
            mode, seed, lr = queue.pop(0)
            path = run_dir(cfg, mode, seed, lr)
            again = "--resume" if os.path.exists(os.path.join(path,
                                                              "train_state.pt")) else "--overwrite"
            command = [sys.executable, "train_policy.py", f"--eval_every={cfg.eval_every}",
                       *MODES[mode].split(), f"--lr={lr:g}",
                       f"--seed={seed}", f"--out_dir={path}",
                       f"--max_nfe={0 if cfg.updates else cfg.max_nfe}",
                       f"--updates={cfg.updates or 100000}", again, *cfg.extra.split()]
            print(" ".join(command), flush=True)
            os.makedirs(path, exist_ok=True)
            log = open(os.path.join(path, "log.txt"), "a")
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((process, path))
        process, path = running.pop(0)
        process.wait()
        if process.returncode or not finished(cfg, path):
            raise UserError(f"{' '.join(process.args)} "
                            + ("failed" if process.returncode else "stopped before its budget")
                            + "; see its log.txt, then run again: it resumes")


def choose_lr(runs, lrs, seeds, limit, axis="dit_equivalents"):
    """The lr whose runs (runs[lr, seed]) have the best mean gold at the budget (limit, on axis)
    over the seeds (the smaller lr on a tie) -> (lr, {lr: that mean})."""
    means = {lr: sum(gold_at(runs[lr, s], limit, axis=axis) for s in seeds) / len(seeds)
             for lr in lrs}
    return max(lrs, key=lambda lr: (means[lr], -lr)), means


def report(cfg):
    """The stem of the experiment's files in OUT_DIR (.md, .png, _lrs.json): the experiment's
    name, and the reference's when --reference names another."""
    return os.path.join(cfg.out_dir, cfg.experiment + (f"_vs_{cfg.reference}" if cfg.reference
                                                       else ""))


def tune(cfg, modes):
    """Each mode's lr, chosen on the tuning seeds (shared by the modes tuned_as one) -> {mode: lr},
    and OUT_DIR/<experiment>_lrs.json recording the choice and every candidate's gold."""
    owners = list(dict.fromkeys(tuned_as(m) for m in modes))
    if len(cfg.lrs) == 1:
        return {m: cfg.lrs[0] for m in modes}
    if not cfg.plot_only:
        run_all(cfg, [(m, s, lr) for s in cfg.tuning_seeds for m in owners for lr in cfg.lrs])
    choice, record = {}, {}
    for owner in owners:
        runs = {(lr, s): load_run(cfg, owner, s, lr) for lr in cfg.lrs for s in cfg.tuning_seeds}
        choice[owner], means = choose_lr(runs, cfg.lrs, cfg.tuning_seeds, *budget(cfg))
        record[owner] = {"lr": choice[owner], "tuning_seeds": list(cfg.tuning_seeds),
                         "gold_at_the_budget": {f"{lr:g}": g for lr, g in means.items()}}
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_text(report(cfg) + "_lrs.json", json.dumps(record, indent=1))
    return {m: choice[tuned_as(m)] for m in modes}


def load_run(cfg, mode, seed, lr):
    path = os.path.join(run_dir(cfg, mode, seed, lr), "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: run without --plot_only first")
    return read_metrics(path)


def sd35_equivalents(row):
    """A metrics row's DiT-pass equivalents with a DRM pass at SD3.5-medium's cost."""
    return (row.get("nfe", 0) + row.get("backward_cost", 0) * row.get("backward_passes", 0)
            + SD35_MEDIUM_DRM_COST * row.get("drm_calls", 0))


RESCORE_SEED = 5678
SECOND = "gold_cfg"  # a metrics key of gold at a rival's second guidance: gold_cfg1 at guidance 1


def second_guidances(runs):
    """The second guidances the runs' first evaluations hold -> {metrics key: guidance}, sorted."""
    return {key: float(key[len(SECOND):]) for key in
            sorted({key for run in runs.values() for key in run[0] if key.startswith(SECOND)})}


def rescore(cfg, mode, seed, lr, cfg_scale=None):
    """The run's final policy (model.safetensors) on the held-out prompts x --rescore noises, as its
    evaluations sample (ODE, their steps, guidance and shift, read from its train state; or at
    `cfg_scale`, a rival's authors' guidance) -> mean gold, cached in the run folder."""
    path = run_dir(cfg, mode, seed, lr)
    at = "" if cfg_scale is None else f"_cfg{cfg_scale:g}"
    cache = os.path.join(path, f"rescore_{cfg.rescore}{at}.json")
    state = load_training_state(os.path.join(path, "train_state.pt"), "cpu")
    cached = json.loads(read_text(cache, "a re-score")) if os.path.exists(cache) else {}
    if cached.get("step") == state["step"]:  # (a checkpoint trained on since is scored again)
        return cached["gold"]
    saved = state["config"]
    base = load_base(ModelFlags(base=os.path.join(path, "model.safetensors")), "cpu")
    summary = evaluate(base.dit, base, base.heldout_prompts(saved["eval_prompts"], []),
                       cfg.rescore, seed=RESCORE_SEED, steps=saved["eval_steps"],
                       cfg_scale=saved["eval_cfg_scale"] if cfg_scale is None else cfg_scale,
                       shift=saved["shift"])[0]
    write_text(cache, json.dumps({"per_prompt": cfg.rescore, "seed": RESCORE_SEED,
                                  "step": state["step"], **summary}))
    print(f"re-scored {path}{at}: gold {summary['gold']:.4f}", flush=True)
    return summary["gold"]


def gold_at(run, budget, key="gold", axis="dit_equivalents"):
    """A run's held-out gold (or another figure) at `budget` DiT-pass equivalents (or another
    axis), linear between the evaluations on either side (None before its first or past its
    last)."""
    points = [(r[axis], r[key]) for r in run]
    for (x0, g0), (x1, g1) in zip(points, points[1:]):
        if x0 <= budget <= x1:
            return g0 + (g1 - g0) * (budget - x0) / (x1 - x0) if x1 > x0 else g1
    return None


def reaching(runs, mode, seeds, target, axis="dit_equivalents"):
    """The first evaluation at which the mode's mean gold over seeds reaches target -> (where it is
    on the budget's axis, DiT-pass equivalents or updates, and where the evaluation before it is:
    the resolution of the answer), or None. A mode's seeds evaluate at the same updates, at equal
    equivalents (its passes a update are fixed)."""
    rows = zip(*(runs[mode, s] for s in seeds))
    previous = 0.0
    for row in rows:
        if sum(r["gold"] for r in row) / len(row) >= target:
            return row[0][axis], previous
        previous = row[0][axis]
    return None


def paired_rows(values, modes, reference, df):
    """Table rows: each mode's per-seed figures (values[mode], the seeds in one order) as mean ±
    s.e., and its paired difference from the reference with the 95% interval at df and the
    verdict."""
    lines = [f"| mode | n | gold (mean ± s.e.) | minus {reference} (paired) | 95% interval | df | "
             "verdict |", "|---" * 7 + "|"]
    for mode in modes:
        mean, se = mean_se(values[mode])
        cells = ["", "", "", ""]
        if reference in modes and mode != reference:
            diff, diff_se = mean_se([a - b for a, b in zip(values[mode], values[reference])])
            span = "[{:+.4f}, {:+.4f}]".format(*interval(diff, diff_se, df)) if df else ""
            cells = [f"{diff:+.4f} ± {diff_se:.4f}", span, str(df), verdict(diff, diff_se, df)]
        lines.append(f"| {mode} | {len(values[mode])} | {mean:.4f} ± {se:.4f} | "
                     + " | ".join(cells) + " |")
    return lines


def curves(runs, modes, seeds, every):
    """A long run's curves (the collapse): at every `every`-th update, the evaluation's gold (mean ±
    s.e. over seeds) / the DRM's score of the evaluation's samples / the DRM's mean score of the
    rollouts' last credited states (train_reward; none at update 0), each mean over seeds."""
    steps = sorted({row["step"] for m in modes for s in seeds for row in runs[m, s]
                    if row["step"] % every == 0})
    lines = ["| mode | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for mode in modes:
        cells = []
        for step in steps:
            rows = [row for s in seeds for row in runs[mode, s] if row["step"] == step]
            gold, gold_se = mean_se([row["gold"] for row in rows])
            means = [mean_se([row[key] for row in rows])[0] for key in ("drm", "train_reward")
                     if key in rows[0]]
            cells.append(f"{gold:.2f} ± {gold_se:.2f} / " + " / ".join(f"{m:.2f}" for m in means))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def summarise(cfg, runs, modes, reference, seeds, rescored=None):
    """The table: gold at exactly the budget (interpolated between the evaluations on either
    side), the paired difference from the reference with its 95% interval at seeds - 1 degrees of
    freedom and its verdict, the first evaluation at the reference's final gold, the counts behind
    the equivalents, and reward hacking; then gold at the budget counted at SD3.5-medium's DRM
    cost (a budget of updates: the curves instead), and the final checkpoints re-scored
    (rescored["gold"][mode, seed], where given; at a rival's second guidance W,
    rescored[f"{SECOND}W"])."""
    limit, axis = budget(cfg)
    finals = {m: [gold_at(runs[m, s], limit, axis=axis) for s in seeds] for m in modes}
    target = mean_se(finals[reference])[0] if reference in modes else None
    df = len(seeds) - 1
    spent = (f"{cfg.updates} updates a run, gold read at the last" if cfg.updates else
             f"{cfg.max_nfe:,} DiT-pass equivalents a run (DiT forward and backward passes and DRM "
             "passes, each at its FLOPs), gold read at exactly the budget")
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); budget {spent}; "
             "differences paired by seed (the same "
             f"prompts and initial noise), 95% interval at {df} df (t = "
             f"{t_critical(df) if df else float('nan'):.3f}): beats / loses only when it excludes "
             "0; target: "
             + (f"{reference}'s final gold, {target:.4f}" if target is not None else "none"), "",
             f"| mode | n | gold start | gold at the budget (mean ± s.e.) | minus {reference} "
             "(paired) | 95% interval | df | verdict | DRM start -> end | updates | DiT passes "
             "(backward) | DRM passes | DiT-pass equivalents (at SD3.5-medium's DRM cost) | first "
             "evaluation at the target (the one before) | DRM up while gold down |",
             "|---" * 15 + "|"]
    for mode in modes:
        end, end_se = mean_se(finals[mode])
        paired = span = judged = ""
        if reference in modes and mode != reference:
            diff, diff_se = mean_se([a - b for a, b in zip(finals[mode], finals[reference])])
            paired, judged = f"{diff:+.4f} ± {diff_se:.4f}", verdict(diff, diff_se, df)
            span = "[{:+.4f}, {:+.4f}]".format(*interval(diff, diff_se, df)) if df else ""
        last = [runs[mode, s][-1] for s in seeds]
        average = lambda key: sum(r.get(key, 0) for r in last) / len(last)  # noqa: E731
        sd35 = sum(sd35_equivalents(r) for r in last) / len(last)
        hit = reaching(runs, mode, seeds, target, axis) if target is not None else None
        hacked = [s for s in seeds if runs[mode, s][-1]["drm"] > runs[mode, s][0]["drm"]
                  and runs[mode, s][-1]["gold"] < runs[mode, s][0]["gold"]]
        start = mean_se([runs[mode, s][0]["gold"] for s in seeds])[0]
        drm = [mean_se([runs[mode, s][i]["drm"] for s in seeds])[0] for i in (0, -1)]
        lines.append(f"| {mode} | {len(seeds)} | {start:.4f} | {end:.4f} ± {end_se:.4f} | {paired} "
                     f"| {span} | {df if paired else ''} | {judged} | {drm[0]:.3f} -> "
                     f"{drm[1]:.3f} | {average('step'):.0f} | {average('nfe'):,.0f} "
                     f"({average('backward_passes'):,.0f}) | {average('drm_calls'):,.0f} | "
                     f"{average('dit_equivalents'):,.0f} ({sd35:,.0f}) | "
                     + (f"{hit[0]:,.0f} ({hit[1]:,.0f})" if hit else "not reached") + " | "
                     f"{'seeds ' + str(hacked) if hacked else 'no'} |")
    # a budget of equivalents, counted at SD3.5-medium's DRM cost too (a DRM pass dearer than the
    # toy's: each run reaches that budget sooner on that count)
    at_sd35 = {} if cfg.updates else {
        m: [gold_at([{**r, "sd35": sd35_equivalents(r)} for r in runs[m, s]], cfg.max_nfe,
                    axis="sd35") for s in seeds] for m in modes}
    if at_sd35 and None not in sum(at_sd35.values(), []):
        lines += ["", f"Gold at exactly {cfg.max_nfe:,} DiT-pass equivalents counted at "
                  f"SD3.5-medium's DRM cost ({SD35_MEDIUM_DRM_COST:.3f} a DRM pass), the same "
                  "runs:", "", *paired_rows(at_sd35, modes, reference, df)]
    if cfg.updates:
        lines += ["", f"Every {cfg.curve_every} updates: held-out gold (mean ± s.e. over seeds) / "
                  "the DRM's score of the evaluation's samples / the DRM's mean score of the "
                  "rollouts' last credited states (train_reward), each the mean over seeds:", "",
                  *curves(runs, modes, seeds, cfg.curve_every)]
    if rescored:
        lines += ["", f"The final checkpoints (each run's last evaluation, at or just past the "
                  f"budget) re-scored on the held-out prompts x {cfg.rescore} noises (seed "
                  f"{RESCORE_SEED}, not the evaluations'):", "",
                  *paired_rows({m: [rescored["gold"][m, s] for s in seeds] for m in modes},
                               modes, reference, df)]
    # a rival evaluated at its authors' guidance too (NFT, AWM: 1): that guidance's gold, paired
    # with the reference's where the reference was evaluated there too (--reference=NFT_sparse);
    # re-scored, every mode's final checkpoint at that guidance, the reference's too
    for key, guidance in second_guidances(runs).items():
        evaluated = [m for m in modes if key in runs[m, seeds[0]][0]]
        start = mean_se([runs[evaluated[0], s][0][key] for s in seeds])[0]
        lines += ["", f"At guidance {guidance:g}, where their authors evaluate (gold start: "
                  f"{start:.4f}, the base's for every mode):", "",
                  *paired_rows({m: [gold_at(runs[m, s], limit, key, axis) for s in seeds]
                                for m in evaluated}, evaluated, reference, df)]
        if rescored:
            lines += ["", f"The final checkpoints re-scored as above, at guidance {guidance:g}:",
                      "",
                      *paired_rows({m: [rescored[key][m, s] for s in seeds] for m in modes},
                                   modes, reference, df)]
    return "\n".join(lines)


def plot(runs, modes, seeds, path, title, axis="dit_equivalents"):
    """Gold against the budget's axis (DiT-pass equivalents, or updates), mean ± s.e. over seeds;
    beside it gold against wall time, or with a budget of updates the DRM's score (what a run
    that hacks its reward raises while gold falls)."""
    try:
        import matplotlib
    except ImportError:
        print(f"no figure: {path} needs matplotlib (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    end = min(runs[m, s][-1][axis] for m in modes for s in seeds)
    grid = [end * i / 100 for i in range(101)]
    for mode in modes:
        curves = [[gold_at(runs[mode, s], x, axis=axis) for x in grid] for s in seeds]
        stats = [mean_se(list(values)) for values in zip(*curves)]
        mean, se = [m for m, _ in stats], [e for _, e in stats]
        style = "--" if "window" in mode else ":" if "score" in mode or "last" in mode else "-"
        line, = axes[0].plot(grid, mean, label=mode, linestyle=style)
        if len(modes) <= 3:  # few arms: each seed's own curve, the spread behind the mean
            for curve in curves:
                axes[0].plot(grid, curve, color=line.get_color(), linewidth=0.6, alpha=0.35)
        axes[0].fill_between(grid, [m - e for m, e in zip(mean, se)],
                             [m + e for m, e in zip(mean, se)], alpha=0.12)
        right = ("step", "drm") if axis == "step" else ("time_s", "gold")
        rows = range(min(len(runs[mode, s]) for s in seeds))
        axes[1].plot(*[[sum(runs[mode, s][i][key] for s in seeds) / len(seeds) for i in rows]
                       for key in right], label=mode, linestyle=style)
    labels = ((("updates", "held-out gold"), ("updates", "held-out DRM score")) if axis == "step"
              else (("DiT-pass equivalents (DiT passes + DRM passes x their FLOPs share)",
                     "held-out gold"), ("wall time, s (1 CPU thread)", "held-out gold")))
    for ax, (x_label, y_label) in zip(axes, labels):
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: mean ± s.e. over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main(cfg):
    check_flags(cfg)
    modes, reference, seeds = chosen(cfg)
    # before any work
    for suffix in (".md", ".png", "_lrs.json"):
        check_writable(report(cfg) + suffix, "--out_dir=")
    print_config(cfg)
    lrs = tune(cfg, modes)
    if not cfg.plot_only:
        run_all(cfg, [(m, s, lrs[m]) for s in seeds for m in modes])
    runs = {(m, s): load_run(cfg, m, s, lrs[m]) for m in modes for s in seeds}
    rescored = None
    if cfg.rescore:  # at the evaluations' guidance, and at a rival's second one for every mode
        rescored = {"gold": {(m, s): rescore(cfg, m, s, lrs[m]) for m in modes for s in seeds},
                    **{key: {(m, s): rescore(cfg, m, s, lrs[m], guidance)
                             for m in modes for s in seeds}
                       for key, guidance in second_guidances(runs).items()}}
    table = (f"learning rates, each the best of {', '.join(f'{lr:g}' for lr in cfg.lrs)} at the "
             f"budget on seeds {', '.join(map(str, cfg.tuning_seeds))} "
             f"({os.path.basename(report(cfg))}_lrs.json): "
             + "; ".join(f"{m} {lrs[m]:g}" for m in modes) + "\n\n"
             + summarise(cfg, runs, modes, reference, seeds, rescored))
    print(table)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stem = report(cfg)
    write_text(stem + ".md", table + "\n")
    figure = plot(runs, modes, seeds, stem + ".png", f"GRPO on the toy, {cfg.experiment}",
                  budget(cfg)[1])
    print(f"wrote {stem}.md" + (f" and {stem}.png" if figure else ""))
    return table


if __name__ == "__main__":
    run_main(main, Config)
