"""Train the Diffusion-based Reward Model on preference pairs (DRM, sec. 3, eq. 4).

    python data/preferences.py                                  # the pairs, out/prefs/ (4 minutes)
    python train_reward.py --export=data/drm.safetensors        # the shipped DRM
    python train_reward.py --init=scratch --out_dir=out/drm_scratch   # the ablation: no pretraining
    python train_reward.py --eval_only --ckpt=data/drm.safetensors    # accuracy per sigma -> eval.json
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

from common import (GracefulStop, ModelFlags, any_rank, autocast, check_finite, load_model, print_config,
                    resume_training_state, run_main, save_training_state, setup_device, warmup_cosine)
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
    eval_only: bool = False                # evaluate --ckpt (default out_dir/model.safetensors), write out_dir/eval.json, stop
    ckpt: str = ""
    export: str = ""                       # at the end, also write the DRM here in float16 (how data/drm.safetensors is made)
    resume: bool = False
    compile: bool = False                  # torch.compile each DiT block (fused elementwise ops; model.py)
    grad_checkpointing: bool = False       # recompute each block in the backward: less memory, ~1.3x the compute
    seed: int = 0
    device: str = "auto"


SIGMA_SAMPLING = ("logit_normal", "uniform", "zero")


def training_sigma(kind, n, device):
    """The noise levels the DRM trains at: SD3's logit-normal (the paper's choice), uniform, or 0 (a plain image RM)."""
    if kind == "logit_normal":
        return logit_normal_sigma(n, device)
    return torch.rand(n, device=device) if kind == "uniform" else torch.zeros(n, device=device)


def check(cfg):
    """Reject bad flag values before any work -> the evaluation sigmas."""
    if cfg.init not in ("pretrained", "scratch"):
        raise ValueError(f"--init={cfg.init}: choose pretrained or scratch")
    for name in ("steps", "batch_size", "eval_every", "eval_noise_draws", "eval_batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    try:
        sigmas = [float(v) for v in cfg.eval_sigmas.split(",")]
    except ValueError:
        raise ValueError(f"--eval_sigmas={cfg.eval_sigmas}: numbers separated by commas, e.g. 0,0.5,0.9") from None
    if not all(0 <= s <= 1 for s in sigmas):
        raise ValueError(f"--eval_sigmas={cfg.eval_sigmas}: every sigma must lie in [0, 1] (0 = clean, 1 = pure noise)")
    if cfg.head not in HEADS:
        raise ValueError(f"--head={cfg.head}: choose one of {', '.join(HEADS)}")
    if cfg.sigma_sampling not in SIGMA_SAMPLING:
        raise ValueError(f"--sigma_sampling={cfg.sigma_sampling}: choose one of {', '.join(SIGMA_SAMPLING)}")
    if not 0 <= cfg.min_confidence <= 1:
        raise ValueError(f"--min_confidence={cfg.min_confidence}: a probability in [0, 1] (0 keeps every pair)")
    if not 0 <= cfg.head_dropout < 1:
        raise ValueError(f"--head_dropout={cfg.head_dropout}: a probability in [0, 1)")
    return sigmas


def prompt_embeddings(text_encoder, prompts, device):
    """Encode each distinct prompt once -> (context, pooled) indexed like prompts."""
    distinct = sorted(set(prompts))
    (context, pooled), _ = encode_prompts(text_encoder, distinct)
    index = torch.tensor([distinct.index(p) for p in prompts], device=device)
    return context[index], pooled[index]


@torch.no_grad()
def evaluate(drm, data, device, sigmas, noise_draws=4, seed=1234, batch=256):
    """Pairwise accuracy on the test pairs at each sigma, against the labels and (the toy) gold -> {sigma: figures}."""
    drm.eval()
    winners, losers, context, pooled, gold = data
    g = torch.Generator().manual_seed(seed)
    results = {}
    for sigma_value in sigmas:
        margin = torch.zeros(len(winners))
        for _ in range(noise_draws):
            for i in range(0, len(winners), batch):
                w, l = winners[i:i + batch], losers[i:i + batch]
                sigma = torch.full((len(w),), sigma_value, device=device)
                x = torch.cat([add_noise(w, sigma, torch.randn(w.shape, generator=g).to(device)),
                               add_noise(l, sigma, torch.randn(l.shape, generator=g).to(device))])
                rewards = drm(x, torch.cat([sigma, sigma]), torch.cat([context[i:i + batch]] * 2),
                              torch.cat([pooled[i:i + batch]] * 2)).float().cpu()
                margin[i:i + len(w)] += (rewards[:len(w)] - rewards[len(w):]) / noise_draws
        first_preferred = margin > 0
        results[f"{sigma_value:g}"] = {"label_accuracy": first_preferred.float().mean().item()}
        if gold is not None:
            gold_first = gold[:, 0] > gold[:, 1]            # path1 (the labelled winner) is also gold's winner
            not_tied, close = gold[:, 0] != gold[:, 1], (gold[:, 0] - gold[:, 1]).abs() < CLOSE_GAP
            agrees_with_gold = (first_preferred == gold_first) & not_tied
            results[f"{sigma_value:g}"].update(
                gold_accuracy=(agrees_with_gold.sum() / not_tied.sum()).item(),
                gold_accuracy_close_pairs=(agrees_with_gold & close).sum().item() / max(1, (close & not_tied).sum().item()))
    drm.train()
    return results


def print_table(results, data):
    gold = data[4]
    if gold is None:
        print(f"accuracy against the labels on {len(data[0])} test pairs")
        for sigma, r in results.items():
            print(f"| {sigma} | {r['label_accuracy']:.1%} |")
        return
    n_close = int(((gold[:, 0] - gold[:, 1]).abs() < CLOSE_GAP).sum())
    print(f"accuracy on {len(data[0])} test pairs ({n_close} close: gold gap < {CLOSE_GAP})")
    print("| sigma | vs noisy labels | vs gold ordering | vs gold, close pairs |")
    print("|---|---|---|---|")
    for sigma, r in results.items():
        print(f"| {sigma} | {r['label_accuracy']:.1%} | {r['gold_accuracy']:.1%} | {r['gold_accuracy_close_pairs']:.1%} |")


def load_split(cfg, split, text, device, base=None):
    """A split's pairs -> (winners, losers, context, pooled, gold or None): the toy's images as they are, or
    with an SD3 base, its VAE's latents of them (cached in out_dir/cache)."""
    path = os.path.join(cfg.prefs, split + ".jsonl")
    if not os.path.exists(path) and os.path.exists(path[:-1]):  # HPDv3 ships train.json / test.json lists
        path = path[:-1]
    pairs = read_pairs(path)
    if split == "train" and cfg.min_confidence > 0:
        kept = [pair for pair in pairs if pair["confidence"] >= cfg.min_confidence]
        print(f"--min_confidence={cfg.min_confidence}: {len(kept)} of {len(pairs)} training pairs kept")
        if not kept:
            raise ValueError(f"--min_confidence={cfg.min_confidence} leaves none of the {len(pairs)} pairs of {path}")
        pairs = kept
    if base is None or base.vae is None:
        winners, losers, prompts, gold = load_pair_tensors(pairs)
        if split == "test" and gold is None:
            raise ValueError(f"{path}: the toy's evaluation needs a 'gold' field on every line")
    else:
        from sd3_pipeline import load_pair_latents
        winners, losers, prompts, gold = load_pair_latents(base, pairs, cfg.resolution, os.path.join(cfg.out_dir, "cache"))
    context, pooled = prompt_embeddings(text, prompts, device)
    return winners.to(device), losers.to(device), context, pooled, gold


def main(cfg):
    eval_sigmas = check(cfg)
    print_config(cfg)
    device, ranks = setup_device(cfg.device)
    mine = ranks.shard(cfg.batch_size, "--batch_size")  # this rank's pairs of each global batch
    set_compile(cfg.compile)
    torch.manual_seed(cfg.seed)

    if cfg.eval_only:
        if not ranks.main:
            return None
        path = cfg.ckpt or os.path.join(cfg.out_dir, "model.safetensors")
        base = load_model(cfg, cfg.base, device) if cfg.model != "toy" else None  # SD3: its text encoders and VAE
        drm, text, meta = load_drm(path, device, text=base.text if base else None)
        test = load_split(cfg, "test", text, device, base)
        results = evaluate(drm, test, device, eval_sigmas, cfg.eval_noise_draws, batch=cfg.eval_batch)
        print_table(results, test)
        out = os.path.join(cfg.out_dir, "eval.json")
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(out, "w") as f:
            json.dump({"checkpoint": path, "init": meta.get("init"), "step": meta.get("step"), "accuracy": results}, f, indent=1)
        print(f"wrote {out}")
        return results

    base = load_model(cfg, cfg.base, device)
    text_encoder = base.text.requires_grad_(False)
    train = load_split(cfg, "train", text_encoder, device, base)
    test = load_split(cfg, "test", text_encoder, device, base)
    drm = (DRM.from_dit(base.dit, cfg.drop_last, cfg.head_dropout, cfg.head) if cfg.init == "pretrained"
           else DRM.from_scratch(base.dit.config, cfg.drop_last, cfg.head_dropout, cfg.head)).to(device).float().train()
    drm.backbone.grad_checkpointing = cfg.grad_checkpointing
    base.dit = None  # the DRM holds its own copy; float32 weights under bf16 autocast on a GPU
    n_params = sum(p.numel() for p in drm.parameters())
    print(f"DRM ({cfg.init}): {len(drm.backbone.joint_blocks)} of {drm.backbone.config.depth} blocks, "
          f"{n_params / 1e6:.2f}M parameters; {len(train[0])} train pairs, {len(test[0])} test pairs")
    groups = [{"params": list(drm.backbone.parameters()), "lr": cfg.lr, "peak": cfg.lr},
              {"params": list(drm.head.parameters()), "lr": cfg.head_lr, "peak": cfg.head_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    state_path = os.path.join(cfg.out_dir, "train_state.pt")
    step = 0
    if cfg.resume:
        step = resume_training_state(state_path, device, drm=drm, optimizer=optimizer)["step"]

    # under torchrun, DDP averages the gradients over the ranks (the weights start equal: same seed, same file).
    # The last kept block's text-stream output feeds nothing in the DRM, so its MLP gets no gradient: DDP must
    # be told to expect unused parameters.
    model = DDP(drm, broadcast_buffers=False, find_unused_parameters=True) if ranks.world > 1 else drm

    def save(step):
        if not ranks.main:
            return
        save_drm(os.path.join(cfg.out_dir, "model.safetensors"), drm, text_encoder, step, {"init": cfg.init, "model": cfg.model, "ckpt_dir": cfg.ckpt_dir})
        save_training_state(state_path, {"drm": drm.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                         "torch_rng": torch.get_rng_state(), "config": asdict(cfg)})

    os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "metrics.jsonl") if ranks.main else os.devnull, "a")
    winners, losers, context, pooled, _ = train
    t0, running = time.time(), []
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train_reward", disable=not ranks.main)
    with GracefulStop() as stop, log:
        for step in bar:
            # the global batch's pairs, sigmas and noise (the same draws on every rank), then this rank's rows
            idx = torch.randint(len(winners), (cfg.batch_size,))
            sigma = training_sigma(cfg.sigma_sampling, cfg.batch_size, device)  # one per pair, shared by its two images
            x_win = add_noise(winners[idx], sigma, torch.randn_like(winners[idx]))[mine]
            x_lose = add_noise(losers[idx], sigma, torch.randn_like(losers[idx]))[mine]
            idx, sigma = idx[mine], sigma[mine]
            with autocast(device):
                rewards = model(torch.cat([x_win, x_lose]), torch.cat([sigma, sigma]),
                                torch.cat([context[idx]] * 2), torch.cat([pooled[idx]] * 2))
            reward_win, reward_lose = rewards.chunk(2)
            loss = bradley_terry_loss(reward_win, reward_lose).mean()
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, cfg.steps, cfg.warmup, group["peak"])
            optimizer.zero_grad(set_to_none=True)
            check_finite(loss, step + 1, cfg.out_dir)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(drm.parameters(), cfg.grad_clip)
            check_finite(grad_norm, step + 1, cfg.out_dir, "gradient norm")
            optimizer.step()
            running.append((loss.item(), (reward_win > reward_lose).float().mean().item()))
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if ranks.main and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                results = evaluate(drm, test, device, eval_sigmas, cfg.eval_noise_draws, batch=cfg.eval_batch)
                record = {"step": step + 1, "loss": sum(r[0] for r in running) / len(running),
                          "train_label_accuracy": sum(r[1] for r in running) / len(running),
                          "grad_norm": grad_norm.item(), "minutes": (time.time() - t0) / 60, "test": results}
                running = []
                save(step + 1)
                log.write(json.dumps(record) + "\n")
                log.flush()
                against = "gold" if test[4] is not None else "labels"
                tqdm.write(f"step {step + 1:5d} | loss {record['loss']:.4f} | test accuracy vs {against} by sigma "
                           + " ".join(f"{s}:{r.get('gold_accuracy', r['label_accuracy']):.3f}" for s, r in results.items())
                           + f" | {record['minutes']:.1f} min")
            if any_rank(stop):
                save(step + 1)
                print(f"stopped: saved step {step + 1} to {cfg.out_dir}; continue with --resume")
                return None
    if cfg.export and ranks.main:
        save_drm(cfg.export, drm, text_encoder, cfg.steps, {"init": cfg.init, "model": cfg.model, "ckpt_dir": cfg.ckpt_dir}, dtype=torch.float16)
        print(f"exported the DRM in float16 to {cfg.export}")
    return drm


if __name__ == "__main__":
    run_main(main, Config)
