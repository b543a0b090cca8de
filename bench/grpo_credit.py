"""The paper's credit-assignment experiment: step-wise GRPO against sparse (Flow-GRPO) and cosine credit.

    python -m bench.grpo_credit                      # 3 credit modes x 3 seeds on the CPU toy, then the table and figure
    python -m bench.grpo_credit --plot_only          # redraw from out/credit/*/metrics.jsonl

Every run gets the same budget of DiT forward passes (--max_nfe; rollouts and
training passes counted, DRM passes apart) and the same number of them per
update, so "updates" and "NFE" are the same axis up to a constant. Runs go
`jobs` at a time, one CPU thread each, so wall times are comparable between
modes. Writes OUT_DIR/results.md (the table) and OUT_DIR/grpo_credit.png:
held-out gold score against updates, DiT passes and wall time, mean over seeds
with the spread (min-max) shaded. Needs matplotlib for the figure
(`pip install matplotlib`; it is not a dependency of the rest).
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from common import print_config, run_main

MODES = ("stepwise", "sparse", "cosine")


@dataclass
class Config:
    out_dir: str = "out/credit"
    seeds: str = "0,1,2"
    max_nfe: int = 38400               # DiT passes per run: 60 updates of 16 trajectories x 10 steps x 2 (guidance) x 2
    eval_every: int = 10
    jobs: int = 2                      # runs at a time, one thread each
    extra: str = ""                    # more train_policy.py flags for every run, space-separated
    plot_only: bool = False


def run_all(cfg, seeds):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue = [(mode, seed) for seed in seeds for mode in MODES]
    running = []
    while queue or running:
        while queue and len(running) < cfg.jobs:
            mode, seed = queue.pop(0)
            run_dir = os.path.join(cfg.out_dir, f"{mode}_seed{seed}")
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                print(f"{run_dir}: already there, skipped (delete it to rerun)")
                continue
            os.makedirs(run_dir, exist_ok=True)
            command = [sys.executable, "train_policy.py", f"--credit={mode}", f"--seed={seed}", f"--out_dir={run_dir}",
                       f"--max_nfe={cfg.max_nfe}", "--updates=100000", f"--eval_every={cfg.eval_every}",
                       *cfg.extra.split()]
            print(" ".join(command))
            running.append(subprocess.Popen(command, env=env, stdout=open(os.path.join(run_dir, "log.txt"), "w"),
                                            stderr=subprocess.STDOUT))
        running[0].wait()
        if running[0].returncode:
            raise RuntimeError(f"{' '.join(running[0].args)} failed; see its log.txt")
        running.pop(0)


def load_runs(cfg, seeds):
    runs = {}
    for mode in MODES:
        for seed in seeds:
            path = os.path.join(cfg.out_dir, f"{mode}_seed{seed}", "metrics.jsonl")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: run without --plot_only first")
            with open(path) as f:
                runs[mode, seed] = [json.loads(line) for line in f]
    return runs


def mean_curve(runs, mode, seeds, key):
    """Per eval point, the mean over seeds (runs are cut to the shortest)."""
    n = min(len(runs[mode, s]) for s in seeds)
    return [sum(runs[mode, s][i][key] for s in seeds) / len(seeds) for i in range(n)]


def first_reaching(curve, target):
    return next((i for i, value in enumerate(curve) if value >= target), None)


def summarise(runs, seeds):
    target = mean_curve(runs, "sparse", seeds, "gold")[-1]  # what sparse reaches at the end of its budget
    lines = [f"target: sparse's final held-out gold, mean of {len(seeds)} seeds = {target:.4f}", "",
             "| credit | gold start | gold end (mean, min-max over seeds) | DRM start -> end | updates to target | "
             "wall time to target (s) | DRM up while gold down |", "|---|---|---|---|---|---|---|"]
    reached = {}
    for mode in MODES:
        gold = mean_curve(runs, mode, seeds, "gold")
        drm = mean_curve(runs, mode, seeds, "drm")
        steps, times = mean_curve(runs, mode, seeds, "step"), mean_curve(runs, mode, seeds, "time_s")
        ends = [runs[mode, s][-1]["gold"] for s in seeds]
        hit = first_reaching(gold, target)
        reached[mode] = (steps[hit], times[hit]) if hit is not None else None
        hacked = [s for s in seeds if runs[mode, s][-1]["drm"] > runs[mode, s][0]["drm"]
                  and runs[mode, s][-1]["gold"] < runs[mode, s][0]["gold"]]
        lines.append(f"| {mode} | {gold[0]:.4f} | {gold[-1]:.4f} ({min(ends):.4f} to {max(ends):.4f}) | "
                     f"{drm[0]:.3f} -> {drm[-1]:.3f} | {f'{steps[hit]:.0f}' if hit is not None else 'not reached'} | "
                     f"{f'{times[hit]:.0f}' if hit is not None else '-'} | {'seeds ' + str(hacked) if hacked else 'no'} |")
    if reached["stepwise"] and reached["sparse"]:
        lines.append("")
        lines.append(f"stepwise reaches sparse's final gold in {reached['stepwise'][0] / reached['sparse'][0]:.2f}x "
                     f"the updates and {reached['stepwise'][1] / reached['sparse'][1]:.2f}x the wall time "
                     f"(paper: 1/2.5 = 0.40x and 1/3.5 = 0.29x)")
    return "\n".join(lines)


def plot(runs, seeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in MODES:
        gold = mean_curve(runs, mode, seeds, "gold")
        lo = [min(runs[mode, s][i]["gold"] for s in seeds) for i in range(len(gold))]
        hi = [max(runs[mode, s][i]["gold"] for s in seeds) for i in range(len(gold))]
        for ax, key in zip(axes, ("step", "nfe", "time_s")):
            x = mean_curve(runs, mode, seeds, key)
            ax.plot(x, gold, label=mode)
            ax.fill_between(x, lo, hi, alpha=0.2)
    for ax, label in zip(axes, ("updates", "DiT forward passes (NFE)", "wall time, s (1 CPU thread)")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out gold score")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"GRPO credit assignment on the toy world, mean and min-max over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(cfg):
    print_config(cfg)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    if not cfg.plot_only:
        run_all(cfg, seeds)
    runs = load_runs(cfg, seeds)
    table = summarise(runs, seeds)
    print(table)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(runs, seeds, os.path.join(cfg.out_dir, "grpo_credit.png"))
    print(f"wrote {cfg.out_dir}/results.md and {cfg.out_dir}/grpo_credit.png")


if __name__ == "__main__":
    run_main(main, Config)
