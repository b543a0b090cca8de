"""Pretrain the tiny DiT and its text encoder on the toy world with rectified flow.

    python train_base.py --export=data/base.safetensors   # 52 minutes on 2 CPU cores
    torchrun --nproc_per_node=8 train_base.py --batch_size=256 # DDP: each process 32 images a step

Loss: E ||v_theta(x_sigma, sigma, c) - (noise - x0)||^2 with sigma logit-normal
(SD3, Esser et al. 2024, eq. 2-3 and sec. 3.1). Captions are dropped to the
empty prompt with probability p_uncond so the model also learns the
unconditional velocity that classifier-free guidance needs, and each attribute
is dropped with probability p_drop_attribute so "a 7" is a prompt it knows.
Samples and the shipped weights come from an exponential moving average.
"""
import copy
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import (GracefulStop, RunDir, check_writable, resume_training_state,
                         save_training_state)
from common import (UserError, any_rank, autocast, check_finite, check_flags, check_weights, flag,
                    print_config, run_main, setup_device, warmup_cosine)
from data.toy import ToyBase, save_toy_base
from data.world import (HELDOUT_PROMPTS, TextConfig, TextEncoder, caption, load_world, parse_prompt,
                        tokenize)
from evaluation import generate
from images import save_grid
from model import (PRESETS, add_noise, build_dit, compile_regions, flow_matching_loss,
                   logit_normal_sigma)


@dataclass
class Config:
    out_dir: str = "out/base"          # checkpoints, sample grids, metrics.jsonl
    preset: str = "tiny"               # DiT size, a key of model.PRESETS
    train_steps: int = flag(12000, "[1, inf)")  # optimizer steps
    batch_size: int = flag(32, "[1, inf)")
    lr: float = flag(1e-3, "(0, inf)")  # AdamW peak learning rate
    warmup: int = flag(500, "[0, inf)")  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = flag(0.0, "[0, inf)")
    grad_clip: float = flag(1.0, "(0, inf)")
    ema_decay: float = flag(0.999, "[0, 1)")  # the shipped weights are this moving average
    p_uncond: float = flag(0.1, "[0, 1]")  # caption -> "" (for classifier-free guidance)
    p_drop_attribute: float = flag(0.2, "[0, 1]")  # each attribute word dropped from the caption
    eval_every: int = flag(1000, "[1, inf)")  # steps between sample grids and checkpoints
    eval_cfg: float = flag(4.0, "[0, inf)")  # guidance scale of the sample grids
    eval_per_prompt: int = flag(8, "[1, inf)")  # images per held-out prompt in each grid
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    # at the end, also write the EMA model here in float16 (how data/base.safetensors is made)
    export: str = ""
    # continue from out_dir/train_state.pt (--lr, --train_steps, --eval_every may change)
    resume: bool = False
    # start afresh in an out_dir an earlier run used (its files are removed)
    overwrite: bool = False
    # torch.compile each DiT block (fused elementwise ops; model.py)
    compile: bool = False
    # recompute each block in the backward: less memory, ~1.3x the compute
    grad_checkpointing: bool = False
    device: str = "auto"
    RENAMED = {"steps": "train_steps"}  # flags of earlier versions


def augment_caption(text, rng, cfg):
    """Drop the whole caption or single attributes at random (see the module docstring)."""
    if rng.random() < cfg.p_uncond:
        return ""
    digit, thickness, slant = parse_prompt(text)
    thickness = None if rng.random() < cfg.p_drop_attribute else thickness
    slant = None if rng.random() < cfg.p_drop_attribute else slant
    return caption(digit, thickness, slant)


@torch.no_grad()
def update_ema(ema, net, decay):
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - decay)


def probe_batch(images, captions, device):
    """A fixed batch for probe: the first 4 training digits half noised, their captions."""
    x0 = images[:4].to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.full((4,), 0.5, device=device)
    return add_noise(x0, sigma, noise), sigma, tokenize(captions[:4]).to(device)


@torch.no_grad()
def probe(net, batch):
    """net's mean squared velocity on the fixed batch, checked before a save: near 1 while the
    weights are sound; weights that diverged can be finite (near 1e30 after --lr=1e30), their
    velocity too (near 1e31), but not its square."""
    x, sigma, ids = batch
    with autocast(x.device):
        return net["dit"](x, sigma, *net["text"](ids)).float().pow(2).mean()


MAY_CHANGE = {"lr", "train_steps", "eval_every", "eval_per_prompt", "device", "compile",
              "grad_checkpointing", "export"}
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors")


def check(cfg):
    check_flags(cfg)
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset={cfg.preset}: choose one of {list(PRESETS)}")
    for name in ("train_steps", "batch_size", "eval_every", "eval_per_prompt"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    if cfg.export:
        check_writable(cfg.export, "--export=")


def main(cfg):
    check(cfg)
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, OUTPUTS) as run_dir, GracefulStop() as stop:
        print_config(cfg)
        device, ranks = setup_device(cfg.device)
        mine = ranks.shard(cfg.batch_size, "--batch_size")  # this rank's rows of each global batch
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)

        world = load_world()
        images = world["images"][world["train"]]
        captions = [c for c, keep in zip(world["captions"], world["train"]) if keep]
        print(f"training on {len(images)} digits; held-out prompts: {HELDOUT_PROMPTS}")
        fixed = probe_batch(images, captions, device)

        net = nn.ModuleDict({"dit": build_dit(cfg.preset),
                             "text": TextEncoder(TextConfig())}).to(device)
        ema = copy.deepcopy(net).requires_grad_(False)
        net["dit"].grad_checkpointing = cfg.grad_checkpointing
        if cfg.compile:
            compile_regions(net["dit"])
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        print(f"DiT parameters: {sum(p.numel() for p in net['dit'].parameters()) / 1e6:.2f}M, text "
              f"encoder: {sum(p.numel() for p in net['text'].parameters()) / 1e6:.2f}M")

        step, minutes_before = 0, 0.0
        sigma_bins = torch.linspace(0, 1, 6)  # loss by sigma quintile, as minRF logs it
        # the losses summed by bin since the last logged row, and their counts: saved with a
        # checkpoint, so that a resumed run logs the rows an uninterrupted one does
        bin_loss, bin_count = torch.zeros(5), torch.zeros(5)
        if cfg.resume:
            # the learning rate follows --lr (warmup_cosine below), so a resume may change it
            state = resume_training_state(run_dir.file("train_state.pt"), device, net=net, ema=ema,
                                          optimizer=optimizer, config=cfg, may_change=MAY_CHANGE)
            step, minutes_before = state["step"], state["minutes"]
            # (a state saved before the window was: none)
            bin_loss, bin_count = (t.cpu() for t in state.get("window", (bin_loss, bin_count)))
            rng.setstate(state["python_rng"])
            run_dir.last_saved = step
            run_dir.trim_metrics(step)

        # under torchrun, DDP averages the gradients over the ranks (the weights start equal: same
        # seed)
        dit, text = ((DDP(net["dit"], broadcast_buffers=False), DDP(net["text"])) if ranks.world > 1
                     else (net["dit"], net["text"]))
        t0 = time.time()

        def minutes():
            return minutes_before + (time.time() - t0) / 60

        def healthy(step):  # nothing of a diverged step is logged or saved
            for model in (net, ema):  # the trained weights (resumed from), their average (shipped)
                check_weights(model, step, run_dir.advice())
                check_finite(probe(model, fixed), step, "mean squared velocity on a fixed batch",
                             run_dir.advice())

        def save(step):
            if ranks.main:
                save_toy_base(run_dir.file("model.safetensors"), ema["dit"], ema["text"], step)
                save_training_state(run_dir.file("train_state.pt"), {
                    "net": net.state_dict(), "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step,
                    "minutes": minutes(), "window": (bin_loss, bin_count),
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": rng.getstate(), "config": asdict(cfg)})
            run_dir.last_saved = step

        net.train()
        bar = tqdm(range(step, cfg.train_steps), initial=step, total=cfg.train_steps,
                   desc="train_base", disable=not ranks.main)
        for step in bar:
            # the global batch's images, captions, sigmas and noise (the same draws on every rank),
            # then this rank's rows
            idx = torch.randint(len(images), (cfg.batch_size,))
            x0 = images[idx].to(device)
            ids = tokenize([augment_caption(captions[i], rng, cfg)
                            for i in idx.tolist()]).to(device)
            sigma = logit_normal_sigma(cfg.batch_size, device)
            noise = torch.randn_like(x0)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, cfg.train_steps, cfg.warmup, cfg.lr)
            with autocast(device):
                context, pooled = text(ids[mine])
                losses, sigma = flow_matching_loss(dit, x0[mine], context, pooled, sigma[mine],
                                                   noise[mine])
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            check_finite(loss, step + 1, "loss", run_dir.advice())
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            check_finite(grad_norm, step + 1, "gradient norm", run_dir.advice())
            optimizer.step()
            update_ema(ema, net, cfg.ema_decay)

            which = torch.bucketize(sigma.detach().cpu(), sigma_bins[1:-1])
            bin_loss.index_add_(0, which, losses.detach().cpu())
            bin_count.index_add_(0, which, torch.ones_like(losses.cpu()))
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
                by_bin = (bin_loss / bin_count.clamp(min=1)).tolist()
                record = {"step": step + 1,
                          "loss": sum(bin_loss.tolist()) / max(1, bin_count.sum().item()),
                          "loss_by_sigma": [round(v, 4) for v in by_bin],
                          "grad_norm": grad_norm.item(),
                          "lr": warmup_cosine(step, cfg.train_steps, cfg.warmup, cfg.lr),
                          "minutes": minutes()}
                bin_loss.zero_(), bin_count.zero_()
                healthy(step + 1)
                if ranks.main:  # the grid and row before the checkpoint (RunDir.log)
                    prompts = [p for p in HELDOUT_PROMPTS for _ in range(cfg.eval_per_prompt)]
                    grid = generate(ema["dit"], ToyBase(ema["dit"], ema["text"]), prompts, seed=0,
                                    cfg_scale=cfg.eval_cfg)
                    save_grid(grid, run_dir.file(f"samples_{step + 1:06d}.png"),
                              nrow=cfg.eval_per_prompt)
                    run_dir.log(record)
                    tqdm.write(f"step {step + 1:6d} | loss {record['loss']:.4f} | by sigma "
                               f"{record['loss_by_sigma']} | {record['minutes']:.1f} min")
                save(step + 1)
            if any_rank(stop):
                if run_dir.last_saved != step + 1:
                    healthy(step + 1)
                    save(step + 1)
                print(f"stopped: saved step {step + 1} to {cfg.out_dir}; continue with --resume")
                return None
        if cfg.export and ranks.main:
            save_toy_base(cfg.export, ema["dit"], ema["text"], cfg.train_steps, dtype=torch.float16)
            print(f"exported the EMA model in float16 to {cfg.export}")
    return ema


if __name__ == "__main__":
    run_main(main, Config)
