"""The DRM table: DRMs evaluated on the same test pairs (`train_reward.py --eval_only`, which keeps
each pair's outcome in OUT_DIR/eval.json), their accuracy against gold at each sigma, and each
one's difference from the first, pair by pair.

    python train_reward.py --eval_only --out_dir=out/drm_bt           # and each other DRM
    python -m bench.drm_table --evals=out/drm_bt,out/drm_thurstone,out/drm_dina

The pairs and their noise are the same for every DRM (`data.pairs.pair_margins` is seeded), so a
difference is paired: a pair's outcome (1 the DRM orders it as gold does, 0 not) under one DRM
minus under the other, over the pairs gold does not tie. The pairs of one prompt are not
independent (they share its images), so the standard error is clustered by prompt and the 95%
interval taken at prompts - 1 degrees of freedom; "beats" or "loses" only when it excludes 0
(bench/stats.py), else "tie".
"""
import json
import os
from dataclasses import dataclass

import torch

from bench.stats import clustered, interval, verdict
from common import UserError, check_flags, flag, read_text, run_main


@dataclass
class Config:
    # comma-separated run folders (or eval.json files); the first is the one the others are
    # compared with
    evals: tuple = flag((), of=str)


def read_evaluation(path):
    """A run folder's (or the file's) eval.json -> its contents, refused in one line when it
    keeps no pair-by-pair outcomes."""
    file = os.path.join(path, "eval.json") if os.path.isdir(path) else path
    try:
        evaluation = json.loads(read_text(file, "--evals="))
    except json.JSONDecodeError as e:
        raise UserError(f"--evals: {file} is not JSON ({e.msg}, line {e.lineno}); evaluate again "
                        "with train_reward.py --eval_only") from None
    if not isinstance(evaluation, dict) or not evaluation.get("per_pair"):
        raise UserError(f"--evals: {file} keeps no pair-by-pair outcomes (written by an earlier "
                        "version, or pairs without gold); evaluate again with train_reward.py "
                        "--eval_only")
    return evaluation


def outcomes(evaluation, label):
    """-> (each pair's outcome (N,) float64, with NaN where gold ties the pair; prompts (N,))."""
    text = evaluation["per_pair"]["gold"][label]
    values = torch.tensor([float("nan") if c == "-" else float(c) for c in text],
                          dtype=torch.float64)
    return values, torch.tensor(evaluation["per_pair"]["prompt"])


def check_comparable(reference, other, name):
    """Refuse, in one line, two evaluations of other pairs or other noise: a paired difference
    needs the same pairs, noised alike (the same test file or base, draws, batch and sigmas)."""
    same = (reference["per_pair"].get("measured") == other["per_pair"].get("measured")
            and reference["per_pair"]["prompt"] == other["per_pair"]["prompt"]
            and all(["-" == c for c in reference["per_pair"]["gold"][label]]
                    == ["-" == c for c in other["per_pair"]["gold"][label]]
                    for label in reference["per_pair"]["gold"]))
    if not same:
        raise UserError(f"--evals: {name} was evaluated on other pairs or with other noise than "
                        "the first (its test file, --eval_set, --eval_noise_draws, --eval_batch "
                        "or --eval_sigmas differ); evaluate every DRM alike")


def compare(reference, other, label):
    """other's accuracy minus reference's at `label`, pair by pair -> (mean, clustered s.e., df),
    over the pairs gold orders (the same pairs for both: check_comparable)."""
    a, prompts = outcomes(reference, label)
    b, _ = outcomes(other, label)
    kept = ~a.isnan()
    clusters = torch.unique(prompts[kept], return_inverse=True)[1]
    if len(torch.unique(clusters)) < 2:
        raise UserError("--evals: the pairs gold orders come from fewer than 2 prompts: a standard "
                        "error clustered by prompt needs at least 2")
    mean, se = clustered(b[kept] - a[kept], clusters)
    return mean, se, len(torch.unique(clusters)) - 1


def table(cfg):
    """The two tables, as markdown."""
    evaluations = [read_evaluation(path) for path in cfg.evals]
    labels = list(evaluations[0]["per_pair"]["gold"])
    # a folder's name, or the folder of its eval.json
    names = [os.path.basename(os.path.normpath(path if os.path.isdir(path) else
                                               os.path.dirname(os.path.abspath(path))))
             for path in cfg.evals]
    for name, evaluation in zip(names[1:], evaluations[1:]):
        check_comparable(evaluations[0], evaluation, name)
    lines = ["| DRM (accuracy vs gold) | " + " | ".join(f"sigma {label}" for label in labels)
             + f" | sigma {labels[0]}, close pairs |", "|---" * (len(labels) + 2) + "|"]
    for name, evaluation in zip(names, evaluations):
        accuracy = evaluation["accuracy"]
        lines.append(f"| {name} | " + " | ".join(f"{accuracy[label]['gold_accuracy']:.1%}"
                                                 for label in labels)
                     + f" | {accuracy[labels[0]]['gold_accuracy_close_pairs']:.1%} |")
    lines += ["", f"Minus {names[0]}, pair by pair (s.e. clustered by prompt):", "",
              "| DRM | sigma | difference ± s.e. | 95% interval | df | verdict |",
              "|---|---|---|---|---|---|"]
    for name, evaluation in zip(names[1:], evaluations[1:]):
        for label in labels:
            mean, se, df = compare(evaluations[0], evaluation, label)
            low, high = interval(mean, se, df)
            lines.append(f"| {name} | {label} | {mean:+.2%} ± {se:.2%} | [{low:+.2%}, "
                         f"{high:+.2%}] | {df} | {verdict(mean, se, df)} |")
    return "\n".join(lines)


def main(cfg):
    check_flags(cfg)
    if len(cfg.evals) < 2:
        raise UserError("--evals: name at least two evaluated DRMs, e.g. "
                        "--evals=out/drm_bt,out/drm_thurstone")
    text = table(cfg)
    print(text)
    return text


if __name__ == "__main__":
    run_main(main, Config)
