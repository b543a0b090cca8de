"""Peak memory and time of load_sd3 on an SD3.5-medium-sized checkpoint (random weights, bf16).

    python -m bench.load_sd3 # writes ~10 GB to --dir, loads it in both layouts, deletes it

Each load runs in a fresh process, so its peak memory is the loader's alone, interpreter and torch
included. The loader reads the header, builds the model on the meta device and reads one tensor at a
time, so the peak should stay near one copy of the weights: the target is under 1.3x the file size.
Two readers of the tensors are compared: checkpoints.read_tensor (safetensors' safe_open: the file
memory-mapped copy-on-write, get_tensor) and the reader it replaced (each tensor's bytes read into
fresh memory). Besides ru_maxrss (which counts mapped file pages, reclaimable cache), a thread
samples RssAnon, the process's own memory, every 5 ms.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

import sd3.streaming
from common import UserError, check_flags, flag, run_main
from model import PRESETS, build_dit
from sd3.mmdit import STABILITY_PREFIX, load_sd3, save_sd3


@dataclass
class Config:
    preset: str = flag("sd3.5-medium", choices=PRESETS)
    dir: str = "/tmp/nanodrm_bench_load"   # where the checkpoints are written (and deleted)
    keep: bool = False                     # keep the files afterwards
    # checkpoints.read_tensor (safe_open), or the reader it replaced
    readers: str = "safe_open,read into memory"


def write_random_checkpoints(cfg):
    """A random bf16 DiT saved in Stability's single-file layout and in diffusers' folder layout."""
    torch.manual_seed(0)
    dit = build_dit(cfg.preset, device="meta")
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k,
             v in dit.state_dict().items()}
    stability = os.path.join(cfg.dir, "sd3_stability.safetensors")
    save_file({STABILITY_PREFIX + k: v for k, v in state.items()}, stability)
    dit.load_state_dict(state, assign=True)
    diffusers = os.path.join(cfg.dir, "transformer")
    save_sd3(dit, diffusers, layout="diffusers")
    return {"stability": stability, "diffusers": diffusers}


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def use_read_into_memory():
    """checkpoints.read_tensor as it was before it used safe_open: each tensor's bytes read into
    fresh memory."""
    def read_tensor(entry):
        with open(entry.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            start, end = (8 + n + offset
                          for offset in json.loads(f.read(n))[entry.name]["data_offsets"])
            f.seek(start)
            data = bytearray(f.read(end - start))
        return torch.frombuffer(data, dtype=DTYPES[entry.dtype]).reshape(entry.shape)
    sd3.streaming.read_tensor = read_tensor  # what the loader calls, one tensor at a time


def measure_in_this_process(path, reader):
    if reader == "read into memory":
        use_read_into_memory()
    peak, done = [rss_anon()], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_anon())
    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    dit = load_sd3(path)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    params = sum(p.numel() for p in dit.state_dict().values())
    print(f"{seconds:.2f} {maxrss} {max(peak[0], rss_anon())} {params} "
          f"{next(dit.parameters()).dtype}")


READERS = ("safe_open", "read into memory")


def main(cfg):
    check_flags(cfg)
    unknown = [reader for reader in cfg.readers.split(",") if reader not in READERS]
    if unknown:
        raise UserError(f"--readers={cfg.readers}: unknown {unknown}; choose from "
                        f"{', '.join(READERS)}")
    os.makedirs(cfg.dir, exist_ok=True)
    print(f"writing a random {cfg.preset} checkpoint in bf16 to {cfg.dir} ...")
    paths = write_random_checkpoints(cfg)
    rows = []
    try:
        for layout, path in paths.items():
            weights = path if path.endswith(".safetensors") else os.path.join(path,
                "diffusion_pytorch_model.safetensors")
            size = os.path.getsize(weights)
            for reader in cfg.readers.split(","):
                out = subprocess.run([sys.executable, "-m", "bench.load_sd3", "--measure", path,
                                      reader],
                                     capture_output=True, text=True, check=True)
                seconds, maxrss, anon, params, dtype = out.stdout.split()
                rows.append((layout, reader, size, float(seconds), int(maxrss), int(anon),
                             int(params), dtype))
    finally:
        if not cfg.keep:
            shutil.rmtree(cfg.dir)
    print(f"\nload_sd3, {cfg.preset}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| layout | reader | parameters | file GB | load s | peak RSS GB (maxrss) | peak RssAnon "
          "GB | RssAnon / file |")
    print("|---|---|---|---|---|---|---|---|")
    for layout, reader, size, seconds, maxrss, anon, params, dtype in rows:
        print(f"| {layout} | {reader} | {params / 1e9:.3f}B {dtype} | {size / 1e9:.2f} | "
              f"{seconds:.1f} | {maxrss / 1e9:.2f} | {anon / 1e9:.2f} | {anon / size:.2f}x |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure_in_this_process(sys.argv[2], sys.argv[3])
    else:
        run_main(main, Config)
