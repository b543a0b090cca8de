"""Preference pairs for the DRM: samples of the shipped base model, labelled by the simulated
annotator.

    python -m data.preferences                # writes out/prefs/ (9 minutes on 2 CPU cores)
    python -m data.preferences --overwrite    # afresh into a used --out_dir (else refused)

What it makes, per prompt: images from the base model at a grid of guidance
scales and step counts (so quality varies, as it does between the models that
fed HPDv3), then random pairs of them, each labelled by the annotator's
Bradley-Terry draw (data/judge.py). Prompts are the full captions
"a <thickness> <digit> <slant>" of the training combinations; the ten held-out
prompts of data/world.py are left out altogether (they are the policy's test
prompts), and the rest are split by prompt into train and test.

Format, close to HPDv3's (prompt, path1 (winner), path2, confidence, and in HPDv3 also
choice_dist, model1, model2), one JSON object a line in `train.jsonl` and `test.jsonl`:

    {"prompt": "a thick 7 slanted right", "path1": "images/00042.png", "path2": "images/00107.png",
     "confidence": 0.81, "gold": [-0.93, -1.42]}

path1 is the image the annotator preferred; paths are relative to the file's
folder; confidence is the annotator's probability of that choice (below 0.5
when the noisy draw went against the gold ordering); gold holds the two
noise-free gold scores, read only by evaluation (train_reward.py --eval_only),
never by training.
"""
import json
import os
import random
from dataclasses import dataclass

import torch
from PIL import Image

from checkpoints import RunDir, write_text
from common import UserError, check_flags, flag, run_main
from data.judge import Judge
from data.toy import ToyBase
from data.world import TRAIN_PROMPTS, read_images
from evaluation import generate
from images import save_grid, save_image


@dataclass
class Config:
    out_dir: str = "out/prefs"
    base: str = "data/base.safetensors"   # the toy base model whose samples are paired
    # guidance scales of the image pool
    cfg_scales: tuple = flag((1.0, 1.5, 2.0, 3.0, 4.0, 6.0), "[0, inf)", of=float)
    # Euler step counts of the image pool (1-2 steps give blurred digits)
    step_counts: tuple = flag((1, 2, 4, 8, 20), "[1, inf)")
    seeds_per_setting: int = flag(6, "[1, inf)")  # images per (prompt, guidance, steps)
    pairs_per_prompt: int = flag(400, "[1, inf)")
    test_prompts: int = flag(16, "[1, 79]")  # prompts held out for the test pairs
    # Bradley-Terry temperature of the annotator's labels
    temperature: float = flag(0.15, "(0, inf)")
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    overwrite: bool = False               # start afresh in a used out_dir (its files removed)


OUTPUTS = ("images", "train.jsonl", "test.jsonl", "example_pool.png")  # what a run writes


# -----------------------------------------------------------------------------
# Reading (used by train_reward.py): every problem names the file and line


def gold_scores(pairs):
    """(N, 2) gold scores of path1 and path2 when every pair has them (the toy's), else None."""
    return torch.tensor([p["gold"] for p in pairs]) if all(p["gold"] is not None
                                                           for p in pairs) else None

# -----------------------------------------------------------------------------
# Making the data set


def main(cfg):
    check_flags(cfg)
    for name in ("cfg_scales", "step_counts"):
        values = getattr(cfg, name)
        if not values or len(set(values)) < len(values):
            raise UserError(f"--{name}={','.join(map(str, values))}: give one or more values, "
                            "none twice")
    if len(cfg.cfg_scales) * len(cfg.step_counts) * cfg.seeds_per_setting < 2:
        raise UserError("one image a prompt makes no pair: give --seeds_per_setting >= 2, or more "
                        "--cfg_scales or --step_counts")
    cfg_scales, step_counts = cfg.cfg_scales, cfg.step_counts
    # --out_dir held by this run alone; an earlier run's files are refused, or removed (--overwrite)
    with RunDir(cfg.out_dir, overwrite=cfg.overwrite, outputs=OUTPUTS, resumable=False,
                inputs={"--base=": cfg.base}):
        write_preferences(cfg, cfg_scales, step_counts)


def write_preferences(cfg, cfg_scales, step_counts):
    """The image pool (the base at each guidance scale and step count), the pairs of each split
    and an example grid, into cfg.out_dir."""
    base = ToyBase.load(cfg.base, "cpu")
    judge = Judge(temperature=cfg.temperature)
    prompts = list(TRAIN_PROMPTS)
    rng = random.Random(cfg.seed)
    rng.shuffle(prompts)
    split = {"test": sorted(prompts[:cfg.test_prompts]),
             "train": sorted(prompts[cfg.test_prompts:])}

    pool = {}  # prompt -> list of (relative path, gold)
    index = 0
    for scale_number, scale in enumerate(cfg_scales):
        for steps in step_counts:
            batch = [p for p in prompts for _ in range(cfg.seeds_per_setting)]
            images = generate(base.dit, base, batch,
                              seed=cfg.seed * 1000 + scale_number * 100 + steps, steps=steps,
                              cfg_scale=scale)
            pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte()
            # scored as stored, after 8-bit rounding
            gold = judge.gold(pixels.float() / 127.5 - 1, batch)
            for prompt, image, g in zip(batch, pixels, gold.tolist()):
                relative = f"images/{index:05d}.png"
                save_image(Image.fromarray(image[0].numpy()), os.path.join(cfg.out_dir, relative))
                pool.setdefault(prompt, []).append((relative, g))
                index += 1
            print(f"guidance {scale}, {steps} steps: {len(batch)} images, mean gold "
                  f"{gold.mean():.3f}")

    generator = torch.Generator().manual_seed(cfg.seed)
    for name, names_prompts in split.items():
        lines, agree = [], 0
        for prompt in names_prompts:
            for _ in range(cfg.pairs_per_prompt):
                (path_a, gold_a), (path_b, gold_b) = rng.sample(pool[prompt], 2)
                a_wins, p_a = judge.label_pairs(torch.tensor([gold_a]), torch.tensor([gold_b]),
                                                generator)
                a_wins, p_a = bool(a_wins), float(p_a)
                winner, loser = ((path_a, gold_a),
                                 (path_b, gold_b)) if a_wins else ((path_b, gold_b),
                                                                   (path_a, gold_a))
                agree += winner[1] >= loser[1]
                lines.append(json.dumps({"prompt": prompt, "path1": winner[0], "path2": loser[0],
                                         "confidence": round(p_a if a_wins else 1 - p_a, 4),
                                         "gold": [round(winner[1], 4), round(loser[1], 4)]}))
        write_text(os.path.join(cfg.out_dir, f"{name}.jsonl"), "\n".join(lines) + "\n")
        print(f"{name}: {len(lines)} pairs over {len(names_prompts)} prompts; labels agree with "
              f"the gold ordering on {agree / len(lines):.1%}")
    first = [path for path, _ in pool[split["test"][0]][:16]]
    save_grid(read_images([os.path.join(cfg.out_dir, p) for p in first]),
              os.path.join(cfg.out_dir, "example_pool.png"), nrow=8)


if __name__ == "__main__":
    run_main(main, Config)
