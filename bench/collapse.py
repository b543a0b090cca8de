"""What makes a step-wise run collapse (docs/results.md, item 4): a test of one cause.

A run trains on its SDE rollouts (10 steps, a = 0.7: the samples the DRM scores and the advantages
come from) and is evaluated on ODE samples (20 steps). Two causes predict different things of its
final policy:
- it fits the sampler it trained on: its SDE samples keep their gold while its ODE samples lose it;
- it exploits the DRM: its SDE samples lose gold too, while the DRM's score of them rises.
So each finished run of the collapse experiment (bench/grpo_credit.py --experiment=collapse), and
the base it started from, is sampled three ways from the same initial noises (the held-out prompts x
--per_prompt noises): the evaluation's ODE (20 steps), the ODE on the training grid (10 steps), and
the rollouts' SDE (10 steps, the run's noise level; its own noise seed). Each sample is scored by
the annotator (gold) and by the DRM the run trained against, at sigma 0.

    python -m bench.collapse                      # every finished run of out/collapse
    python -m bench.collapse --seeds=0 --modes=stepwise

Per run: each sampler's mean gold and DRM score, and the SDE - ODE gold difference image by image
(the same noise), its s.e. clustered by prompt, its 95% interval at prompts - 1 df. Per mode: the
mean of the runs' differences over seeds, its interval at seeds - 1 df (bench/stats.py). Each
run's scores are cached in its folder (samplers_N.json, N = --per_prompt). Writes
OUT_DIR/collapse_cause.md.
"""
import json
import os
from dataclasses import dataclass

import torch

from base import ModelFlags, load_base
from bench.grpo_credit import EXPERIMENTS, MODES, folder, read_metrics, run_dir
from bench.stats import clustered, interval, mean_se, verdict
from checkpoints import check_writable, load_training_state, write_text
from common import check_flags, flag, print_config, read_text, run_main
from sde import Draws, Sampler, drm_on, initial_noise, propose, sigma_schedule

NOISE_SEED, SDE_SEED = 5678, 8765  # the initial noises (bench.grpo_credit's re-score), the SDE's
SAMPLERS = ("ODE, 20 steps", "ODE, 10 steps", "SDE, 10 steps")


@dataclass
class Config:
    out_dir: str = "out/collapse"      # the collapse experiment's runs
    modes: tuple = flag((), choices=[folder(name) for name in MODES], of=str)  # "": all six
    seeds: tuple = flag((0, 1, 2), "[0, inf)")
    lr: float = flag(1e-4, "(0, inf)")  # the runs' lr (the experiment ran step-wise's tuned one)
    updates: int = flag(120, "[1, inf)")  # the runs' budget of updates (their folders' names)
    per_prompt: int = flag(32, "[2, inf)")  # noises per held-out prompt
    batch: int = flag(160, "[1, inf)")  # images sampled at once


def sample_and_score(policy, base, reward, prompts, saved, batch):
    """The prompts' samples three ways from the same initial noises (the evaluation's ODE, the ODE
    on the rollouts' grid, the rollouts' SDE) -> {sampler: {"gold": (N,), "drm": the DRM at sigma
    0 of the finished samples (N,), "drm_by_step": (steps, N), the DRM of the state after step i at
    its sigma, sigma_{i+1}: what a rollout's step i is credited with, "outside": the share of each
    sample's pixels beyond [-1, 1] (N,)}}. A finished sample is what the evaluation and the
    annotator see, base.finish-ed (the toy: clamped to [-1, 1]); the states a rollout scores are
    not, the last one included (sigma 0). reward(x, sigma, images): the DRM on the prompts
    (sde.drm_on)."""
    noise = initial_noise(policy, len(prompts), torch.Generator().manual_seed(NOISE_SEED),
                          base.latent_size)
    grids = {"ODE, 20 steps": (saved["eval_steps"], saved["eval_cfg_scale"], 0.0),
             "ODE, 10 steps": (saved["steps"], saved["cfg_scale"], 0.0),
             "SDE, 10 steps": (saved["steps"], saved["cfg_scale"], saved["noise_level"])}
    out = {}
    for name, (steps, cfg_scale, noise_level) in grids.items():
        draws = Draws(torch.Generator().manual_seed(SDE_SEED))
        finished, by_step, outside = [], [], []
        for i in range(0, len(prompts), batch):
            rows = torch.arange(i, min(i + batch, len(prompts)))
            cond, uncond = base.encode(prompts[i:i + batch])
            sampler = Sampler(policy, sigma_schedule(steps, saved["shift"]), cond, uncond,
                              cfg_scale)
            x, scores = noise[rows], []
            for step in range(steps):
                x = propose(sampler, x, step, noise_level=noise_level, draws=draws).candidates[:, 0]
                sigma = sampler.sigmas[step + 1].expand(len(x))
                scores.append(reward(x, sigma, rows).float())
            outside.append((x.abs() > 1).flatten(1).float().mean(1))
            finished.append(base.finish(x))
            by_step.append(torch.stack(scores))
        x = torch.cat(finished)
        out[name] = {"gold": base.judge(base.to_images(x), prompts)["gold"].float(),
                     "outside": torch.cat(outside),
                     "drm": reward(x, torch.zeros(len(x)), torch.arange(len(x))).float(),
                     "drm_by_step": torch.cat(by_step, 1)}
    return out


@torch.no_grad()
def score_run(cfg, path):
    """A run's base and final policy, each sampled three ways (sample_and_score) -> {"base" /
    "policy": {sampler: {key: per-image lists}}, "step": the policy's update}, cached in the run
    folder."""
    state = load_training_state(os.path.join(path, "train_state.pt"), "cpu")
    saved = state["config"]
    cache = os.path.join(path, f"samplers_{cfg.per_prompt}.json")
    if os.path.exists(cache):
        cached = json.loads(read_text(cache, "a sampler comparison"))
        if cached["step"] == state["step"]:
            return cached
    scores = {"step": state["step"]}
    final = os.path.join(path, "model.safetensors")
    for who, weights in (("base", saved["base"]), ("policy", final)):
        base = load_base(ModelFlags(base=weights), "cpu")
        prompts = [p for p in base.heldout_prompts(saved["eval_prompts"], [])
                   for _ in range(cfg.per_prompt)]
        drm, drm_text, _ = base.load_drm(saved["drm"], "cpu")
        reward = drm_on(drm.eval(), drm_text.encode(prompts))
        samples = sample_and_score(base.dit.eval(), base, reward, prompts, saved, cfg.batch)
        scores[who] = {name: {key: value.tolist() for key, value in figures.items()}
                       for name, figures in samples.items()}
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
    """Gold and the DRM (sigma 0) of each sampler, and SDE - ODE (20 steps) gold."""
    means = [sum(figures[s][key]) / len(figures[s][key]) for key in ("gold", "drm")
             for s in SAMPLERS]
    gap = paired(figures["SDE, 10 steps"]["gold"], figures["ODE, 20 steps"]["gold"], per_prompt)
    return (f"| {label} | " + " | ".join(f"{m:+.3f}" for m in means)
            + f" | {cell(*gap, words=('SDE above', 'SDE below'))} |")


def rise_row(label, scores, per_prompt):
    """The final policy minus the base on the rollouts' SDE: the DRM of the state after each step
    at its sigma, the DRM of the finished (clamped) sample, its share of pixels beyond [-1, 1], its
    gold."""
    policy, base = scores["policy"]["SDE, 10 steps"], scores["base"]["SDE, 10 steps"]
    rises = [paired(p, b, per_prompt)[:2] for p, b in zip(policy["drm_by_step"],
                                                          base["drm_by_step"])]
    rises += [paired(policy[key], base[key], per_prompt)[:2]
              for key in ("drm", "outside", "gold")]
    return f"| {label} | " + " | ".join(f"{m:+.2f} ± {se:.2f}" for m, se in rises) + " |"


def table(cfg):
    names = [n for n in EXPERIMENTS["collapse"][0] if not cfg.modes or folder(n) in cfg.modes]
    samplers = ["| policy | " + " | ".join(f"gold, {s}" for s in SAMPLERS) + " | "
                + " | ".join(f"DRM, {s}" for s in SAMPLERS)
                + " | gold, SDE - ODE 20 (s.e. by prompt, 95% interval) |",
                "|" + "---|" * (2 * len(SAMPLERS) + 2)]
    rises, gaps, missing = [], {}, []
    for name in names:
        for seed in cfg.seeds:
            path = run_dir(cfg, name, seed, cfg.lr)
            rows = os.path.join(path, "metrics.jsonl")
            if not (os.path.exists(rows) and read_metrics(rows)[-1]["step"] >= cfg.updates):
                missing.append(os.path.basename(path))
                continue
            scores = score_run(cfg, path)
            if not rises:  # every run starts from the same base
                samplers.append(sampler_row("base (update 0)", scores["base"], cfg.per_prompt))
                steps = len(scores["base"]["SDE, 10 steps"]["drm_by_step"])
                rises = ["| run | " + " | ".join(f"DRM after step {i + 1}" for i in range(steps))
                         + " (sigma 0) | DRM, the finished sample (clamped) | pixels beyond "
                         "[-1, 1] (share) | gold |", "|" + "---|" * (steps + 4)]
            label = f"{name}, seed {seed}, update {scores['step']}"
            samplers.append(sampler_row(label, scores["policy"], cfg.per_prompt))
            rises.append(rise_row(label, scores, cfg.per_prompt))
            gaps.setdefault(name, []).append(paired(scores["policy"]["SDE, 10 steps"]["gold"],
                                                    scores["policy"]["ODE, 20 steps"]["gold"],
                                                    cfg.per_prompt)[0])
    lines = ["Gold and the DRM's score (sigma 0) of each sampler's samples, held-out prompts x "
             f"{cfg.per_prompt} noises:", "", *samplers, "",
             "The final policy minus the base on the rollouts' SDE, image by image (mean ± s.e. "
             "clustered by prompt): the DRM's score of the state after each step at that step's "
             "sigma (what step-wise credit rewards; the last state is the sample before the "
             "clamp), of the finished sample (clamped to [-1, 1], as the evaluation scores it), "
             "the share of the sample's pixels beyond [-1, 1] before the clamp, and its gold:",
             "",
             *rises, "", "Per mode, the SDE - ODE (20 steps) gold difference over seeds:", "",
             "| mode | seeds | SDE - ODE 20, mean ± s.e. over seeds, 95% interval |", "|---|---|---|"]
    for name, values in gaps.items():
        mean, se = mean_se(values)
        lines.append(f"| {name} | {len(values)} | "
                     + (cell(mean, se, len(values) - 1, ("SDE above", "SDE below"))
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
