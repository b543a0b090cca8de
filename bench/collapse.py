"""What makes a step-wise run collapse (docs/results.md, "The collapse"): a test of its cause.

A run trains on its rollouts (10 steps, SDE steps inside its --sde_window, Euler steps outside:
the states the DRM scores and the advantages come from) and is evaluated on ODE samples (20 steps).
Two causes predict different things of its final policy:
- it fits the sampler it trained on: its rollout samples keep their gold while its ODE samples
  lose it;
- it climbs the DRM where the DRM is wrong: its rollout samples lose gold too, while the DRM's
  score of the states it was credited for rises.
So each finished run of the collapse experiment (bench/grpo_credit.py --experiment=collapse), and
the base it started from, is sampled three ways from the same initial noises (the held-out prompts
x --per_prompt noises): the evaluation's ODE (20 steps), the ODE on the rollouts' grid (10 steps),
and the run's own rollout sampler (its window, its noise level; the SDE's draws seeded alike for
every policy). The annotator scores each finished sample (gold), and the DRM the run trained
against scores the state after every step at its sigma, as the rollout's DRM reads it, and the
same state clamped to [-1, 1], as the evaluation reads a finished sample (base.finish).

    python -m bench.collapse                      # every finished run of out/collapse
    python -m bench.collapse --seeds=0 --modes=stepwise

Per run: each sampler's mean gold and DRM score, and the rollout - ODE gold difference image by
image (the same noise), its s.e. clustered by prompt, its 95% interval at prompts - 1 df; the final
policy minus the base, image by image, on the rollout sampler. Per mode: the runs' rollout - ODE
differences over seeds, their interval at seeds - 1 df (bench/stats.py). Each run's scores are
cached in its folder (samplers_N.json, N = --per_prompt). Writes OUT_DIR/collapse_cause.md.
"""
import json
import os
from dataclasses import dataclass

import torch

from base import ModelFlags, load_base
from bench.grpo_credit import EXPERIMENTS, MODES, finished, folder, run_dir
from bench.stats import clustered, interval, mean_se, verdict
from checkpoints import check_writable, load_training_state, write_text
from common import UserError, check_flags, flag, print_config, read_text, run_main
from grpo import in_window, trained_steps
from rivals.credit import parse_window
from sde import Draws, Sampler, drm_on, initial_noise, propose, sigma_schedule

NOISE_SEED, SDE_SEED = 5678, 8765  # the initial noises (bench.grpo_credit's re-score), the SDE's
SAMPLERS = ("ODE, 20 steps", "ODE, 10 steps", "rollout")


@dataclass
class Config:
    out_dir: str = "out/collapse"      # the collapse experiment's runs
    modes: tuple = flag((), choices=[folder(name) for name in MODES], of=str)  # "": all six
    seeds: tuple = flag((0, 1, 2), "[0, inf)")
    lr: float = flag(1e-4, "(0, inf)")  # the runs' lr (the experiment ran step-wise's tuned one)
    updates: int = flag(120, "[1, inf)")  # the runs' budget of updates (their folders' names)
    per_prompt: int = flag(32, "[2, inf)")  # noises per held-out prompt


def rollout_steps(saved):
    """A run's rollout sampler from its saved flags -> (each step's noise level: the run's inside
    its SDE window, 0 outside (grpo.in_window); the steps its loss credits (grpo.trained_steps))."""
    steps, window = saved["steps"], parse_window(saved["sde_window"], saved["steps"])
    if window[0] not in ("all", "fixed"):
        raise UserError(f"--sde_window={saved['sde_window']}: a window that moves each update has "
                        "no one rollout sampler to test; the collapse's windows are fixed (a:b)")
    window = window[1:] if window[0] == "fixed" else None
    levels = [saved["noise_level"] if sde else 0.0 for sde in in_window(steps, window)]
    return levels, trained_steps(steps, window, saved["train_last_step"])


def sample_and_score(policy, base, reward, prompts, saved):
    """The prompts' samples three ways from the same initial noises, all in one batch (the SDE's
    draws then do not depend on a batch size) -> {sampler: {"gold": (N,), "drm": the DRM of the
    finished (clamped) sample at sigma 0 (N,), "drm_by_step", "drm_by_step_clamped": (steps, N),
    the DRM of the state after step i at its sigma, sigma_{i+1}, as it is (what a rollout's step i
    is credited with) and clamped to [-1, 1], "outside": the share of the last state's pixels
    beyond [-1, 1], "excess": their mean distance beyond it, over all pixels (N,)}}. reward(x,
    sigma, images): the DRM on the prompts (sde.drm_on)."""
    noise = initial_noise(policy, len(prompts), torch.Generator().manual_seed(NOISE_SEED),
                          base.latent_size)
    cond, uncond = base.encode(prompts)
    rows = torch.arange(len(prompts))
    grids = {"ODE, 20 steps": (saved["eval_cfg_scale"], [0.0] * saved["eval_steps"]),
             "ODE, 10 steps": (saved["cfg_scale"], [0.0] * saved["steps"]),
             "rollout": (saved["cfg_scale"], rollout_steps(saved)[0])}
    out = {}
    for name, (cfg_scale, levels) in grids.items():
        sampler = Sampler(policy, sigma_schedule(len(levels), saved["shift"]), cond, uncond,
                          cfg_scale)
        draws, x, figures = Draws(torch.Generator().manual_seed(SDE_SEED)), noise, {}
        for i, noise_level in enumerate(levels):
            x = propose(sampler, x, i, noise_level=noise_level, draws=draws).candidates[:, 0]
            sigma = sampler.sigmas[i + 1].expand(len(x))
            for key, state in (("drm_by_step", x), ("drm_by_step_clamped", x.clamp(-1, 1))):
                figures.setdefault(key, []).append(reward(state, sigma, rows).float())
        sample = base.finish(x)
        out[name] = {"gold": base.judge(base.to_images(sample), prompts)["gold"].float(),
                     "drm": reward(sample, torch.zeros(len(x)), rows).float(),
                     "drm_by_step": torch.stack(figures["drm_by_step"]),
                     "drm_by_step_clamped": torch.stack(figures["drm_by_step_clamped"]),
                     "outside": (x.abs() > 1).flatten(1).float().mean(1),
                     "excess": (x.abs() - 1).clamp(min=0).flatten(1).mean(1)}
    return out


# what a base's samples depend on (sample_and_score): runs that agree on these share them
SAMPLED_WITH = ("base", "drm", "eval_prompts", "eval_cfg_scale", "eval_steps", "cfg_scale",
                "steps", "shift", "noise_level", "sde_window")


@torch.no_grad()
def score_run(cfg, path, bases=None):
    """A run's base and final policy, each sampled three ways (sample_and_score) -> {"base" /
    "policy": {sampler: {key: per-image lists}}, "step": the policy's update}, cached in the run
    folder. bases: {settings: the base's scores}, filled (from a cache too) and read across runs
    (the seeds of a mode, and a window with KL and without, sample the base alike)."""
    state = load_training_state(os.path.join(path, "train_state.pt"), "cpu")
    saved = state["config"]
    bases = {} if bases is None else bases
    settings = json.dumps([saved[key] for key in SAMPLED_WITH])
    cache = os.path.join(path, f"samplers_{cfg.per_prompt}.json")
    if os.path.exists(cache):
        cached = json.loads(read_text(cache, "a sampler comparison"))
        if cached["step"] == state["step"]:
            bases.setdefault(settings, cached["base"])
            return cached
    scores = {"step": state["step"], "credited": rollout_steps(saved)[1]}
    if settings in bases:
        scores["base"] = bases[settings]
    final = os.path.join(path, "model.safetensors")
    for who, weights in (("base", saved["base"]), ("policy", final)):
        if who in scores:
            continue
        base = load_base(ModelFlags(base=weights), "cpu")
        prompts = [p for p in base.heldout_prompts(saved["eval_prompts"], [])
                   for _ in range(cfg.per_prompt)]
        drm, drm_text, _ = base.load_drm(saved["drm"], "cpu")
        reward = drm_on(drm.eval(), drm_text.encode(prompts))
        samples = sample_and_score(base.dit.eval(), base, reward, prompts, saved)
        scores[who] = {name: {key: value.tolist() for key, value in figures.items()}
                       for name, figures in samples.items()}
    bases[settings] = scores["base"]
    write_text(cache, json.dumps(scores))
    return scores


def paired(after, before, per_prompt):
    """after - before, image by image (the same noises) -> (mean, s.e. clustered by prompt, df)."""
    clusters = torch.arange(len(after)) // per_prompt
    mean, se = clustered(torch.tensor(after) - torch.tensor(before), clusters)
    return mean, se, int(clusters.max())


def cell(mean, se, df, words=("above", "below")):
    low, high = interval(mean, se, df)
    said = {"beats": words[0], "loses": words[1], "tie": "tie"}[verdict(mean, se, df)]
    return f"{mean:+.3f} ± {se:.3f} [{low:+.3f}, {high:+.3f}], {df} df: {said}"


def sampler_row(label, figures, per_prompt):
    """Gold and the DRM (sigma 0) of each sampler, and rollout - ODE (20 steps) gold."""
    means = [sum(figures[s][key]) / len(figures[s][key]) for key in ("gold", "drm")
             for s in SAMPLERS]
    gap = paired(figures["rollout"]["gold"], figures["ODE, 20 steps"]["gold"], per_prompt)
    return (f"| {label} | " + " | ".join(f"{m:+.3f}" for m in means)
            + f" | {cell(*gap, words=('rollout above', 'rollout below'))} |")


def rise_row(label, scores, per_prompt):
    """The final policy minus the base on the rollout sampler, each with its 95% interval: the DRM
    of the state after each step at its sigma (bold: the steps the loss credits), the last state
    before sigma 0 clamped, the finished sample (clamped, sigma 0), its pixels beyond [-1, 1] (the
    share, the mean excess), its gold."""
    policy, base = scores["policy"]["rollout"], scores["base"]["rollout"]
    pairs = [*zip(policy["drm_by_step"], base["drm_by_step"]),
             (policy["drm_by_step_clamped"][-2], base["drm_by_step_clamped"][-2]),
             *((policy[key], base[key]) for key in ("drm", "outside", "excess", "gold"))]
    cells = []
    for i, (after, before) in enumerate(pairs):
        mean, se, df = paired(after, before, per_prompt)
        low, high = interval(mean, se, df)
        text = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
        cells.append(f"**{text}**" if i < len(scores["credited"]) and scores["credited"][i]
                     else text)
    return f"| {label} | " + " | ".join(cells) + " |"


def table(cfg):
    names = [n for n in EXPERIMENTS["collapse"][0] if not cfg.modes or folder(n) in cfg.modes]
    samplers = ["| policy | " + " | ".join(f"gold, {s}" for s in SAMPLERS) + " | "
                + " | ".join(f"DRM, {s}" for s in SAMPLERS)
                + " | gold, rollout - ODE 20 (s.e. by prompt, 95% interval) |",
                "|" + "---|" * (2 * len(SAMPLERS) + 2)]
    rises, gaps, missing, bases = [], {}, [], {}
    for name in names:
        for seed in cfg.seeds:
            path = run_dir(cfg, name, seed, cfg.lr)
            if not finished(cfg, path):  # its budget of --updates spent (bench.grpo_credit's)
                missing.append(os.path.basename(path))
                continue
            scores = score_run(cfg, path, bases)
            if not rises:  # every run starts from the same base
                samplers.append(sampler_row("base (update 0)", scores["base"], cfg.per_prompt))
                steps = len(scores["base"]["rollout"]["drm_by_step"])
                rises = ["| run | " + " | ".join(f"DRM after step {i + 1}" for i in range(steps))
                         + f" | DRM after step {steps - 1}, clamped | DRM of the sample, clamped "
                         "| pixels beyond [-1, 1], share | their mean excess | gold |",
                         "|" + "---|" * (steps + 6)]
            label = f"{name}, seed {seed}, update {scores['step']}"
            samplers.append(sampler_row(label, scores["policy"], cfg.per_prompt))
            rises.append(rise_row(label, scores, cfg.per_prompt))
            gaps.setdefault(name, []).append(paired(scores["policy"]["rollout"]["gold"],
                                                    scores["policy"]["ODE, 20 steps"]["gold"],
                                                    cfg.per_prompt)[0])
    lines = ["Gold and the DRM's score (of the finished sample, clamped, at sigma 0) of each "
             f"sampler's samples, held-out prompts x {cfg.per_prompt} noises:", "", *samplers, "",
             "The final policy minus the base on the rollout sampler, image by image (mean and "
             "95% interval, s.e. clustered by prompt): the DRM's score of the state after each "
             "step at that step's sigma, as the rollout reads it (bold: the steps the loss "
             "credits), of the last state before sigma 0 clamped to [-1, 1], and of the finished "
             "sample clamped, as the evaluation reads it; the share of the sample's pixels beyond "
             "[-1, 1] before the clamp and their mean excess over all pixels; gold:", "", *rises,
             "", "Per mode, the rollout - ODE (20 steps) gold difference over seeds:", "",
             "| mode | seeds | rollout - ODE 20, mean ± s.e. over seeds, 95% interval |",
             "|---|---|---|"]
    for name, values in gaps.items():
        mean, se = mean_se(values)
        lines.append(f"| {name} | {len(values)} | "
                     + (cell(mean, se, len(values) - 1, ("rollout above", "rollout below"))
                        if len(values) > 1 else f"{mean:+.3f} (one seed)") + " |")
    if missing:
        lines += ["", f"not finished yet (left out): {', '.join(missing)}"]
    return "\n".join(lines)


def main(cfg):
    check_flags(cfg)
    check_writable(os.path.join(cfg.out_dir, "collapse_cause.md"), "--out_dir=")
    print_config(cfg)
    report = table(cfg)
    print(report)
    write_text(os.path.join(cfg.out_dir, "collapse_cause.md"), report + "\n")
    return report


if __name__ == "__main__":
    run_main(main, Config)
