"""The paper's credit-assignment experiment, with its rivals: step-wise GRPO against sparse (Flow-GRPO),
cosine (CoCA) and tree (BranchGRPO) credit, and step-wise and sparse with an SDE window (Flow-GRPO-Fast).

    python -m bench.grpo_credit                      # 6 modes x 3 seeds on the CPU toy, then the table and figure
    python -m bench.grpo_credit --modes=tree --seeds=0   # some of them
    python -m bench.grpo_credit --plot_only          # redraw from out/credit/*/metrics.jsonl

Every run gets the same budget of DiT forward passes (--max_nfe: rollouts and training passes counted,
DRM passes apart). Modes differ in what an update costs (a window trains fewer steps, a tree runs its
shared prefixes once), so they run different numbers of updates: compare them by DiT passes and by
wall time. Runs go `jobs` at a time, one CPU thread each, so wall times compare between modes. Writes
OUT_DIR/results.md (the table) and OUT_DIR/grpo_credit.png: held-out gold against DiT passes and wall
time, mean over seeds with the spread (min-max) shaded. Needs matplotlib for the figure
(`pip install matplotlib`; it is not a dependency of the rest).
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from common import UserError, print_config, run_main

# name in the table -> train_policy.py flags; the run folder is the name with spaces and commas as _
MODES = {
    "stepwise": "--credit=stepwise",
    "sparse": "--credit=sparse",
    "cosine": "--credit=cosine",
    "tree": "--credit=tree --split_steps=0,3,6 --branch=2",
    "stepwise, window 0:5": "--credit=stepwise --sde_window=0:5",
    "sparse, window 0:5": "--credit=sparse --sde_window=0:5",
}


@dataclass
class Config:
    out_dir: str = "out/credit"
    modes: str = ""                    # comma-separated folder names (stepwise,tree,...); "" = all of MODES
    seeds: str = "0,1,2"
    max_nfe: int = 38400               # DiT passes per run: 60 stepwise updates of 16 trajectories x 10 steps x 2 x 2
    eval_every: int = 10
    jobs: int = 2                      # runs at a time, one thread each
    extra: str = ""                    # more train_policy.py flags for every run, space-separated
    plot_only: bool = False


def folder(name):
    return name.replace(", ", "_").replace(" ", "_").replace(":", "-")


def chosen_modes(cfg):
    if not cfg.modes:
        return list(MODES)
    by_folder = {folder(name): name for name in MODES}
    unknown = [m for m in cfg.modes.split(",") if m not in by_folder]
    if unknown:
        raise UserError(f"--modes={cfg.modes}: unknown {unknown}; choose from {', '.join(by_folder)}")
    return [by_folder[m] for m in cfg.modes.split(",")]


def run_all(cfg, modes, seeds):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue = [(mode, seed) for seed in seeds for mode in modes]
    running = []
    while queue or running:
        while queue and len(running) < cfg.jobs:
            mode, seed = queue.pop(0)
            run_dir = os.path.join(cfg.out_dir, f"{folder(mode)}_seed{seed}")
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                print(f"{run_dir}: already there, skipped (delete it to rerun)")
                continue
            command = [sys.executable, "train_policy.py", *MODES[mode].split(), f"--seed={seed}", f"--out_dir={run_dir}",
                       f"--max_nfe={cfg.max_nfe}", "--updates=100000", f"--eval_every={cfg.eval_every}",
                       *cfg.extra.split()]
            print(" ".join(command), flush=True)
            os.makedirs(run_dir, exist_ok=True)
            running.append(subprocess.Popen(command, env=env, stdout=open(os.path.join(run_dir, "log.txt"), "w"),
                                            stderr=subprocess.STDOUT))
        running[0].wait()
        if running[0].returncode:
            raise RuntimeError(f"{' '.join(running[0].args)} failed; see its log.txt")
        running.pop(0)


def load_runs(cfg, modes, seeds):
    runs = {}
    for mode in modes:
        for seed in seeds:
            path = os.path.join(cfg.out_dir, f"{folder(mode)}_seed{seed}", "metrics.jsonl")
            if not os.path.exists(path):
                raise UserError(f"{path} is missing: run without --plot_only first")
            with open(path) as f:
                runs[mode, seed] = [json.loads(line) for line in f]
    return runs


def mean_curve(runs, mode, seeds, key):
    """Per evaluation, the mean over seeds (runs cut to the shortest)."""
    n = min(len(runs[mode, s]) for s in seeds)
    return [sum(runs[mode, s][i][key] for s in seeds) / len(seeds) for i in range(n)]


def first_reaching(curve, target):
    return next((i for i, value in enumerate(curve) if value >= target), None)


def summarise(runs, modes, seeds):
    """The table: gold at the end, what it took to reach sparse's final gold, DRM passes, reward hacking."""
    target = mean_curve(runs, "sparse", seeds, "gold")[-1] if "sparse" in modes else None
    lines = [f"target: sparse's final held-out gold, mean of {len(seeds)} seeds = {target:.4f}" if target is not None
             else "no sparse runs: no target", "",
             "| credit | gold start | gold end (mean, min to max) | DRM start -> end | updates | "
             "updates to target | DiT passes to target | wall time to target (s) | DRM passes a run | "
             "DRM up while gold down |", "|---|---|---|---|---|---|---|---|---|---|"]
    reached = {}
    for mode in modes:
        gold, drm = mean_curve(runs, mode, seeds, "gold"), mean_curve(runs, mode, seeds, "drm")
        steps, nfe, times = (mean_curve(runs, mode, seeds, key) for key in ("step", "nfe", "time_s"))
        ends = [runs[mode, s][-1]["gold"] for s in seeds]
        hit = first_reaching(gold, target) if target is not None else None
        reached[mode] = (nfe[hit], times[hit]) if hit is not None else None
        hacked = [s for s in seeds if runs[mode, s][-1]["drm"] > runs[mode, s][0]["drm"]
                  and runs[mode, s][-1]["gold"] < runs[mode, s][0]["gold"]]
        drm_calls = sum(runs[mode, s][-1]["drm_calls"] for s in seeds) / len(seeds)
        at = (lambda values, fmt: fmt.format(values[hit]) if hit is not None else "not reached")  # noqa: E731
        lines.append(f"| {mode} | {gold[0]:.4f} | {gold[-1]:.4f} ({min(ends):.4f} to {max(ends):.4f}) | "
                     f"{drm[0]:.3f} -> {drm[-1]:.3f} | {steps[-1]:.0f} | {at(steps, '{:.0f}')} | {at(nfe, '{:,.0f}')} | "
                     f"{at(times, '{:.0f}')} | {drm_calls:,.0f} | {'seeds ' + str(hacked) if hacked else 'no'} |")
    if reached.get("stepwise") and reached.get("sparse") and reached["sparse"][0] > 0:
        lines += ["", f"stepwise reaches sparse's final gold in {reached['stepwise'][0] / reached['sparse'][0]:.2f}x "
                      f"the DiT passes and {reached['stepwise'][1] / reached['sparse'][1]:.2f}x the wall time "
                      "(paper: 1/2.5 = 0.40x the iterations and 1/3.5 = 0.29x the time)"]
    return "\n".join(lines)


def plot(runs, modes, seeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for mode in modes:
        gold = mean_curve(runs, mode, seeds, "gold")
        lo = [min(runs[mode, s][i]["gold"] for s in seeds) for i in range(len(gold))]
        hi = [max(runs[mode, s][i]["gold"] for s in seeds) for i in range(len(gold))]
        for ax, key in zip(axes, ("nfe", "time_s")):
            x = mean_curve(runs, mode, seeds, key)
            ax.plot(x, gold, label=mode, linestyle="--" if "window" in mode else "-")
            ax.fill_between(x, lo, hi, alpha=0.15)
    for ax, label in zip(axes, ("DiT forward passes (rollouts and training)", "wall time, s (1 CPU thread)")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out gold score")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"GRPO credit on the toy world at one DiT budget, mean and min-max over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(cfg):
    print_config(cfg)
    modes, seeds = chosen_modes(cfg), [int(s) for s in cfg.seeds.split(",")]
    if not cfg.plot_only:
        run_all(cfg, modes, seeds)
    runs = load_runs(cfg, modes, seeds)
    table = summarise(runs, modes, seeds)
    print(table)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(runs, modes, seeds, os.path.join(cfg.out_dir, "grpo_credit.png"))
    print(f"wrote {cfg.out_dir}/results.md and {cfg.out_dir}/grpo_credit.png")


if __name__ == "__main__":
    run_main(main, Config)
