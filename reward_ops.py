"""The operations of train_reward.py, kept out of the method's way: the recipes' defaults, the flags
that go together, the learning-rate schedule, printed tables, checkpoints, logs and exports.

train_reward.py reads as the method (pairs, noised to one sigma, the Bradley-Terry step, accuracy by
sigma) and calls each of these once.
"""
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from checkpoints import atomic_write, check_writable, fingerprint, save_training_state, write_text
from common import (DeviceFlags, NonFiniteError, UserError, check_finite, check_weights, flag,
                    flag_values, unless_given, warmup_cosine)
from data.pairs import (CLOSE_GAP, Pairs, accuracy, gold_outcomes, load_split, pair_margins,
                        split_file)
from evaluation import policy_pairs


@dataclass
class EvalFlags:
    """train_reward.py's flags of its test evaluation (its Config holds them as one group)."""
    eval_every: int = flag(1000, "[1, inf)")
    eval_noise_draws: int = flag(2, "[1, inf)")  # noise draws per test pair and sigma, averaged
    # the noise levels test accuracy is measured at
    eval_sigmas: tuple = flag((0.0, 0.25, 0.5, 0.75, 0.9), "[0, 1]", of=float)
    # and the DRM repository's: its `time` t on the base's grid, sigma = bend(t / 1000), t = 0 clean
    # (scheduler.timesteps[-t]; SD3.5: t = 750 is sigma 0.9), e.g. 0,250,500,750,900
    eval_times: tuple = flag((), "[0, 1000)")
    eval_batch: int = flag(256, "[1, inf)")  # test pairs scored at a time
    # what --eval_only scores: prefs (the test pairs) | policy (the toy: pairs of the base's own
    # samples, and the DRM's ranking of SDE candidates by step: evaluation.py, rivals/scores.py)
    eval_set: str = flag("prefs", choices=("prefs", "policy"))


@dataclass
class HardwareFlags(DeviceFlags):
    """train_reward.py's flags of where and how its passes run (a group of its Config)."""
    grad_checkpointing: bool = False   # re-run each block in the backward: less memory

OFFICIAL_HEADS = ("2BConvGN", "7BConvGN")  # the DRM repository's (reward.CONV_HEADS)
# the DRM repository's recipe (drm/train.py, dataset.py, scripts/train_sd35_medium.sh): the values
# that differ from the toy's defaults. Its lr schedule is diffusers' get_scheduler("constant"),
# which takes no warm-up (its --lr_warmup_steps 500 is passed but unused): none here either.
RECIPES = {"toy": {}, "drm": dict(
    min_confidence=0.95, batch_size=16, lr=1e-5, head_lr=1e-5, weight_decay=1e-4, warmup=0,
    lr_schedule="constant", image_resize="stretch", vae_latents="sample", t5_tokens=512)}


def with_recipe(cfg):
    """cfg with --recipe's values in place of the defaults the command line left ("": drm on SD3,
    toy on the toy)."""
    recipe = cfg.recipe or ("toy" if cfg.pretrained.model == "toy" else "drm")
    return unless_given(cfg, **RECIPES[recipe], recipe=recipe)


def check_reward(cfg):
    """The flags that go together and the export's place, before any work."""
    if not cfg.evaluation.eval_sigmas:
        raise UserError("--eval_sigmas= is empty: give the noise levels to test at, e.g. 0,0.5")
    model = cfg.pretrained.model
    if cfg.evaluation.eval_set == "policy" and not (cfg.eval_only and model == "toy"):
        raise UserError("--eval_set=policy scores the toy's own samples with its annotator: use it "
                        "with --eval_only on --model=toy")
    if cfg.export_layout == "official" and model == "toy":
        raise UserError("--export_layout=official writes the DRM repository's model, with its "
                        "2BConvGN / 7BConvGN head on an SD3 base: give --model and --ckpt_dir")
    if cfg.export_layout == "official" and cfg.head not in ("", *OFFICIAL_HEADS):
        raise UserError("--export_layout=official: the DRM repository's model has the 2BConvGN / "
                        f"7BConvGN head, this one --head={cfg.head}")
    if cfg.export:
        check_writable(cfg.export, "--export=")


def learning_rate(cfg, step, peak):
    """The schedule: linear warm-up over --warmup steps, then cosine decay to peak / 10, or
    constant."""
    if cfg.lr_schedule == "cosine":
        return warmup_cosine(step, cfg.train_steps, cfg.warmup, peak)
    return peak * min(1, (step + 1) / (cfg.warmup + 1))


def print_accuracy(results, what, path, close_gap):
    """The accuracy table of evaluate's results."""
    columns = list(next(iter(results.values())))
    print(f"{what}: accuracy of {path} (close pairs: a gold gap under {close_gap})")
    print("| sigma | " + " | ".join(columns) + " |\n|---" + "|---" * len(columns) + "|")
    for sigma, result in results.items():
        print(f"| {sigma} | " + " | ".join(f"{result[c]:.1%}" for c in columns) + " |")


def write_evaluation(path, checkpoint, meta, cfg, results, ranking=None, per_pair=None):
    write_text(path, json.dumps({"checkpoint": checkpoint, "init": meta.get("init"),
                                 "step": meta.get("step"), "eval_set": cfg.evaluation.eval_set,
                                 "accuracy": results, "candidate_ranking": ranking,
                                 "per_pair": per_pair}, indent=1))


def drm_meta(cfg):
    """What a saved DRM records beside its weights: its init, and (SD3) the T5 length it reads."""
    return {"init": cfg.init,
            **({"t5_tokens": cfg.pairs.t5_tokens} if cfg.pretrained.model != "toy" else {})}


def save_run(cfg, run_dir, base, drm, optimizer, step, running=()):
    """The DRM (for train_policy.py and sample.py) and the train state (for --resume), with the
    (loss, accuracy, gradient norm) of each step since the last logged row: a resumed run logs the
    rows an uninterrupted one does."""
    check_weights(drm, step, run_dir.advice())
    if run_dir.main:
        base.save_drm(run_dir.file("model.safetensors"), drm, step, drm_meta(cfg))
        save_training_state(run_dir.file("train_state.pt"), {
            "drm": drm.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "running": list(running), "torch_rng": torch.get_rng_state(),
            "config": flag_values(cfg),
            "inputs": run_dir.fingerprints})
    run_dir.last_saved = step


def log_and_save(cfg, run_dir, base, drm, optimizer, results, gold, *, step, running, minutes):
    """Refuse to save a diverged DRM; save the DRM and train state; log one line."""
    figures = {f"{sigma} {key}": value for sigma, r in results.items() for key, value in r.items()}
    check_finite(figures, step, "test evaluation", run_dir.advice())
    check_weights(drm, step, run_dir.advice())
    record = {"step": step, "loss": sum(r[0] for r in running) / len(running),
              "train_label_accuracy": sum(r[1] for r in running) / len(running),
              "grad_norm": running[-1][2], "minutes": minutes, "test": results}
    run_dir.log(record)  # before the checkpoint (RunDir.log)
    if run_dir.main:
        key = "gold_accuracy" if gold else "label_accuracy"
        tqdm.write(f"step {step:5d} | loss {record['loss']:.4f} | test {key} by sigma "
                   + " ".join(f"{s}:{r[key]:.3f}" for s, r in results.items())
                   + f" | {minutes:.1f} min")
    save_run(cfg, run_dir, base, drm, optimizer, step)


def skipped_blocks(cfg, base, kept):
    """For an official export: the base DiT's blocks the DRM cut (blocks kept and on), on the
    CPU."""
    if cfg.export_layout != "official":
        return {}
    return {k: v.cpu() for k, v in base.dit.state_dict().items()
            if k.startswith("joint_blocks.") and int(k.split(".")[1]) >= kept}


def export(cfg, base, drm, skipped):
    """--export: ours (float16, with what the base keeps beside it) or the DRM repository's
    layout."""
    if cfg.export_layout == "official":
        from sd3.mmdit import official_drm_tensors
        tensors = official_drm_tensors(drm, skipped)
        atomic_write(cfg.export, lambda tmp: save_file(tensors, tmp))
    else:
        base.save_drm(cfg.export, drm, cfg.train_steps, drm_meta(cfg), dtype=torch.float16)
    print(f"exported the DRM ({cfg.export_layout} layout) to {cfg.export}")


def policy_split(base, text, device):
    """--eval_set=policy: Pairs of the base's own samples, each pair of 8 of a training prompt."""
    prompts = base.train_prompts("")
    winners, losers, pair_prompts, gold = policy_pairs(base, prompts)
    context, pooled = text.encode(prompts)
    rows = torch.tensor([prompts.index(p) for p in pair_prompts])
    return Pairs(winners.to(device), losers.to(device), rows, context.cpu(), pooled.cpu(), gold)


def evaluate_only(cfg, base, device, sigmas, scorer=None, ranking=None):
    """--eval_only: the test accuracy of --drm (default out_dir's) at (label, sigma) of `sigmas`, as
    a table and eval.json; with --eval_set=policy on the base's own samples. scorer(drm): the DRM
    as evaluated (default: itself); ranking(base, drm, text, prompts): a table of how the DRM ranks
    SDE candidates (rivals/scores.py's, passed in), printed and kept in eval.json."""
    path = cfg.drm or os.path.join(cfg.out_dir, "model.safetensors")
    drm, text, meta = base.load_drm(path, device)
    drm = scorer(drm) if scorer else drm
    evaluation = cfg.evaluation
    policy = evaluation.eval_set == "policy"
    pairs = policy_split(base, text, device) if policy else load_split(cfg, "test", base, text,
                                                                       device)
    margins = pair_margins(drm, pairs, sigmas, evaluation.eval_noise_draws,
                           batch=evaluation.eval_batch)
    diverged = [label for label, margin in margins.items() if not torch.isfinite(margin).all()]
    if diverged:
        raise NonFiniteError(f"--drm={path} scores NaN or inf at sigma {', '.join(diverged)}: its "
                             "weights are damaged or diverged; nothing was written")
    results = {label: accuracy(margin, pairs.gold) for label, margin in margins.items()}
    what = "the base's own samples, pairs within a prompt" if policy else "test"
    print_accuracy(results, what, path, CLOSE_GAP)
    table = ranking(base, drm, text, base.train_prompts("")[::2]) if policy and ranking else None
    # pair by pair, for a paired comparison of two DRMs (bench/drm_table.py), with what the pairs
    # and their noise were: two evaluations compare only when these are the same
    measured = {"pairs": "the base's own" if policy else fingerprint(split_file(cfg.prefs, "test")),
                "base": ({flag: fingerprint(path) for flag, path in cfg.pretrained.inputs().items()
                          if path} if policy else None),
                "noise_draws": evaluation.eval_noise_draws, "batch": evaluation.eval_batch,
                "sigmas": [sigma for _, sigma in sigmas]}
    per_pair = {"prompt": pairs.prompt.tolist(), "measured": measured,
                "gold": {label: gold_outcomes(margin, pairs.gold)
                         for label, margin in margins.items()}} if pairs.gold is not None else None
    write_evaluation(os.path.join(cfg.out_dir, "eval.json"), path, meta, cfg, results, table,
                     per_pair)
    return results
