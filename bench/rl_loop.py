"""Where a Step-GRPO update spends its time and memory.

    python -m bench.rl_loop # the CPU toy at train_policy.py's defaults, eager and --compile
    python -m bench.rl_loop --size=sd3.5-medium --device=cuda --lora_rank=16 --grad_checkpointing \
        --trajectories=4 --k=4 --latent=64 # random SD3.5-medium weights, 512 px, bf16 autocast

One update as train_policy.py runs it: SDE rollouts with k DRM-scored
candidates per step, step-wise advantages, then `minibatches` optimizer steps
on the clipped loss. Timers split the rollout into policy passes, DRM passes
and the rest (the SDE step, sampling, bookkeeping) and the update into the
loss's forward, its backward and the optimizer (with gradient clipping).
Memory: the bytes autograd saves for one minibatch's backward (counted with
saved-tensor hooks, on any device) and, on a GPU, the peak allocated.
Each variant runs one untimed update first (warm-up and compilation), then the
median of `repeats` updates.
"""
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from common import (UserError, autocast, check_flags, flag, in_chunks, pick_device, print_config,
                    run_main)
from data.toy import ToyBase
from data.world import TRAIN_PROMPTS
from grpo import Candidates, grpo_loss, sample_rollout, stepwise_advantages
from lora import add_lora
from model import PRESETS, build_dit, compile_regions
from reward import DRM
from sde import Draws, Sampler, initial_noise, sigma_schedule


@dataclass
class Config:
    # toy: the shipped base model and DRM; else a preset of model.PRESETS, random weights
    size: str = "toy"
    latent: int = flag(64, "[2, inf)")  # with a preset: latent side (64 = 512 px for SD3)
    text_tokens: int = flag(333, "[1, inf)")  # with a preset: prompt tokens (77 CLIP + 256 T5)
    trajectories: int = flag(16, "[1, inf)")
    k: int = flag(4, "[2, inf)")
    steps: int = flag(10, "[1, inf)")
    cfg_scale: float = flag(4.0, "[0, inf)")
    minibatches: int = flag(2, "[1, inf)")
    lora_rank: int = flag(0, "[0, inf)")  # 0: full fine-tune
    grad_checkpointing: bool = False
    rollout_batch: int = flag(0, "[0, inf)")
    drm_batch: int = flag(0, "[0, inf)")
    compile: str = "off,on"              # variants to run
    repeats: int = flag(3, "[1, inf)")
    device: str = "auto"


class Timer:
    """Adds up the seconds spent inside fn calls."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(cfg, device):
    """-> policy, drm, cond, uncond, drm_cond for cfg.trajectories rollouts."""
    n = cfg.trajectories
    if cfg.size == "toy":
        base = ToyBase.load("data/base.safetensors", device)
        drm, drm_text, _ = base.load_drm("data/drm.safetensors", device)
        prompts = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(n)]
        cond, uncond = base.encode(prompts)
        return base.dit, drm, cond, uncond, drm_text.encode(prompts)
    if cfg.size not in PRESETS:
        raise UserError(f"--size={cfg.size}: toy or one of {', '.join(PRESETS)}")
    config = dataclasses.replace(PRESETS[cfg.size],
                                 pos_embed_max_size=cfg.latent // PRESETS[cfg.size].patch_size)
    # frozen weights in bf16 on a GPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = build_dit(config, device=device).to(dtype)
    drm = DRM.from_dit(policy, drop_last=3).to(device, dtype).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    cond = (torch.randn(n, cfg.text_tokens, config.context_dim, generator=g).to(device, dtype),
            torch.randn(n, config.pooled_dim, generator=g).to(device, dtype))
    uncond = tuple(torch.zeros_like(t) for t in cond)
    return policy, drm, cond, uncond, cond


def one_update(cfg, policy, drm, cond, uncond, drm_cond, optimizer, params, device):
    """One rollout + update -> {part: seconds}, saved bytes of the first minibatch."""
    timed_policy = Timer(lambda *a: in_chunks(policy, cfg.rollout_batch, *a), device)
    timed_drm = Timer(lambda x, s,
                      rows: in_chunks(drm, cfg.drm_batch, x, s, drm_cond[0][rows],
                                      drm_cond[1][rows]), device)
    g = torch.Generator().manual_seed(0)
    noise = initial_noise(policy, cfg.trajectories, g).to(device)
    sigmas = sigma_schedule(cfg.steps).to(device)
    sync(device)
    t0 = time.perf_counter()
    policy.eval()
    with autocast(device):
        sampler = Sampler(timed_policy, sigmas, cond, uncond, cfg.cfg_scale)
        rollout = sample_rollout(sampler, noise, noise_level=0.7,
                                 candidates=Candidates(cfg.k, timed_drm), draws=Draws(g))
    sync(device)
    times = {"rollout": time.perf_counter() - t0, "rollout: policy": timed_policy.seconds,
             "rollout: DRM": timed_drm.seconds}
    times["rollout: the rest"] = times["rollout"] - timed_policy.seconds - timed_drm.seconds
    advantages = stepwise_advantages(rollout.rewards)
    policy.train()
    pairs = torch.randperm(cfg.steps * cfg.trajectories, generator=g).to(device)
    saved_bytes = []
    parameter_storages = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    for part in ("loss forward", "backward", "optimizer"):
        times[part] = 0.0
    for chunk in pairs.chunk(cfg.minibatches):
        storages = {}

        def pack(tensor):  # count each activation storage once; weights are not activations
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameter_storages:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor
        sync(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device):
            loss, _ = grpo_loss(policy, rollout, advantages, chunk // cfg.trajectories,
                                chunk % cfg.trajectories)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times["loss forward"] += t1 - t0
        times["backward"] += t2 - t1
        times["optimizer"] += time.perf_counter() - t2
        saved_bytes.append(sum(storages.values()))
    times["update"] = times["loss forward"] + times["backward"] + times["optimizer"]
    return times, saved_bytes[0]


def main(cfg):
    check_flags(cfg)
    print_config(cfg)
    device = pick_device(cfg.device)
    results = {}
    for variant in cfg.compile.split(","):
        if variant not in ("off", "on"):
            raise UserError(f"--compile={cfg.compile}: a list of off and on")
        policy, drm, cond, uncond, drm_cond = build(cfg, device)  # fresh models for each variant
        if cfg.lora_rank:
            add_lora(policy, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))
        policy.grad_checkpointing = cfg.grad_checkpointing
        if variant == "on":
            compile_regions(policy)
            compile_regions(drm.backbone)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-7)
        print(f"policy {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trained; {cfg.trajectories} "
              f"trajectories x {cfg.steps} steps x k={cfg.k}, {cfg.minibatches} minibatches; torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads; compile {variant}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        one_update(cfg, policy, drm, cond, uncond, drm_cond, optimizer, params, device)
        first = time.perf_counter() - t0
        runs = [one_update(cfg, policy, drm, cond, uncond, drm_cond, optimizer, params, device)
                for _ in range(cfg.repeats)]
        times = {part: statistics.median(r[0][part] for r in runs) for part in runs[0][0]}
        times["first update (compiles)"] = first
        peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
                else float("nan"))
        results[variant] = (times, runs[0][1] / 2 ** 30, peak)
    variants = list(results)
    print("\n| part | " + " | ".join(f"compile {v}: s"
                                     for v in variants) + " | share of the step (compile off) |")
    print("|---|" + "---|" * (len(variants) + 1))
    base = results[variants[0]][0]
    for part in base:
        share = ("" if part.startswith("first")
                 else f"{base[part] / (base['rollout'] + base['update']):.0%}")
        print(f"| {part} | " + " | ".join(f"{results[v][0][part]:.3f}"
                                          for v in variants) + f" | {share} |")
    print("| rollout images/s | " + " | ".join(f"{cfg.trajectories / results[v][0]['rollout']:.1f}"
                                               for v in variants) + " | |")
    print("| saved for backward, one minibatch, GiB | " + " | ".join(f"{results[v][1]:.3f}"
                                                                     for v in variants) + " | |")
    if device.type == "cuda":
        print("| peak GPU memory, GiB | " + " | ".join(f"{results[v][2]:.1f}"
                                                       for v in variants) + " | |")
    return results


if __name__ == "__main__":
    run_main(main, Config)
