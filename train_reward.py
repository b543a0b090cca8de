"""Train the Diffusion-based Reward Model on preference pairs (DRM, sec. 3, eq. 4).

    python -m data.preferences                                   # the pairs, out/prefs/ (9 min)
    python train_reward.py --export=data/drm.safetensors         # the shipped DRM
    python train_reward.py --init=scratch --out_dir=out/drm_scratch   # ablation: no pretraining
    python train_reward.py --eval_only --drm=data/drm.safetensors     # accuracy per sigma
    torchrun --nproc_per_node=8 train_reward.py --batch_size=512      # DDP: 64 pairs a process
    python train_reward.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --prefs=hpdv3/ --resolution=512 --grad_checkpointing     # images VAE-encoded once

For each pair one sigma is drawn and shared by both images, each with its own noise, so the model
learns to rank noisy states at every noise level:

    L = -log sigmoid(r(x_sigma^w, sigma) - r(x_sigma^l, sigma)),  x_sigma = (1 - sigma) x0 + sigma z

The sigma is the DRM repository's (drm/train.py): u ~ sigmoid(N(0, 1)) indexes the base's 1000-step
scheduler grid, sigma = bend(1 - floor(1000 u) / 1000) with the base's shift (SD3.5: 3, so the
median training sigma is 0.75; the toy: 1). On SD3 every setting defaults to that repository's
recipe (--recipe=drm: its head, AdamW lr 1e-5 without warm-up (its "constant" schedule ignores the
warm-up flag), weight decay 1e-4, batch 16, pairs of confidence >= 0.95, images stretched to square,
VAE latents drawn from the posterior, T5 padded to 512 tokens); on the toy, to the toy's
(--recipe=toy).

The text encoder is the base model's, frozen: prompts are encoded once. Evaluation noises the
test pairs at fixed sigmas with fixed noise and reports pairwise accuracy against the labels and,
in the toy, against the noise-free gold ordering (which training never sees).
"""
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import reward_ops
from base import ModelFlags, check_model_flags, load_base, model_inputs
from checkpoints import GracefulStop, RunDir, check_finite, resume_training_state
from common import (any_rank, autocast, check_flags, flag, parse_numbers, print_config, run_main,
                    setup_device)
from data.pairs import evaluate, load_split
from model import add_noise, compile_regions, logit_normal_sigma
from reward import DRM, HEADS, default_head
from rivals.reward import LOSSES, EnsembleFlags, with_ensemble

SIGMA_SAMPLING = ("grid", "grid_uniform", "logit_normal", "uniform", "zero")


@dataclass
class Config(ModelFlags, EnsembleFlags):  # where the DRM starts (base.py); the rival's flags
    prefs: str = "out/prefs"           # train.jsonl and test.jsonl (or HPDv3's .json lists)
    # the defaults: "" = the base's (SD3: drm, the DRM repository's recipe: reward_ops.RECIPES;
    # the toy: toy); a flag given on the command line keeps its value
    recipe: str = flag("", choices=("", "drm", "toy"))
    # train only on pairs whose confidence is at least this (the DRM repository's loader: 0.95);
    # evaluation keeps every pair
    min_confidence: float = flag(0.0, "[0, 1]", zero="every pair")
    out_dir: str = "out/drm"
    # pretrained (the paper) | scratch (random weights)
    init: str = flag("pretrained", choices=("pretrained", "scratch"))
    # "" = the base's: conv (the toy's, scaled down) | 2BConvGN (24 blocks) | 7BConvGN (38: the
    # DRM repository's) | token (an MLP on the mean hidden token)
    head: str = flag("", choices=("", *HEADS))
    # DiT blocks cut from the end
    drop_last: int = flag(0, "[0, inf)", zero="the head's: 3; 7BConvGN 5")
    head_dropout: float = flag(0.1, "[0, 1)")  # dropout before the head's last linear layer
    # grid (the DRM repository's: logit-normal u indexing the shifted 1000-step grid) | grid_uniform
    # (its --uniform) | logit_normal (sigma itself, unshifted) | uniform | zero (clean images)
    sigma_sampling: str = flag("grid", choices=SIGMA_SAMPLING)
    sigma_shift: float = flag(0.0, "[0, inf)", zero="the base's scheduler's: SD3.5 3, toy 1")
    # independent (each image its own noise: the paper) | shared (one a pair: DiNa-LRM's)
    pair_noise: str = flag("independent", choices=("independent", "shared"))
    # bt (Bradley-Terry, the paper) | thurstone (DiNa-LRM's: rivals/reward.py's LOSSES)
    loss: str = flag("bt", choices=LOSSES)
    train_steps: int = flag(2000, "[1, inf)")  # optimizer steps
    batch_size: int = flag(64, "[1, inf)")  # pairs per step
    lr: float = flag(1e-4, "(0, inf)")  # backbone learning rate (AdamW)
    head_lr: float = flag(1e-3, "(0, inf)")  # the new head learns faster
    weight_decay: float = flag(0.01, "[0, inf)")
    warmup: int = flag(100, "[0, inf)")
    lr_schedule: str = flag("cosine", choices=("cosine", "constant"))  # after the warm-up
    grad_clip: float = flag(1.0, "(0, inf)")
    # SD3: crop (the shorter side to --resolution, the centre) | stretch (to a square, the DRM
    # repository's); mode (the posterior mean) | sample (a draw each use); T5's padded length
    image_resize: str = flag("crop", choices=("crop", "stretch"))
    vae_latents: str = flag("mode", choices=("mode", "sample"))
    t5_tokens: int = flag(256, "[1, inf)")
    eval_every: int = flag(1000, "[1, inf)")
    eval_noise_draws: int = flag(2, "[1, inf)")  # noise draws per test pair and sigma, averaged
    eval_sigmas: str = "0,0.25,0.5,0.75,0.9"  # the noise levels test accuracy is measured at
    # and the DRM repository's: its `time` t on the base's grid, sigma = bend(t / 1000), t = 0 clean
    # (scheduler.timesteps[-t]; SD3.5: t = 750 is sigma 0.9), e.g. 0,250,500,750,900
    eval_times: str = ""
    eval_batch: int = flag(256, "[1, inf)")  # test pairs scored at a time
    eval_only: bool = False            # evaluate --drm (default: out_dir's) -> out_dir/eval.json
    # what --eval_only scores: prefs (the test pairs) | policy (the toy: pairs of the base's own
    # samples, and the DRM's ranking of SDE candidates by step; evaluation.py)
    eval_set: str = flag("prefs", choices=("prefs", "policy"))
    drm: str = ""                      # with --eval_only: the DRM checkpoint to evaluate
    export: str = ""                   # at the end, the DRM here
    # ours (float16, data/drm.safetensors) | official (the DRM repository's model.safetensors,
    # which its DRMRewardModel loads strictly; float32)
    export_layout: str = flag("ours", choices=("ours", "official"))
    resume: bool = False               # continue out_dir's run (MAY_CHANGE below may change)
    overwrite: bool = False            # start afresh in a used out_dir (its run's files removed)
    compile: bool = False              # torch.compile the DRM's blocks (model.py)
    grad_checkpointing: bool = False   # re-run each block in the backward: less memory
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    device: str = "auto"
    RENAMED = {"steps": "train_steps"}  # flags of earlier versions


# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "head_lr", "train_steps", "eval_every", "eval_batch", "device", "compile",
              "grad_checkpointing", "export"}
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors")  # a run's files


def grid_sigma(u, shift, n=1000):
    """The DRM repository's timestep sampler: u in [0, 1) indexes the scheduler's n-step training
    grid (diffusers' FlowMatchEulerDiscreteScheduler before set_timesteps: timesteps[i] = n - i), so
    sigma = bend(s), s = (n - floor(n u)) / n, bend(s) = shift s / (1 + (shift - 1) s)."""
    s = (n - (u * n).long()).double() / n
    return (shift * s / (1 + (shift - 1) * s)).float()


def training_sigma(kind, n, device, shift=1.0):
    """The DRM's training sigmas: the DRM repository's grid (logit-normal or uniform index), a
    logit-normal or uniform sigma, or 0 (images only)."""
    if kind in ("grid", "grid_uniform"):
        u = torch.sigmoid(torch.randn(n)) if kind == "grid" else torch.randint(1000, (n,)) / 1000
        return grid_sigma(u, shift).to(device)
    if kind == "logit_normal":
        return logit_normal_sigma(n, device)
    return torch.rand(n, device=device) if kind == "uniform" else torch.zeros(n, device=device)


def evaluation_sigmas(cfg, shift):
    """[(label, sigma)]: --eval_sigmas, then --eval_times on the base's grid (the DRM
    repository's)."""
    sigmas = [(f"{s:g}", s) for s in parse_numbers(cfg, "eval_sigmas", float)]
    for t in parse_numbers(cfg, "eval_times"):
        sigma = 0.0 if t == 0 else grid_sigma(torch.tensor([1 - t / 1000]), shift).item()
        sigmas.append((f"t={t} (sigma {sigma:.3f})", sigma))
    return sigmas


def train_step(cfg, model, optimizer, train, *, rows, step, advice):
    """One AdamW step on a global batch of pairs (every rank draws the same, computes its rows) ->
    (loss, accuracy, gradient norm). Each pair gets one sigma, shared by its two images."""
    device = train.winners.device
    idx = torch.randint(len(train.winners), (cfg.batch_size,))
    sigma = training_sigma(cfg.sigma_sampling, cfg.batch_size, device, cfg.sigma_shift)
    winners, losers = train.images(idx)
    noise_win = torch.randn_like(winners)
    noise_lose = noise_win if cfg.pair_noise == "shared" else torch.randn_like(losers)
    x_win = add_noise(winners, sigma, noise_win)[rows]
    x_lose = add_noise(losers, sigma, noise_lose)[rows]
    idx, sigma = idx[rows], sigma[rows]
    with autocast(device):
        rewards = model(torch.cat([x_win, x_lose]), torch.cat([sigma, sigma]),
                        *(torch.cat([t] * 2) for t in train.text(idx, device)))
    reward_win, reward_lose = rewards.chunk(2)
    loss = LOSSES[cfg.loss](reward_win, reward_lose, sigma).mean()
    for group in optimizer.param_groups:
        group["lr"] = reward_ops.learning_rate(cfg, step, group["peak"])
    optimizer.zero_grad(set_to_none=True)
    check_finite(loss, step + 1, "loss", advice)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    check_finite(grad_norm, step + 1, "gradient norm", advice)
    optimizer.step()
    return loss.item(), (reward_win > reward_lose).float().mean().item(), grad_norm.item()


def main(cfg):
    check_flags(cfg)
    cfg = reward_ops.with_recipe(cfg)
    reward_ops.check_reward(cfg)
    check_model_flags(cfg)
    outputs = () if cfg.eval_only else OUTPUTS
    inputs = {**model_inputs(cfg), "--prefs=": cfg.prefs, "--drm=": cfg.drm}
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, outputs, inputs=inputs) as run_dir, \
            GracefulStop() as stop:
        print_config(cfg)
        device, ranks = setup_device(cfg.device)
        rows = ranks.shard(cfg.batch_size, "--batch_size")  # this rank's pairs of each batch
        torch.manual_seed(cfg.seed)
        base = load_base(cfg, device)
        cfg = dataclasses.replace(cfg, sigma_shift=cfg.sigma_shift or base.shift)
        eval_sigmas = evaluation_sigmas(cfg, cfg.sigma_shift)
        if cfg.eval_only:
            return reward_ops.evaluate_only(cfg, base, device, eval_sigmas) if ranks.main else None
        text = base.drm_text(cfg.t5_tokens)  # SD3: T5 padded to --t5_tokens
        train, test = (load_split(cfg, s, base, text, device) for s in ("train", "test"))
        layers = (cfg.drop_last or None, cfg.head_dropout,
                  cfg.head or default_head(base.dit.config.depth))
        drm = (DRM.from_dit(base.dit, *layers) if cfg.init == "pretrained"
               else DRM.from_scratch(base.dit.config, *layers)).to(device).float().train()
        skipped = reward_ops.skipped_blocks(cfg, base, len(drm.backbone.joint_blocks))
        base.dit = None  # the DRM holds its own copy; float32 weights (bf16 autocast on a GPU)
        drm.backbone.grad_checkpointing = cfg.grad_checkpointing
        if cfg.compile:
            compile_regions(drm.backbone)
        print(f"DRM ({cfg.init}): {len(drm.backbone.joint_blocks)} of {drm.backbone.config.depth} "
              f"blocks, {sum(p.numel() for p in drm.parameters()) / 1e6:.2f}M parameters; "
              f"{len(train.winners)} train pairs, {len(test.winners)} test pairs")
        groups = [{"params": list(drm.backbone.parameters()), "lr": cfg.lr, "peak": cfg.lr},
                  {"params": list(drm.head.parameters()), "lr": cfg.head_lr, "peak": cfg.head_lr}]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        step, running = 0, []  # running: each step's (loss, accuracy, gradient norm) until a log
        if cfg.resume:
            state = resume_training_state(run_dir.file("train_state.pt"), device, cfg, MAY_CHANGE,
                                          drm=drm, optimizer=optimizer)
            run_dir.check_inputs(state.get("inputs"))
            step, running = state["step"], state.get("running", [])  # (older states: none)
            for group, peak in zip(optimizer.param_groups, (cfg.lr, cfg.head_lr)):
                group["peak"] = peak  # the flags, not the saved values: a resume may lower them
            run_dir.last_saved = step
            run_dir.trim_metrics(step)
        # under torchrun, DDP averages the gradients over the ranks (the weights start equal). The
        # last kept block's text-stream output feeds nothing in the DRM, so its MLP gets no
        # gradient: DDP must be told to expect unused parameters.
        model = (DDP(drm, broadcast_buffers=False, find_unused_parameters=True) if ranks.world > 1
                 else drm)
        t0 = time.time()
        bar = tqdm(range(step, cfg.train_steps), initial=step, total=cfg.train_steps,
                   desc="train_reward", disable=not ranks.main)
        for step in bar:
            running.append(train_step(cfg, model, optimizer, train, rows=rows, step=step,
                                      advice=run_dir.advice()))
            bar.set_postfix(loss=f"{running[-1][0]:.4f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
                scorer = with_ensemble(drm, cfg.drm_draws, cfg.drm_sigma)
                results = (evaluate(scorer, test, eval_sigmas, cfg.eval_noise_draws,
                                    batch=cfg.eval_batch) if run_dir.main else {})
                reward_ops.log_and_save(cfg, run_dir, base, drm, optimizer, results,
                                        test.gold is not None, step=step + 1, running=running,
                                        minutes=(time.time() - t0) / 60)
                running = []
            if any_rank(stop):
                if run_dir.last_saved != step + 1:
                    reward_ops.save_run(cfg, run_dir, base, drm, optimizer, step + 1, running)
                print(f"stopped: saved step {step + 1} to {cfg.out_dir}; continue with --resume")
                return None
        if cfg.export and ranks.main:
            reward_ops.export(cfg, base, drm, skipped)
    return drm


if __name__ == "__main__":
    run_main(main, Config)
