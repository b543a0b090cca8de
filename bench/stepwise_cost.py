"""What k successors cost: seconds per image of step-wise sampling for k = 1..8, as a ratio to k =
1.

    python -m bench.stepwise_cost # the shipped toy models, 32 images, 20 steps, guidance 4

Each step is one policy pass (two with guidance) for the whole batch, whatever
k is, plus one batched DRM pass over the k successors of every image; so the
time grows with k only through the DRM batch. Each k is timed `repeats` times
in one process after a warm-up and the median is kept (the machine is noisy;
read the ratios, not the seconds).
"""
import statistics
import time
from dataclasses import dataclass

import torch

from common import check_flags, flag, pick_device, print_config, run_main
from data.toy import ToyBase
from data.world import HELDOUT_PROMPTS
from sample import Search, stepwise_sample
from sde import Sampler, drm_on, initial_noise, sigma_schedule


@dataclass
class Config:
    base: str = "data/base.safetensors"
    drm: str = "data/drm.safetensors"
    images: int = flag(32, "[1, inf)")
    steps: int = flag(20, "[1, inf)")
    cfg_scale: float = flag(4.0, "[0, inf)")
    max_k: int = flag(8, "[1, inf)")
    repeats: int = flag(3, "[1, inf)")
    device: str = "auto"


def main(cfg):
    check_flags(cfg)
    print_config(cfg)
    device = pick_device(cfg.device)
    base = ToyBase.load(cfg.base, device)
    dit = base.dit
    drm, drm_text, _ = base.load_drm(cfg.drm, device)
    prompts = [HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)] for i in range(cfg.images)]
    cond, uncond = base.encode(prompts)
    drm_cond = drm_text.encode(prompts)
    noise = initial_noise(dit, cfg.images, torch.Generator().manual_seed(0)).to(device)

    def seconds_per_image(k):
        times = []
        for _ in range(cfg.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stepwise_sample(Sampler(dit, sigma_schedule(cfg.steps).to(device), cond, uncond,
                                    cfg.cfg_scale), noise, drm_on(drm, drm_cond),
                            search=Search(k=k), generator=torch.Generator().manual_seed(1))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / cfg.images)
        return statistics.median(times)

    seconds_per_image(2)  # warm-up
    print(f"step-wise sampling, {cfg.images} images, {cfg.steps} steps, guidance {cfg.cfg_scale}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| k | DiT passes / image | DRM passes / image | ms / image | time vs k=1 |")
    print("|---|---|---|---|---|")
    base = None
    for k in range(1, cfg.max_k + 1):
        seconds = seconds_per_image(k)
        base = base or seconds
        passes = cfg.steps * (2 if cfg.cfg_scale != 1 else 1)
        print(f"| {k} | {passes} | {cfg.steps * k if k > 1 else 0} | {seconds * 1000:.1f} | "
              f"{seconds / base:.2f}x |", flush=True)


if __name__ == "__main__":
    run_main(main, Config)
