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
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import reward_ops
import rivals.reward
from base import ModelFlags, load_base
from checkpoints import GracefulStop, RunDir, resume_training_state
from common import (any_rank, autocast, check_finite, check_fits, check_flags, flag, group,
                    print_config, run_main, setup_device, with_flags)
from data.pairs import PairFlags, evaluate, load_split
from model import add_noise, compile_regions, logit_normal_sigma
from reward import DRM, HEADS, bradley_terry_loss, default_head
from sde import bend, latent_bytes

SIGMA_SAMPLING = ("grid", "grid_uniform", "logit_normal", "uniform", "zero")


@dataclass
class Config:
    prefs: str = "out/prefs"           # train.jsonl and test.jsonl (or HPDv3's .json lists)
    # the defaults: "" = the base's (SD3: drm, the DRM repository's recipe: reward_ops.RECIPES;
    # the toy: toy); a flag given on the command line keeps its value
    recipe: str = flag("", choices=("", "drm", "toy"))
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
    train_steps: int = flag(2000, "[1, inf)")  # optimizer steps
    batch_size: int = flag(64, "[1, inf)")  # pairs per step
    lr: float = flag(1e-4, "(0, inf)")  # backbone learning rate (AdamW)
    head_lr: float = flag(1e-3, "(0, inf)")  # the new head learns faster
    weight_decay: float = flag(0.01, "[0, inf)")
    warmup: int = flag(100, "[0, inf)")
    lr_schedule: str = flag("cosine", choices=("cosine", "constant"))  # after the warm-up
    grad_clip: float = flag(1.0, "(0, inf)")
    eval_only: bool = False            # evaluate --drm (default: out_dir's) -> out_dir/eval.json
    drm: str = ""                      # with --eval_only: the DRM checkpoint to evaluate
    export: str = ""                   # at the end, the DRM here
    # ours (float16, data/drm.safetensors) | official (the DRM repository's model.safetensors,
    # which its DRMRewardModel loads strictly; float32)
    export_layout: str = flag("ours", choices=("ours", "official"))
    resume: bool = False               # continue out_dir's run (MAY_CHANGE below may change)
    overwrite: bool = False            # start afresh in a used out_dir (its run's files removed)
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    # the groups, each flag given by its own name: the base model the DRM starts from (--model,
    # --ckpt_dir, ...: base.py), how pairs are read (--min_confidence, --t5_tokens, ...:
    # data/pairs.py), the test evaluation (--eval_every, --eval_sigmas, ...), where it runs
    # (--device, --compile, --grad_checkpointing: reward_ops.py), the rivals (--loss, --pair_noise,
    # --drm_draws, --drm_sigma: rivals/reward.py)
    pretrained: ModelFlags = group(ModelFlags)
    pairs: PairFlags = group(PairFlags)
    evaluation: reward_ops.EvalFlags = group(reward_ops.EvalFlags)
    hardware: reward_ops.HardwareFlags = group(reward_ops.HardwareFlags)
    rival: rivals.reward.Flags = group(rivals.reward.Flags)
    RENAMED = {"steps": "train_steps"}  # flags of earlier versions


# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "head_lr", "train_steps", "eval_every", "eval_batch", "device", "compile",
              "grad_checkpointing", "export"}
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors")  # a run's files


def grid_sigma(u, shift, n=1000):
    """The DRM repository's timestep sampler: u in [0, 1) indexes the scheduler's n-step training
    grid (diffusers' FlowMatchEulerDiscreteScheduler before set_timesteps: timesteps[i] = n - i), so
    sigma = bend(s), s = (n - floor(n u)) / n, bend(s) = shift s / (1 + (shift - 1) s)."""
    return bend((n - (u * n).long()).double() / n, shift).float()


def training_sigma(kind, n, device, shift=1.0):
    """The DRM's training sigmas: the DRM repository's grid (logit-normal or uniform index), a
    logit-normal or uniform sigma, or 0 (images only)."""
    if kind in ("grid", "grid_uniform"):
        u = logit_normal_sigma(n) if kind == "grid" else torch.randint(1000, (n,)) / 1000
        return grid_sigma(u, shift).to(device)
    if kind == "logit_normal":
        return logit_normal_sigma(n, device)
    return torch.rand(n, device=device) if kind == "uniform" else torch.zeros(n, device=device)


def evaluation_sigmas(evaluation, shift):
    """[(label, sigma)]: --eval_sigmas, then --eval_times on the base's grid (the DRM
    repository's)."""
    sigmas = [(f"{s:g}", s) for s in evaluation.eval_sigmas]
    for t in evaluation.eval_times:
        sigma = 0.0 if t == 0 else grid_sigma(torch.tensor([1 - t / 1000]), shift).item()
        sigmas.append((f"t={t} (sigma {sigma:.3f})", sigma))
    return sigmas


def train_step(cfg, model, optimizer, train, *, rows, step, advice, rival=None):
    """One AdamW step on a global batch of pairs (every rank draws the same, computes its rows) ->
    (loss, accuracy, gradient norm). Each pair gets one sigma, shared by its two images; each image
    its own noise. rival: where a rival's step differs (rivals/reward.py), or None."""
    device = train.winners.device
    idx = torch.randint(len(train.winners), (cfg.batch_size,))
    sigma = training_sigma(cfg.sigma_sampling, cfg.batch_size, device, cfg.sigma_shift)
    winners, losers = train.images(idx)
    noise_win = torch.randn_like(winners)
    noise_lose = rival.lose_noise(noise_win, losers) if rival else torch.randn_like(losers)
    x_win = add_noise(winners, sigma, noise_win)[rows]
    x_lose = add_noise(losers, sigma, noise_lose)[rows]
    idx, sigma = idx[rows], sigma[rows]
    with autocast(device):
        rewards = model(torch.cat([x_win, x_lose]), torch.cat([sigma, sigma]),
                        *(torch.cat([t] * 2) for t in train.text(idx, device)))
    reward_win, reward_lose = rewards.chunk(2)
    loss = (rival.loss(reward_win, reward_lose, sigma) if rival
            else bradley_terry_loss(reward_win, reward_lose)).mean()
    for param_group in optimizer.param_groups:
        param_group["lr"] = reward_ops.learning_rate(cfg, step, param_group["peak"])
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
    # the one door: a rival's loss, pair noise or DRM (rivals/reward.py), or None: the paper's
    rival = rivals.reward.Rival(cfg.rival) if rivals.reward.chosen(cfg.rival) else None
    outputs = () if cfg.eval_only else OUTPUTS
    inputs = {**cfg.pretrained.inputs(), "--prefs=": cfg.prefs, "--drm=": cfg.drm}
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, outputs, inputs=inputs) as run_dir, \
            GracefulStop() as stop:
        print_config(cfg)
        device, ranks = setup_device(cfg.hardware.device)
        rows = ranks.shard(cfg.batch_size, "--batch_size")  # this rank's pairs of each batch
        torch.manual_seed(cfg.seed)
        base = load_base(cfg.pretrained, device)
        cfg = with_flags(cfg, sigma_shift=cfg.sigma_shift or base.shift)
        eval_sigmas = evaluation_sigmas(cfg.evaluation, cfg.sigma_shift)
        if cfg.eval_only:
            return (reward_ops.evaluate_only(cfg, base, device, eval_sigmas,
                                             scorer=rival and rival.scorer,
                                             ranking=rivals.reward.ranking_table)
                    if ranks.main else None)
        check_fits(4 * cfg.batch_size * latent_bytes(base.dit, base.latent_size),
                   f"--batch_size={cfg.batch_size}", device)  # a batch's images and noises
        text = base.drm_text(cfg.pairs.t5_tokens)  # SD3: T5 padded to --t5_tokens
        train, test = (load_split(cfg, s, base, text, device) for s in ("train", "test"))
        layers = (cfg.drop_last or None, cfg.head_dropout,
                  cfg.head or default_head(base.dit.config.depth))
        drm = (DRM.from_dit(base.dit, *layers) if cfg.init == "pretrained"
               else DRM.from_scratch(base.dit.config, *layers)).to(device).float().train()
        skipped = reward_ops.skipped_blocks(cfg, base, len(drm.backbone.joint_blocks))
        base.dit = None  # the DRM holds its own copy; float32 weights (bf16 autocast on a GPU)
        drm.backbone.grad_checkpointing = cfg.hardware.grad_checkpointing
        if cfg.hardware.compile:
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
            for param_group, peak in zip(optimizer.param_groups, (cfg.lr, cfg.head_lr)):
                param_group["peak"] = peak  # the flags, not the saved values: a resume may lower
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
                                      advice=run_dir.advice(), rival=rival))
            bar.set_postfix(loss=f"{running[-1][0]:.4f}")
            if (step + 1) % cfg.evaluation.eval_every == 0 or step + 1 == cfg.train_steps:
                scorer = rival.scorer(drm) if rival else drm
                results = (evaluate(scorer, test, eval_sigmas, cfg.evaluation.eval_noise_draws,
                                    batch=cfg.evaluation.eval_batch) if run_dir.main else {})
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
