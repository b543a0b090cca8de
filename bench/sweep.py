"""Run a grid of flag settings over seeds; write one results table (mean and spread over seeds) and
a plot.

    python -m bench.sweep --grid="credit=stepwise,sparse" --seeds=0,1 \
        --args="--updates=10 --eval_every=5 --eval_per_prompt=4" # train_policy.py, metric gold
    python -m bench.sweep --script=train_reward.py --grid="head=conv,token;drop_last=1,3"
    --seeds=0,1,2 \
        --metric=test.0.5.gold_accuracy --args="--train_steps=300 --eval_every=100"

Every run is `python SCRIPT --out_dir=OUT/<setting>/seed<s> --seed=s --<flag>=<value> ... ARGS`, one
after the other; the metric is read from the run's metrics.jsonl (nested keys joined by dots:
train_reward's `test.0.5.gold_accuracy` is the test accuracy vs gold at sigma 0.5). A finished run
is not run again, so an interrupted sweep continues where it stopped. Writes OUT/results.md (the
table, also printed) and OUT/results.png (the metric against the step, the mean over seeds per
setting, each seed as dots).
"""
import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def parse_grid(text):
    """'credit=stepwise,sparse;k=2,4' -> [('credit', ['stepwise', 'sparse']), ('k', ['2', '4'])]."""
    grid = []
    for part in filter(None, text.split(";")):
        name, eq, values = part.partition("=")
        if not eq or not name.strip() or not values.strip():
            raise ValueError(f"--grid: {part!r} is not flag=value1,value2 (flags separated by ';')")
        grid.append((name.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    if not grid:
        raise ValueError("--grid is empty: give flag=value1,value2")
    return grid


def flatten(record, prefix=""):
    """{'test': {'0.5': {'gold_accuracy': x}}} -> {'test.0.5.gold_accuracy': x}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_curve(run_dir, metric):
    """[(step, value)] of the metric in the run's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the script must log its metrics there "
                                "(its --out_dir)")
    with open(path) as f:
        records = [flatten(json.loads(line)) for line in f if line.strip()]
    if not records or metric not in records[-1]:
        known = ", ".join(sorted(records[-1])) if records else "none"
        raise KeyError(f"{run_dir}/metrics.jsonl has no {metric!r}; its keys: {known} (choose one "
                       "with --metric)")
    return [(r.get("step", i), r[metric]) for i, r in enumerate(records) if metric in r]


def run(script, run_dir, flags, seed, extra):
    """One run, unless an earlier sweep finished it (its `done` file)."""
    done = os.path.join(run_dir, "done")
    if os.path.exists(done):
        return
    # a run an earlier sweep left unfinished: continue it from its checkpoint, or start it afresh
    again = (["--resume"] if os.path.exists(os.path.join(run_dir, "train_state.pt"))
             else ["--overwrite"] if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else [])
    command = [sys.executable, script, f"--out_dir={run_dir}", f"--seed={seed}",
               *(f"--{k}={v}" for k, v in flags), *extra, *again]
    print("$", shlex.join(command), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode:
        raise RuntimeError(f"the run in {run_dir} failed; its command is above")
    os.makedirs(run_dir, exist_ok=True)
    open(done, "w").close()


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(results, metric, seeds):
    """results {setting: [final value per seed]} -> markdown rows."""
    lines = [f"| setting | {metric}: mean ± std over {len(seeds)} seeds | per seed "
             f"({', '.join(map(str, seeds))}) |", "|---|---|---|"]
    for setting, values in results.items():
        lines.append(f"| {setting} | {statistics.mean(values):.4f} ± {spread(values):.4f} | "
                     + ", ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def plot(curves, metric, path, size=(720, 420), margin=60):
    """curves {setting: [[(step, value)] per seed]} -> a PNG: mean over seeds as lines, seeds as
    dots."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for runs in curves.values() for curve in runs for p in curve]
    (x_lo, x_hi), (y_lo, y_hi) = [(min(v), max(v)) for v in zip(*points)]
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)
    width, height = size[0] - 2 * margin, size[1] - 2 * margin

    def at(x, y):
        return (margin + (x - x_lo) / (x_hi - x_lo) * width,
                size[1] - margin - (y - y_lo) / (y_hi - y_lo) * height)

    draw.rectangle([margin, margin, size[0] - margin, size[1] - margin], outline="black")
    for frac in (0, 0.5, 1):
        y, x = y_lo + frac * (y_hi - y_lo), x_lo + frac * (x_hi - x_lo)
        draw.text((4, at(x_lo, y)[1] - 6), f"{y:.3f}", fill="black")
        draw.text((at(x, y_lo)[0] - 10, size[1] - margin + 6), f"{x:g}", fill="black")
    draw.text((margin, 20), f"{metric} against step (lines: mean over seeds; dots: seeds)",
              fill="black")
    for i, (setting, runs) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        steps = sorted(set.intersection(*(set(s for s, _ in curve) for curve in runs)))
        mean = [at(s, statistics.mean(dict(curve)[s] for curve in runs)) for s in steps]
        if len(mean) > 1:
            draw.line(mean, fill=colour, width=2)
        for curve in runs:
            for s, v in curve:
                x, y = at(s, v)
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((size[0] - margin - 220, margin + 8 + 14 * i), setting, fill=colour)
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--script", default="train_policy.py", help="the training script to sweep")
    parser.add_argument("--grid", required=True,
                        help="flag=v1,v2;flag2=v1,v2 (every combination is a setting)")
    parser.add_argument("--seeds", default="0,1",
                        help="comma-separated seeds, each setting runs once per seed")
    parser.add_argument("--metric", default="gold",
                        help="a key of the runs' metrics.jsonl (nested keys joined by dots)")
    parser.add_argument("--args", default="",
                        help="flags passed to every run, e.g. \"--updates=10 --eval_every=5\"")
    parser.add_argument("--out_dir", default="out/sweep")
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not all(s.strip().isdigit() for s in args.seeds.split(",")):
        sys.exit(f"error: --seeds={args.seeds}: whole numbers separated by commas, e.g. 0,1,2")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not os.path.exists(os.path.join(ROOT, args.script)):
        sys.exit(f"error: --script={args.script} is not a file in {ROOT}; e.g. train_policy.py or "
                 "train_reward.py")
    names = [name for name, _ in grid]
    curves = {}
    try:
        for values in itertools.product(*(v for _, v in grid)):
            flags = list(zip(names, values))
            setting = " ".join(f"{k}={v}" for k, v in flags)
            folder = os.path.join(os.path.abspath(args.out_dir),
                                  "_".join(f"{k}={v}" for k, v in flags))
            curves[setting] = []
            for seed in seeds:
                run_dir = os.path.join(folder, f"seed{seed}")
                run(args.script, run_dir, flags, seed, shlex.split(args.args))
                curves[setting].append(read_curve(run_dir, args.metric))
    except (RuntimeError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: {e.args[0]}")
    results = table({s: [curve[-1][1] for curve in runs] for s, runs in curves.items()},
                    args.metric, seeds)
    print(results)
    report = os.path.join(args.out_dir, "results.md")
    with open(report + ".tmp", "w") as f:  # then renamed: a kill or a full disk leaves the old one
        f.write("`python -m bench.sweep "
                f"{shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n{results}\n")
    os.replace(report + ".tmp", report)
    plot(curves, args.metric, os.path.join(args.out_dir, "results.png"))
    print(f"wrote {args.out_dir}/results.md and results.png")


if __name__ == "__main__":
    main()
