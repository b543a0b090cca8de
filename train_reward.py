"""Train the Diffusion-based Reward Model on preference pairs (DRM, sec. 3, eq. 4).

    python data/preferences.py                                  # the pairs, out/prefs/ (4 minutes)
    python train_reward.py --export=data/drm.safetensors        # the shipped DRM
    python train_reward.py --init=scratch --out_dir=out/drm_scratch   # the ablation: no pretraining
    python train_reward.py --eval_only --drm=data/drm.safetensors     # accuracy per sigma -> eval.json
    torchrun --nproc_per_node=8 train_reward.py --batch_size=512     # DDP: each process 64 pairs a step
    python train_reward.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prefs=hpdv3/ \
        --resolution=512 --grad_checkpointing                      # public weights: images VAE-encoded once

For each pair one sigma is drawn (logit-normal, as the DiT was trained) and
shared by both images, each with its own noise, so the model learns to rank
noisy states at every noise level:

    L = -log sigmoid(r(x_sigma^w, sigma) - r(x_sigma^l, sigma)),  x_sigma = (1 - sigma) x0 + sigma noise.

The text encoder is the base model's, frozen: prompts are encoded once.
Evaluation noises the test pairs at fixed sigmas with fixed noise and reports
pairwise accuracy against the annotator's noisy labels and against the
noise-free gold ordering (which training never sees).
"""
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (GracefulStop, ModelFlags, RunDir, UserError, any_rank, autocast, check_finite, check_numbers,
                    check_weights, load_model, print_config, resume_training_state, run_main, save_training_state,
                    setup_device, warmup_cosine)
from data.preferences import load_pair_tensors, read_pairs
from model import add_noise, logit_normal_sigma, set_compile
from reward import DRM, HEADS, bradley_terry_loss, load_drm, save_drm
from sample import encode_prompts

CLOSE_GAP = 0.1  # gold gap under which a pair counts as close


@dataclass
class Config(ModelFlags):                  # --model, --ckpt_dir, ... for public SD3 weights (common.py)
    prefs: str = "out/prefs"               # folder with train.jsonl and test.jsonl (or .json lists, HPDv3's)
    min_confidence: float = 0.0            # train only on pairs whose confidence is at least this (the DRM repository's
                                           # loader: 0.95); evaluation keeps every pair
    base: str = "data/base.safetensors"    # the toy's pretrained DiT + text encoder the DRM starts from
    out_dir: str = "out/drm"
    init: str = "pretrained"               # pretrained (the paper) | scratch (same network, random weights)
    drop_last: int = 3                     # DiT blocks cut from the end
    head: str = "conv"                     # conv (the paper: final layer, convs on the latent grid) | token (MLP on the mean token)
    head_dropout: float = 0.1              # dropout before the head's last linear layer
    sigma_sampling: str = "logit_normal"   # training noise levels: logit_normal (SD3's) | uniform | zero (clean images only)
    steps: int = 2000
    batch_size: int = 64                   # pairs per step
    lr: float = 1e-4                       # backbone learning rate (AdamW)
    head_lr: float = 1e-3                  # the new head learns faster
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    eval_every: int = 1000
    eval_noise_draws: int = 2              # noise draws per test pair and sigma, averaged
    eval_sigmas: str = "0,0.25,0.5,0.75,0.9"  # noise levels the test accuracy is measured at
    eval_batch: int = 256                  # test pairs scored at a time
    eval_only: bool = False                # evaluate --drm (default out_dir/model.safetensors), write out_dir/eval.json, stop
    drm: str = ""                          # with --eval_only: the DRM checkpoint to evaluate
    export: str = ""                       # at the end, also write the DRM here in float16 (how data/drm.safetensors is made)
    resume: bool = False                   # continue the run in out_dir (--lr, --head_lr, --steps, --eval_every may change)
    overwrite: bool = False                # start afresh in an out_dir an earlier run used (its files are removed)
    compile: bool = False                  # torch.compile each DiT block (fused elementwise ops; model.py)
    grad_checkpointing: bool = False       # recompute each block in the backward: less memory, ~1.3x the compute
    seed: int = 0
    device: str = "auto"


SIGMA_SAMPLING = ("logit_normal", "uniform", "zero")
# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "head_lr", "steps", "eval_every", "eval_batch", "device", "compile", "grad_checkpointing", "export"}
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors")


def training_sigma(kind, n, device):
    """The noise levels the DRM trains at: SD3's logit-normal (the paper's choice), uniform, or 0 (a plain image RM)."""
    if kind == "logit_normal":
        return logit_normal_sigma(n, device)
    return torch.rand(n, device=device) if kind == "uniform" else torch.zeros(n, device=device)


def check(cfg):
    """Reject bad flag values before any work -> the evaluation sigmas."""
    check_numbers(cfg)
    if cfg.init not in ("pretrained", "scratch"):
        raise UserError(f"--init={cfg.init}: choose pretrained or scratch")
    for name in ("steps", "batch_size", "eval_every", "eval_noise_draws", "eval_batch"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    try:
        sigmas = [float(v) for v in cfg.eval_sigmas.split(",")]
    except ValueError:
        raise UserError(f"--eval_sigmas={cfg.eval_sigmas}: numbers separated by commas, e.g. 0,0.5,0.9") from None
    if not all(0 <= s <= 1 for s in sigmas):
        raise UserError(f"--eval_sigmas={cfg.eval_sigmas}: every sigma must lie in [0, 1] (0 = clean, 1 = pure noise)")
    if cfg.head not in HEADS:
        raise UserError(f"--head={cfg.head}: choose one of {', '.join(HEADS)}")
    if cfg.sigma_sampling not in SIGMA_SAMPLING:
        raise UserError(f"--sigma_sampling={cfg.sigma_sampling}: choose one of {', '.join(SIGMA_SAMPLING)}")
    if not 0 <= cfg.min_confidence <= 1:
        raise UserError(f"--min_confidence={cfg.min_confidence}: a probability in [0, 1] (0 keeps every pair)")
    if not 0 <= cfg.head_dropout < 1:
        raise UserError(f"--head_dropout={cfg.head_dropout}: a probability in [0, 1)")
    return sigmas


def prompt_embeddings(text_encoder, prompts, device):
    """Encode each distinct prompt once -> (context, pooled) indexed like prompts."""
    distinct = sorted(set(prompts))
    (context, pooled), _ = encode_prompts(text_encoder, distinct)
    index = torch.tensor([distinct.index(p) for p in prompts], device=device)
    return context[index], pooled[index]


@dataclass
class Pairs:
    """A split's preference pairs as tensors: path1 (the labelled winner) and path2 of each, its prompt's embedding,
    and (the toy) the two gold scores, which only evaluation reads."""
    winners: torch.Tensor   # (N, C, H, W)
    losers: torch.Tensor    # (N, C, H, W)
    context: torch.Tensor   # (N, L, context_dim)
    pooled: torch.Tensor    # (N, pooled_dim)
    gold: torch.Tensor | None  # (N, 2) or None


@torch.no_grad()
def evaluate(drm, pairs, sigmas, noise_draws=4, seed=1234, batch=256):
    """Pairwise accuracy on the test pairs at each sigma, against the labels and (the toy) gold -> {sigma: figures}.
    A non-finite score (a diverged DRM) makes that sigma's accuracies NaN, so the run stops rather than saves it."""
    drm.eval()
    device = pairs.winners.device
    g = torch.Generator().manual_seed(seed)
    results = {}
    for sigma_value in sigmas:
        margin = torch.zeros(len(pairs.winners))
        for _ in range(noise_draws):
            for i in range(0, len(pairs.winners), batch):
                w, l = pairs.winners[i:i + batch], pairs.losers[i:i + batch]
                sigma = torch.full((len(w),), sigma_value, device=device)
                x = torch.cat([add_noise(w, sigma, torch.randn(w.shape, generator=g).to(device)),
                               add_noise(l, sigma, torch.randn(l.shape, generator=g).to(device))])
                rewards = drm(x, torch.cat([sigma, sigma]), torch.cat([pairs.context[i:i + batch]] * 2),
                              torch.cat([pairs.pooled[i:i + batch]] * 2)).float().cpu()
                margin[i:i + len(w)] += (rewards[:len(w)] - rewards[len(w):]) / noise_draws
        first_preferred = margin > 0
        nan = 0.0 if torch.isfinite(margin).all() else float("nan")
        results[f"{sigma_value:g}"] = {"label_accuracy": first_preferred.float().mean().item() + nan}
        if pairs.gold is not None:
            gold = pairs.gold
            gold_first = gold[:, 0] > gold[:, 1]            # path1 (the labelled winner) is also gold's winner
            not_tied, close = gold[:, 0] != gold[:, 1], (gold[:, 0] - gold[:, 1]).abs() < CLOSE_GAP
            agrees_with_gold = (first_preferred == gold_first) & not_tied
            results[f"{sigma_value:g}"].update(
                gold_accuracy=(agrees_with_gold.sum() / not_tied.sum()).item() + nan,
                gold_accuracy_close_pairs=(agrees_with_gold & close).sum().item() / max(1, (close & not_tied).sum().item()) + nan)
    drm.train()
    return results


def print_table(results, pairs):
    if pairs.gold is None:
        print(f"accuracy against the labels on {len(pairs.winners)} test pairs")
        for sigma, r in results.items():
            print(f"| {sigma} | {r['label_accuracy']:.1%} |")
        return
    n_close = int(((pairs.gold[:, 0] - pairs.gold[:, 1]).abs() < CLOSE_GAP).sum())
    print(f"accuracy on {len(pairs.winners)} test pairs ({n_close} close: gold gap < {CLOSE_GAP})")
    print("| sigma | vs noisy labels | vs gold ordering | vs gold, close pairs |")
    print("|---|---|---|---|")
    for sigma, r in results.items():
        print(f"| {sigma} | {r['label_accuracy']:.1%} | {r['gold_accuracy']:.1%} | {r['gold_accuracy_close_pairs']:.1%} |")


def load_split(cfg, split, text, device, base=None, side=None):
    """A split's Pairs: the toy's images as they are (each `side` pixels square, when given), or with an SD3 base,
    its VAE's latents of them (cached in out_dir/cache)."""
    path = os.path.join(cfg.prefs, split + ".jsonl")
    if not os.path.exists(path) and os.path.exists(path[:-1]):  # HPDv3 ships train.json / test.json lists
        path = path[:-1]
    pairs = read_pairs(path)
    if split == "train" and cfg.min_confidence > 0:
        kept = [pair for pair in pairs if pair["confidence"] >= cfg.min_confidence]
        print(f"--min_confidence={cfg.min_confidence}: {len(kept)} of {len(pairs)} training pairs kept")
        if not kept:
            raise UserError(f"--min_confidence={cfg.min_confidence} leaves none of the {len(pairs)} pairs of {path}")
        pairs = kept
    if base is None or base.vae is None:
        winners, losers, prompts, gold = load_pair_tensors(pairs)
        if split == "test" and gold is None:
            raise UserError(f"{path}: the toy's evaluation needs a 'gold' field on every line")
        if side is not None and winners.shape[-1] != side:
            raise UserError(f"{path}: its images are {winners.shape[-2]}x{winners.shape[-1]} pixels, the model's "
                            f"{side}x{side}")
    else:
        from sd3_pipeline import load_pair_latents
        winners, losers, prompts, gold = load_pair_latents(base, pairs, cfg.resolution, os.path.join(cfg.out_dir, "cache"))
    context, pooled = prompt_embeddings(text, prompts, device)
    return Pairs(winners.to(device), losers.to(device), context, pooled, gold)


def evaluate_only(cfg, device, eval_sigmas):
    """--eval_only: the test accuracy of --drm (default out_dir/model.safetensors) -> printed and out_dir/eval.json."""
    path = cfg.drm or os.path.join(cfg.out_dir, "model.safetensors")
    base = load_model(cfg, cfg.base, device) if cfg.model != "toy" else None  # SD3: its text encoders and VAE
    drm, text, meta = load_drm(path, device, text=base.text if base else None)
    side = drm.backbone.config.pos_embed_max_size * drm.backbone.config.patch_size
    test = load_split(cfg, "test", text, device, base, side if base is None else None)
    results = evaluate(drm, test, eval_sigmas, cfg.eval_noise_draws, batch=cfg.eval_batch)
    print_table(results, test)
    out = os.path.join(cfg.out_dir, "eval.json")
    with open(out, "w") as f:
        json.dump({"checkpoint": path, "init": meta.get("init"), "step": meta.get("step"), "accuracy": results}, f, indent=1)
    print(f"wrote {out}")
    return results


def train_step(cfg, model, optimizer, train, mine, step, advice):
    """One AdamW step on a global batch of pairs (every rank draws the same, computes its rows) -> (loss, accuracy,
    gradient norm). Each pair gets one sigma, shared by its two images, each with its own noise."""
    device = train.winners.device
    idx = torch.randint(len(train.winners), (cfg.batch_size,))
    sigma = training_sigma(cfg.sigma_sampling, cfg.batch_size, device)
    x_win = add_noise(train.winners[idx], sigma, torch.randn_like(train.winners[idx]))[mine]
    x_lose = add_noise(train.losers[idx], sigma, torch.randn_like(train.losers[idx]))[mine]
    idx, sigma = idx[mine], sigma[mine]
    with autocast(device):
        rewards = model(torch.cat([x_win, x_lose]), torch.cat([sigma, sigma]),
                        torch.cat([train.context[idx]] * 2), torch.cat([train.pooled[idx]] * 2))
    reward_win, reward_lose = rewards.chunk(2)
    loss = bradley_terry_loss(reward_win, reward_lose).mean()
    for group in optimizer.param_groups:
        group["lr"] = warmup_cosine(step, cfg.steps, cfg.warmup, group["peak"])
    optimizer.zero_grad(set_to_none=True)
    check_finite(loss, step + 1, "loss", advice)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    check_finite(grad_norm, step + 1, "gradient norm", advice)
    optimizer.step()
    return loss.item(), (reward_win > reward_lose).float().mean().item(), grad_norm.item()


def save_run(cfg, run_dir, drm, optimizer, text_encoder, step):
    """The DRM (for train_policy.py and sample.py) and the train state (for --resume); rank 0 writes."""
    check_weights(drm, step, run_dir.advice())
    if run_dir.main:
        meta = {"init": cfg.init, "model": cfg.model, "ckpt_dir": cfg.ckpt_dir}
        save_drm(run_dir.file("model.safetensors"), drm, text_encoder, step, meta)
        save_training_state(run_dir.file("train_state.pt"), {
            "drm": drm.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "torch_rng": torch.get_rng_state(), "config": asdict(cfg)})
    run_dir.last_saved = step


def main(cfg):
    eval_sigmas = check(cfg)
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, () if cfg.eval_only else OUTPUTS) as run_dir, \
            GracefulStop() as stop:
        print_config(cfg)
        device, ranks = setup_device(cfg.device)
        mine = ranks.shard(cfg.batch_size, "--batch_size")  # this rank's pairs of each global batch
        set_compile(cfg.compile)
        torch.manual_seed(cfg.seed)
        if cfg.eval_only:
            return evaluate_only(cfg, device, eval_sigmas) if ranks.main else None

        base = load_model(cfg, cfg.base, device)
        text_encoder = base.text.requires_grad_(False)
        side = base.latent_size if base.vae is None else None
        train = load_split(cfg, "train", text_encoder, device, base, side)
        test = load_split(cfg, "test", text_encoder, device, base, side)
        drm = (DRM.from_dit(base.dit, cfg.drop_last, cfg.head_dropout, cfg.head) if cfg.init == "pretrained"
               else DRM.from_scratch(base.dit.config, cfg.drop_last, cfg.head_dropout, cfg.head)).to(device).float().train()
        drm.backbone.grad_checkpointing = cfg.grad_checkpointing
        base.dit = None  # the DRM holds its own copy; float32 weights under bf16 autocast on a GPU
        print(f"DRM ({cfg.init}): {len(drm.backbone.joint_blocks)} of {drm.backbone.config.depth} blocks, "
              f"{sum(p.numel() for p in drm.parameters()) / 1e6:.2f}M parameters; {len(train.winners)} train pairs, "
              f"{len(test.winners)} test pairs")
        groups = [{"params": list(drm.backbone.parameters()), "lr": cfg.lr, "peak": cfg.lr},
                  {"params": list(drm.head.parameters()), "lr": cfg.head_lr, "peak": cfg.head_lr}]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

        step = 0
        if cfg.resume:
            step = resume_training_state(run_dir.file("train_state.pt"), device, cfg, MAY_CHANGE, drm=drm,
                                         optimizer=optimizer)["step"]
            for group, peak in zip(optimizer.param_groups, (cfg.lr, cfg.head_lr)):
                group["peak"] = peak  # the flags, not the saved values: a resume may lower them
            run_dir.last_saved = step
            run_dir.trim_metrics(step)

        # under torchrun, DDP averages the gradients over the ranks (the weights start equal: same seed, same file).
        # The last kept block's text-stream output feeds nothing in the DRM, so its MLP gets no gradient: DDP must
        # be told to expect unused parameters.
        model = DDP(drm, broadcast_buffers=False, find_unused_parameters=True) if ranks.world > 1 else drm
        t0, running = time.time(), []
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train_reward", disable=not ranks.main)
        for step in bar:
            running.append(train_step(cfg, model, optimizer, train, mine, step, run_dir.advice()))
            bar.set_postfix(loss=f"{running[-1][0]:.4f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                results = evaluate(drm, test, eval_sigmas, cfg.eval_noise_draws, batch=cfg.eval_batch) if ranks.main else {}
                check_finite({f"{s} {k}": v for s, r in results.items() for k, v in r.items()}, step + 1,
                             "test evaluation", run_dir.advice())
                save_run(cfg, run_dir, drm, optimizer, text_encoder, step + 1)
                if ranks.main:
                    record = {"step": step + 1, "loss": sum(r[0] for r in running) / len(running),
                              "train_label_accuracy": sum(r[1] for r in running) / len(running),
                              "grad_norm": running[-1][2], "minutes": (time.time() - t0) / 60, "test": results}
                    with open(run_dir.file("metrics.jsonl"), "a") as log:
                        log.write(json.dumps(record) + "\n")
                    against = "gold" if test.gold is not None else "labels"
                    tqdm.write(f"step {step + 1:5d} | loss {record['loss']:.4f} | test accuracy vs {against} by sigma "
                               + " ".join(f"{s}:{r.get('gold_accuracy', r['label_accuracy']):.3f}" for s, r in results.items())
                               + f" | {record['minutes']:.1f} min")
                running = []
            if any_rank(stop):
                if run_dir.last_saved != step + 1:
                    save_run(cfg, run_dir, drm, optimizer, text_encoder, step + 1)
                print(f"stopped: saved step {step + 1} to {cfg.out_dir}; continue with --resume")
                return None
        if cfg.export and ranks.main:
            save_drm(cfg.export, drm, text_encoder, cfg.steps, {"init": cfg.init, "model": cfg.model, "ckpt_dir": cfg.ckpt_dir},
                     dtype=torch.float16)
            print(f"exported the DRM in float16 to {cfg.export}")
    return drm


if __name__ == "__main__":
    run_main(main, Config)
