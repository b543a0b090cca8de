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
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from base import ModelFlags, check_model_flags, load_base
from common import (UserError, any_rank, autocast, check_at_least, check_choice, check_numbers,
                    given_flags, parse_numbers, print_config, run_main, setup_device, warmup_cosine)
from checkpoints import (GracefulStop, RunDir, atomic_write, check_finite, check_weights,
                         resume_training_state, save_training_state)
from data.pairs import gold_scores, read_pairs
from model import add_noise, compile_regions, logit_normal_sigma
from reward import DRM, HEADS, default_head
from rivals.reward import LOSSES, EnsembleFlags, check_ensemble, with_ensemble
from sde import sigma_schedule

CLOSE_GAP = 0.1  # gold gap under which a pair counts as close
OFFICIAL_HEADS = ("2BConvGN", "7BConvGN")


@dataclass
class Config(ModelFlags, EnsembleFlags):  # where the DRM starts (base.py); the rival's flags
    prefs: str = "out/prefs"           # train.jsonl and test.jsonl (or HPDv3's .json lists)
    # the defaults: "" = the base's (SD3: drm, the DRM repository's recipe, RECIPES; the toy: toy);
    # a flag given on the command line keeps its value
    recipe: str = ""
    # train only on pairs whose confidence is at least this (the DRM repository's loader: 0.95);
    # evaluation keeps every pair
    min_confidence: float = 0.0
    out_dir: str = "out/drm"
    init: str = "pretrained"           # pretrained (the paper) | scratch (random weights)
    head: str = ""                     # "" = the base's: conv (the toy's, scaled down) | 2BConvGN
                                       # (24 blocks) | 7BConvGN (38: the DRM repository's) | token
    drop_last: int = 0                 # DiT blocks cut from the end (0: the head's, 3; 7BConvGN 5)
    head_dropout: float = 0.1          # dropout before the head's last linear layer
    # grid (the DRM repository's: logit-normal u indexing the shifted 1000-step grid) | grid_uniform
    # (its --uniform) | logit_normal (sigma itself, unshifted) | uniform | zero (clean images)
    sigma_sampling: str = "grid"
    # the grid's shift (0: the base's scheduler's, SD3.5 3, toy 1)
    sigma_shift: float = 0.0
    pair_noise: str = "independent"    # independent (each image its own noise: the paper) | shared
                                       # (one noise for both images of a pair: DiNa-LRM's)
    loss: str = "bt"                   # bt (Bradley-Terry, the paper) | thurstone (DiNa-LRM's:
                                       # rivals/reward.py's LOSSES)
    train_steps: int = 2000            # optimizer steps
    batch_size: int = 64               # pairs per step
    lr: float = 1e-4                   # backbone learning rate (AdamW)
    head_lr: float = 1e-3              # the new head learns faster
    weight_decay: float = 0.01
    warmup: int = 100
    lr_schedule: str = "cosine"        # cosine (after the warm-up) | constant
    grad_clip: float = 1.0
    image_resize: str = "crop"         # SD3: crop (the shorter side to --resolution, the centre) |
                                       # stretch (to a square, the DRM repository's)
    vae_latents: str = "mode"          # SD3: mode (the posterior mean) | sample (a draw each use)
    t5_tokens: int = 256               # SD3: T5's padded length for the DRM's prompts
    eval_every: int = 1000
    eval_noise_draws: int = 2          # noise draws per test pair and sigma, averaged
    eval_sigmas: str = "0,0.25,0.5,0.75,0.9"  # the noise levels test accuracy is measured at
    # and the DRM repository's: its `time` t on the base's grid, sigma = bend(t / 1000), t = 0 clean
    # (scheduler.timesteps[-t]; SD3.5: t = 750 is sigma 0.9), e.g. 0,250,500,750,900
    eval_times: str = ""
    eval_batch: int = 256              # test pairs scored at a time
    eval_only: bool = False            # evaluate --drm (default: out_dir's) -> out_dir/eval.json
    # what --eval_only scores: prefs (the test pairs) | policy (the toy: pairs of the base's own
    # samples, and the DRM's ranking of SDE candidates by step; bench/drm_on_policy.py)
    eval_set: str = "prefs"
    drm: str = ""                      # with --eval_only: the DRM checkpoint to evaluate
    # at the end, the DRM here (ours: float16, data/drm.safetensors)
    export: str = ""
    # ours | official (the DRM repository's model.safetensors, which
    export_layout: str = "ours"
                                       # its DRMRewardModel loads strictly; float32)
    resume: bool = False               # continue out_dir's run (MAY_CHANGE below may change)
    overwrite: bool = False            # start afresh in a used out_dir (its run's files removed)
    compile: bool = False              # torch.compile the DRM's blocks (model.py)
    grad_checkpointing: bool = False   # re-run each block in the backward: less memory
    seed: int = 0
    device: str = "auto"
    RENAMED = {"steps": "train_steps"}  # flags of earlier versions


SIGMA_SAMPLING = ("grid", "grid_uniform", "logit_normal", "uniform", "zero")
# the DRM repository's recipe (drm/train.py, dataset.py, scripts/train_sd35_medium.sh): the values
# that differ from the toy's defaults
RECIPES = {"toy": {}, "drm": dict(
    min_confidence=0.95, batch_size=16, lr=1e-5, head_lr=1e-5, weight_decay=1e-4, warmup=0,
    lr_schedule="constant", image_resize="stretch", vae_latents="sample", t5_tokens=512)}
# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "head_lr", "train_steps", "eval_every", "eval_batch", "device", "compile",
              "grad_checkpointing", "export"}
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors")  # a run's files


def with_recipe(cfg):
    """cfg with --recipe's values in place of the toy's defaults it left ("": drm on SD3, toy on the
    toy)."""
    check_choice(cfg, "recipe", ("", *RECIPES))
    recipe = cfg.recipe or ("toy" if cfg.model == "toy" else "drm")
    given = given_flags(cfg)
    return dataclasses.replace(cfg, recipe=recipe,
                               **{k: v for k, v in RECIPES[recipe].items() if k not in given})


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


def check(cfg):
    """Reject bad flag values before any work."""
    check_numbers(cfg)
    check_choice(cfg, "init", ("pretrained", "scratch"))
    check_choice(cfg, "head", ("", *HEADS))
    check_choice(cfg, "lr_schedule", ("cosine", "constant"))
    check_choice(cfg, "image_resize", ("crop", "stretch"))
    check_choice(cfg, "vae_latents", ("mode", "sample"))
    check_choice(cfg, "export_layout", ("ours", "official"))
    check_at_least(cfg, 0, "drop_last", "warmup")
    check_at_least(cfg, 1, "t5_tokens")
    if not cfg.sigma_shift >= 0:
        raise UserError(f"--sigma_shift={cfg.sigma_shift}: a shift > 0, or 0 for the base's own")
    times = parse_numbers(cfg, "eval_times")
    if not all(0 <= t < 1000 for t in times):
        raise UserError(f"--eval_times={cfg.eval_times}: indices in [0, 1000) of the 1000-step "
                        "grid")
    check_choice(cfg, "sigma_sampling", SIGMA_SAMPLING)
    check_choice(cfg, "loss", tuple(LOSSES))
    check_ensemble(cfg)
    check_choice(cfg, "pair_noise", ("independent", "shared"))
    check_choice(cfg, "eval_set", ("prefs", "policy"))
    if cfg.eval_set == "policy" and not (cfg.eval_only and cfg.model == "toy"):
        raise UserError("--eval_set=policy scores the toy's own samples with its annotator: use "
                        "it with --eval_only on --model=toy")
    check_at_least(cfg, 1, "train_steps", "batch_size", "eval_every", "eval_noise_draws",
                   "eval_batch")
    sigmas = parse_numbers(cfg, "eval_sigmas", float)
    if not sigmas or not all(0 <= s <= 1 for s in sigmas):
        raise UserError(f"--eval_sigmas={cfg.eval_sigmas}: every sigma must lie in [0, 1] "
                        "(0 = clean, 1 = pure noise)")
    if not 0 <= cfg.min_confidence <= 1:
        raise UserError(f"--min_confidence={cfg.min_confidence}: a probability in [0, 1] "
                        "(0 keeps every pair)")
    if not 0 <= cfg.head_dropout < 1:
        raise UserError(f"--head_dropout={cfg.head_dropout}: a probability in [0, 1)")


@dataclass
class Pairs:
    """A split's preference pairs as tensors: path1 (the labelled winner) and path2 of each, its
    prompt, and (the toy) the two gold scores, which only evaluation reads. Embeddings are kept
    once per distinct prompt, and on the CPU (a batch's go to the device)."""
    winners: torch.Tensor       # (N, C, H, W)
    losers: torch.Tensor        # (N, C, H, W)
    prompt: torch.Tensor        # (N,): each pair's row of context and pooled
    context: torch.Tensor       # (P, L, context_dim), P distinct prompts
    pooled: torch.Tensor        # (P, pooled_dim)
    gold: torch.Tensor | None   # (N, 2) or None
    # SD3, --vae_latents=sample: the posteriors' stds (winners', losers')
    stds: tuple | None = None

    def images(self, rows, generator=None):
        """The (winners, losers) of `rows`: the posterior means, or a draw from each posterior."""
        chosen = [self.winners[rows], self.losers[rows]]
        if self.stds is not None:
            chosen = [mean + std[rows] * torch.randn(mean.shape, generator=generator).to(mean)
                      for mean, std in zip(chosen, self.stds)]
        return chosen

    def text(self, rows, device):
        """(context, pooled) of the pairs `rows` (a tensor or a slice) on `device`."""
        index = self.prompt[rows]
        return self.context[index].to(device), self.pooled[index].to(device)


def load_split(cfg, split, base, text, device):
    """A split's Pairs as the base model takes them (the toy: its images; SD3: their VAE latents,
    cached in out_dir/cache); training pairs below --min_confidence are dropped."""
    path = os.path.join(cfg.prefs, split + ".jsonl")
    if not os.path.exists(path) and os.path.exists(path[:-1]):  # HPDv3's train.json / test.json
        path = path[:-1]
    pairs = read_pairs(path)
    if split == "train" and cfg.min_confidence > 0:
        kept = [pair for pair in pairs if pair["confidence"] >= cfg.min_confidence]
        print(f"--min_confidence={cfg.min_confidence}: {len(kept)} of {len(pairs)} pairs kept")
        if not kept:
            raise UserError(f"--min_confidence={cfg.min_confidence} leaves none of the "
                            f"{len(pairs)} pairs of {path}")
        pairs = kept
    (winners, losers), stds = base.pair_tensors(pairs, os.path.join(cfg.out_dir, "cache"),
                                                cfg.image_resize)
    if cfg.vae_latents == "mode":
        stds = None
    distinct = sorted({pair["prompt"] for pair in pairs})  # each prompt encoded once
    base.prepare(distinct, os.path.join(cfg.out_dir, "cache"), text)  # SD3: embedded once, cached
    row = {prompt: i for i, prompt in enumerate(distinct)}
    context, pooled = text.encode(distinct)
    rows = torch.tensor([row[pair["prompt"]] for pair in pairs])
    return Pairs(winners.to(device), losers.to(device), rows, context.cpu(), pooled.cpu(),
                 gold_scores(pairs), stds and tuple(t.to(device) for t in stds))


@torch.no_grad()
def evaluate(drm, pairs, sigmas, noise_draws=4, seed=1234, batch=256):
    """Pairwise accuracy on the test pairs at each (label, sigma) of `sigmas`, against the labels
    and (the toy) gold -> {label: figures}. A non-finite score makes the accuracies NaN: the run
    stops, nothing saved."""
    drm.eval()
    device, n = pairs.winners.device, len(pairs.winners)
    g = torch.Generator().manual_seed(seed)
    results = {}
    for label, sigma_value in sigmas:
        margin = torch.zeros(n)
        for _ in range(noise_draws):
            for i in range(0, n, batch):
                w, l = pairs.images(slice(i, i + batch), g)
                sigma = torch.full((len(w),), sigma_value, device=device)
                x = torch.cat([add_noise(w, sigma, torch.randn(w.shape, generator=g).to(device)),
                               add_noise(l, sigma, torch.randn(l.shape, generator=g).to(device))])
                text = (torch.cat([t] * 2) for t in pairs.text(slice(i, i + batch), device))
                rewards = drm(x, torch.cat([sigma, sigma]), *text).float().cpu()
                margin[i:i + len(w)] += (rewards[:len(w)] - rewards[len(w):]) / noise_draws
        first = margin > 0
        nan = 0.0 if torch.isfinite(margin).all() else float("nan")
        result = results[label] = {"label_accuracy": first.float().mean().item() + nan}
        if pairs.gold is not None:
            gold = pairs.gold
            not_tied, close = gold[:, 0] != gold[:, 1], (gold[:, 0] - gold[:, 1]).abs() < CLOSE_GAP
            right = (first == (gold[:, 0] > gold[:, 1])) & not_tied  # agrees with gold's order
            result["gold_accuracy"] = (right.sum() / not_tied.sum()).item() + nan
            result["gold_accuracy_close_pairs"] = ((right & close).sum().item() + nan
                                                   ) / max(1, (close & not_tied).sum().item())
    drm.train()
    return results


def policy_split(base, text, device):
    """--eval_set=policy: Pairs of the base's own samples, each pair of 8 of a training prompt."""
    from bench.drm_on_policy import policy_pairs
    prompts = base.train_prompts("")
    winners, losers, pair_prompts, gold = policy_pairs(base, prompts)
    context, pooled = text.encode(prompts)
    row = {prompt: i for i, prompt in enumerate(prompts)}
    rows = torch.tensor([row[p] for p in pair_prompts])
    return Pairs(winners.to(device), losers.to(device), rows, context.cpu(), pooled.cpu(), gold)


def evaluate_only(cfg, device):
    """--eval_only: the test accuracy of --drm (default out_dir's) as a table and eval.json; with
    --eval_set=policy on the base's own samples, and the DRM's ranking of SDE candidates by step."""
    path = cfg.drm or os.path.join(cfg.out_dir, "model.safetensors")
    base = load_base(cfg, device)
    drm, text, meta = base.load_drm(path, device)
    drm = with_ensemble(drm, cfg.drm_draws, cfg.drm_sigma)
    pairs = (policy_split(base, text, device) if cfg.eval_set == "policy"
             else load_split(cfg, "test", base, text, device))
    sigmas = evaluation_sigmas(cfg, cfg.sigma_shift or base.shift)
    results = evaluate(drm, pairs, sigmas, cfg.eval_noise_draws, batch=cfg.eval_batch)
    columns = list(next(iter(results.values())))
    what = "the base's own samples, pairs within a prompt" if cfg.eval_set == "policy" else "test"
    print(f"{what}: accuracy of {path} (close pairs: a gold gap under {CLOSE_GAP})")
    print("| sigma | " + " | ".join(columns) + " |\n|---" + "|---" * len(columns) + "|")
    for sigma, result in results.items():
        print(f"| {sigma} | " + " | ".join(f"{result[c]:.1%}" for c in columns) + " |")
    ranking = None
    if cfg.eval_set == "policy":
        from bench.drm_on_policy import candidate_ranking
        ranking = candidate_ranking(base, drm, text, base.train_prompts("")[::2])
        print("Spearman of the DRM's ranking of k = 8 SDE candidates against their ODE "
              "completions' gold, mean ± s.e. over 40 rollouts")
        print("| step | sigma -> sigma_next | noisy (the paper) | x0 estimate |\n|---|---|---|---|")
        sigmas = sigma_schedule(len(ranking["noisy"]))
        for i, (noisy, x0) in enumerate(zip(ranking["noisy"], ranking["x0"])):
            print(f"| {i} | {sigmas[i]:.3f} -> {sigmas[i + 1]:.3f} | {noisy[0]:+.3f} ± "
                  f"{noisy[1]:.3f} | {x0[0]:+.3f} ± {x0[1]:.3f} |")
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"checkpoint": path, "init": meta.get("init"), "step": meta.get("step"),
                   "eval_set": cfg.eval_set, "accuracy": results, "candidate_ranking": ranking}, f,
                  indent=1)
    return results


def train_step(cfg, model, optimizer, train, mine, step, advice):
    """One AdamW step on a global batch of pairs (every rank draws the same, computes its rows) ->
    (loss, accuracy, gradient norm). Each pair gets one sigma, shared by its two images."""
    device = train.winners.device
    idx = torch.randint(len(train.winners), (cfg.batch_size,))
    sigma = training_sigma(cfg.sigma_sampling, cfg.batch_size, device, cfg.sigma_shift)
    winners, losers = train.images(idx)
    noise_win = torch.randn_like(winners)
    noise_lose = noise_win if cfg.pair_noise == "shared" else torch.randn_like(losers)
    x_win = add_noise(winners, sigma, noise_win)[mine]
    x_lose = add_noise(losers, sigma, noise_lose)[mine]
    idx, sigma = idx[mine], sigma[mine]
    with autocast(device):
        rewards = model(torch.cat([x_win, x_lose]), torch.cat([sigma, sigma]),
                        *(torch.cat([t] * 2) for t in train.text(idx, device)))
    reward_win, reward_lose = rewards.chunk(2)
    loss = LOSSES[cfg.loss](reward_win, reward_lose, sigma).mean()
    for group in optimizer.param_groups:
        group["lr"] = (warmup_cosine(step, cfg.train_steps, cfg.warmup, group["peak"])
                       if cfg.lr_schedule == "cosine" else group["peak"] * min(1, (step + 1) /
                                                                              (cfg.warmup + 1)))
    optimizer.zero_grad(set_to_none=True)
    check_finite(loss, step + 1, "loss", advice)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    check_finite(grad_norm, step + 1, "gradient norm", advice)
    optimizer.step()
    return loss.item(), (reward_win > reward_lose).float().mean().item(), grad_norm.item()


def evaluate_and_save(cfg, run_dir, base, drm, optimizer, test, eval_sigmas, *, step, running,
                      minutes):
    """Test accuracy; refuse to save a diverged DRM; save the DRM and train state; log one line."""
    results = evaluate(with_ensemble(drm, cfg.drm_draws, cfg.drm_sigma), test, eval_sigmas,
                       cfg.eval_noise_draws, batch=cfg.eval_batch
                       ) if run_dir.main else {}
    figures = {f"{sigma} {key}": value for sigma, r in results.items() for key, value in r.items()}
    check_finite(figures, step, "test evaluation", run_dir.advice())
    save_run(cfg, run_dir, base, drm, optimizer, step)
    if run_dir.main:
        record = {"step": step, "loss": sum(r[0] for r in running) / len(running),
                  "train_label_accuracy": sum(r[1] for r in running) / len(running),
                  "grad_norm": running[-1][2], "minutes": minutes, "test": results}
        with open(run_dir.file("metrics.jsonl"), "a") as log:
            log.write(json.dumps(record) + "\n")
        key = "gold_accuracy" if test.gold is not None else "label_accuracy"
        tqdm.write(f"step {step:5d} | loss {record['loss']:.4f} | test {key} by sigma "
                   + " ".join(f"{s}:{r[key]:.3f}" for s, r in results.items())
                   + f" | {minutes:.1f} min")


def save_run(cfg, run_dir, base, drm, optimizer, step):
    """The DRM (for train_policy.py and sample.py) and the train state (for --resume)."""
    check_weights(drm, step, run_dir.advice())
    if run_dir.main:
        base.save_drm(run_dir.file("model.safetensors"), drm, step, drm_meta(cfg))
        save_training_state(run_dir.file("train_state.pt"), {
            "drm": drm.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "torch_rng": torch.get_rng_state(), "config": asdict(cfg)})
    run_dir.last_saved = step


def export(cfg, base, drm, skipped):
    """--export: ours (float16, with what the base keeps beside it) or the DRM repository's
    layout."""
    if cfg.export_layout == "official":
        from sd3.mmdit import official_drm_tensors
        tensors = official_drm_tensors(drm, skipped)
        atomic_write(cfg.export, lambda tmp: save_file(tensors, tmp))
    else:
        base.save_drm(cfg.export, drm, cfg.train_steps, drm_meta(cfg), dtype=torch.float16)
    print(f"exported the DRM ({cfg.export_layout} layout) to {cfg.export}")


def drm_meta(cfg):
    """What a saved DRM records beside its weights: its init, and (SD3) the T5 length it reads."""
    return {"init": cfg.init, **({"t5_tokens": cfg.t5_tokens} if cfg.model != "toy" else {})}


def main(cfg):
    cfg = with_recipe(cfg)
    check(cfg)
    check_model_flags(cfg)
    if cfg.export_layout == "official" and cfg.model == "toy":
        raise UserError("--export_layout=official writes the DRM repository's model, with its "
                        "2BConvGN / 7BConvGN head on an SD3 base: give --model and --ckpt_dir")
    outputs = () if cfg.eval_only else OUTPUTS
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, outputs) as run_dir, GracefulStop() as stop:
        print_config(cfg)
        device, ranks = setup_device(cfg.device)
        mine = ranks.shard(cfg.batch_size, "--batch_size")  # this rank's pairs of each batch
        torch.manual_seed(cfg.seed)
        if cfg.eval_only:
            return evaluate_only(cfg, device) if ranks.main else None
        base = load_base(cfg, device)
        cfg = dataclasses.replace(cfg, sigma_shift=cfg.sigma_shift or base.shift)
        eval_sigmas = evaluation_sigmas(cfg, cfg.sigma_shift)
        text = base.drm_text(cfg.t5_tokens)  # SD3: T5 padded to --t5_tokens
        train, test = (load_split(cfg, s, base, text, device) for s in ("train", "test"))
        head = cfg.head or default_head(base.dit.config.depth)
        if cfg.export_layout == "official" and head not in OFFICIAL_HEADS:
            raise UserError(f"--export_layout=official: the DRM repository's model has the "
                            f"2BConvGN / 7BConvGN head, this one --head={head}")
        layers = (cfg.drop_last or None, cfg.head_dropout, head)
        drm = (DRM.from_dit(base.dit, *layers) if cfg.init == "pretrained"
               else DRM.from_scratch(base.dit.config, *layers)).to(device).float().train()
        # the base's blocks the DRM cut, for an official export
        kept = len(drm.backbone.joint_blocks)
        skipped = ({k: v.cpu() for k, v in base.dit.state_dict().items()
                    if k.startswith("joint_blocks.") and int(k.split(".")[1]) >= kept}
                   if cfg.export_layout == "official" else {})
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
        step = 0
        if cfg.resume:
            step = resume_training_state(run_dir.file("train_state.pt"), device, cfg, MAY_CHANGE,
                                         drm=drm, optimizer=optimizer)["step"]
            for group, peak in zip(optimizer.param_groups, (cfg.lr, cfg.head_lr)):
                group["peak"] = peak  # the flags, not the saved values: a resume may lower them
            run_dir.last_saved = step
            run_dir.trim_metrics(step)
        # under torchrun, DDP averages the gradients over the ranks (the weights start equal). The
        # last kept block's text-stream output feeds nothing in the DRM, so its MLP gets no
        # gradient: DDP must be told to expect unused parameters.
        model = (DDP(drm, broadcast_buffers=False, find_unused_parameters=True) if ranks.world > 1
                 else drm)
        t0, running = time.time(), []
        bar = tqdm(range(step, cfg.train_steps), initial=step, total=cfg.train_steps,
                   desc="train_reward", disable=not ranks.main)
        for step in bar:
            running.append(train_step(cfg, model, optimizer, train, mine, step, run_dir.advice()))
            bar.set_postfix(loss=f"{running[-1][0]:.4f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
                evaluate_and_save(cfg, run_dir, base, drm, optimizer, test, eval_sigmas,
                                  step=step + 1, running=running, minutes=(time.time() - t0) / 60)
                running = []
            if any_rank(stop):
                if run_dir.last_saved != step + 1:
                    save_run(cfg, run_dir, base, drm, optimizer, step + 1)
                print(f"stopped: saved step {step + 1} to {cfg.out_dir}; continue with --resume")
                return None
        if cfg.export and ranks.main:
            export(cfg, base, drm, skipped)
    return drm


if __name__ == "__main__":
    run_main(main, Config)
