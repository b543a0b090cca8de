"""Peak memory and time of load_sd3 on an SD3.5-medium-sized checkpoint (random weights, bf16).

    python -m bench.load_sd3                      # writes ~5 GB to --dir, loads it in both layouts, deletes it

Each load runs in a fresh process, so its peak resident memory (ru_maxrss) is
the loader's alone, interpreter and torch included. The loader reads the header,
builds the model on the meta device and reads one tensor at a time, so the peak
should stay near one copy of the weights: the target is under 1.3x the file size.
"""
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from common import parse_flags
from model import build_dit
from sd3.mmdit import STABILITY_PREFIX, load_sd3, save_sd3


@dataclass
class Config:
    preset: str = "sd3.5-medium"
    dir: str = "/tmp/nanodrm_bench_load"   # where the checkpoints are written (and deleted)
    keep: bool = False                     # keep the files afterwards


def write_random_checkpoints(cfg):
    """A random bf16 DiT saved in Stability's single-file layout and in diffusers' folder layout."""
    torch.manual_seed(0)
    dit = build_dit(cfg.preset, device="meta")
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in dit.state_dict().items()}
    stability = os.path.join(cfg.dir, "sd3_stability.safetensors")
    save_file({STABILITY_PREFIX + k: v for k, v in state.items()}, stability)
    dit.load_state_dict(state, assign=True)
    diffusers = os.path.join(cfg.dir, "transformer")
    save_sd3(dit, diffusers, layout="diffusers")
    return {"stability": stability, "diffusers": diffusers}


def measure_in_this_process(path):
    t0 = time.perf_counter()
    dit = load_sd3(path)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    params = sum(p.numel() for p in dit.state_dict().values())
    print(f"{seconds:.2f} {peak} {params} {next(dit.parameters()).dtype}")


def main(cfg):
    os.makedirs(cfg.dir, exist_ok=True)
    print(f"writing a random {cfg.preset} checkpoint in bf16 to {cfg.dir} ...")
    paths = write_random_checkpoints(cfg)
    rows = []
    try:
        for layout, path in paths.items():
            weights = path if path.endswith(".safetensors") else os.path.join(path, "diffusion_pytorch_model.safetensors")
            size = os.path.getsize(weights)
            out = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True, check=True)
            seconds, peak, params, dtype = out.stdout.split()
            rows.append((layout, size, float(seconds), int(peak), int(params), dtype))
    finally:
        if not cfg.keep:
            shutil.rmtree(cfg.dir)
    print(f"\nload_sd3, {cfg.preset}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| layout | parameters | file GB | load s | peak RSS GB | peak / file |")
    print("|---|---|---|---|---|---|")
    for layout, size, seconds, peak, params, dtype in rows:
        print(f"| {layout} | {params / 1e9:.3f}B {dtype} | {size / 1e9:.2f} | {seconds:.1f} | {peak / 1e9:.2f} | {peak / size:.2f}x |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure_in_this_process(sys.argv[2])
    else:
        main(parse_flags(Config(), sys.argv[1:]))
