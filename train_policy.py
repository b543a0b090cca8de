"""Fine-tune the DiT with GRPO against the DRM: step-wise credit (the paper), or its rivals.

    python train_policy.py                           # step-wise GRPO on the CPU toy (3 min)
    python train_policy.py --credit=sparse           # Flow-GRPO: terminal reward on every step
    python train_policy.py --credit=cosine           # CoCA: terminal reward spread by cosine credit
    python train_policy.py --credit=tree --split_steps=0,3,6 --branch=2   # BranchGRPO's trees
    python train_policy.py --sde_window=2:6          # SDE and training at steps 2..5 only
    python train_policy.py --resume                  # continue an interrupted run
    torchrun --nproc_per_node=8 train_policy.py      # DDP: the rollouts split over 8 processes
    torchrun --nproc_per_node=8 train_policy.py --fsdp   # FSDP: the weights too (large models)
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --resolution=512 --prompts=prompts.txt --drm=out/drm/model.safetensors --lora_rank=16

One update: `trajectories` SDE rollouts on training prompts, DRM rewards, advantages (grpo.py),
then `minibatches` AdamW steps on the PPO-clipped loss over the rollout's (step, trajectory)
pairs (a window's or a tree's: those it marks). DiT passes are counted (`--max_nfe` gives every
mode one budget; DRM passes apart): stepwise draws k candidates per step from one policy mean,
sparse and cosine run groups of `group_size` trajectories per prompt, a tree branch^splits
leaves per prompt whose shared prefixes run once. Every `eval_every` updates: ODE samples of the
held-out prompts with fixed seeds, scored by the DRM and, in the toy, by the simulated annotator
(gold, never seen in training); one JSON line in OUT_DIR/metrics.jsonl, a grid PNG, a checkpoint.
"""
import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from base import ModelFlags, check_model_flags, load_base
from common import (GracefulStop, RunDir, UserError, any_rank, autocast, check_at_least,
                    check_choice, check_finite, check_numbers, check_resumed_config, count_flops,
                    check_state_fits, check_weights, load_training_state, parse_numbers,
                    frozen_dtype, print_config, run_main, save_grid, save_training_state,
                    setup_device)
from grpo import (CREDIT_MODES, SCORES, credit_advantages, grpo_loss, sample_rollout, sample_tree,
                  take, trained_steps)
from model import add_lora, compile_regions, in_chunks
from reward import drm_passes, with_ensemble
from sample import evaluate, initial_noise, sigma_schedule

# checkpoints hold whole tensors on the CPU (gathered from the ranks' shards under --fsdp), so any
# number of processes, or one, can resume them
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Config(ModelFlags):              # --model, --base, --ckpt_dir, ...: where the policy starts
    drm: str = "data/drm.safetensors"  # the reward model
    drm_draws: int = 1                 # its noise ensemble (reward.NoiseEnsemble): states below
    drm_sigma: float = 0.0             # drm_sigma re-noised to it drm_draws times, scores averaged
    prompts: str = ""                  # training prompts, one a line (the toy's default: its 80)
    eval_prompts: str = ""             # held-out prompts (the toy: its 10; SD3: 8 of --prompts)
    out_dir: str = "out/policy"
    credit: str = "stepwise"           # stepwise (the paper) | sparse (Flow-GRPO) | cosine (CoCA)
                                       # | tree (BranchGRPO)
    # stepwise: what the DRM scores (grpo.score_candidates): noisy (x_next, the paper) | x0 (its
    # clean estimate) | lookahead (its ODE completion, DenseGRPO's; the passes counted)
    score: str = "noisy"
    updates: int = 60
    # also stop after this many DiT-pass equivalents: DiT passes + DRM passes x a DRM pass's cost,
    # its FLOPs over a DiT pass's, counted in the run (0: no limit)
    max_nfe: int = 0
    trajectories: int = 16             # rollouts per update
    k: int = 4                         # stepwise: candidates per step, around one policy mean
    group_size: int = 4                # trajectories per prompt, every mode (sparse, cosine: the
                                       # group normalised together; tree: branch^splits leaves)
    group_std: str = "group"           # sparse: divide by the group's std | global (the update's:
                                       # Flow-GRPO's SD3 configs)
    split_steps: str = "0,1,3,4"       # tree: where it branches (BranchGRPO's 0,3,6,9 of 20 halved)
    branch: int = 2                    # tree: children per split (branch^splits leaves a prompt)
    tree_norm: str = "depth"           # tree: depth (BranchGRPO: a tree's nodes of a depth, ddof 1)
                                       # | siblings (each split's children among themselves)
    split_noise: float = 4.0           # tree: a split's noise x this (BranchGRPO's script; 1: none)
    # where the sampler is stochastic and trained: "" every step | a:b steps a..b-1 | random:n
    # (Flow-GRPO-Fast: n steps from a start drawn each update in [0, steps/2 - n]) | slide:n:u
    # (MixGRPO: n steps from step (update - 1) // u on, cut at steps - 2, back to 0 past it)
    sde_window: str = ""
    # train the last step too (sigma 0.001 -> 0: its std is ~1e4 float32 roundings of the state, its
    # gradient mostly rounding); false: sampled, never in the loss, as Flow-GRPO
    train_last_step: bool = False
    steps: int = 10                    # SDE steps per rollout
    noise_level: float = 0.7           # Flow-GRPO's a: sigma_t = a sqrt(sigma / (1 - sigma))
    cfg_scale: float = 4.0             # guidance in rollouts and loss (1: none, half the passes)
    eval_cfg_scale: float = 4.0        # guidance of the held-out evaluation samples
    shift: float = 1.0                 # SD3's schedule shift
    follow: str = "random"             # stepwise: go on from a random candidate (the paper) | best
    lr: float = 3e-5
    weight_decay: float = 0.0
    lora_rank: int = 0                 # 0: full fine-tune; r > 0: LoRA of rank r on attention
    clip_range: float = 1e-3           # PPO's clip (per-pixel mean log-probs: ratios stay near 1)
    adv_clip: float = 5.0
    # weight of the exact Gaussian KL to the frozen base policy. Flow-GRPO's KL is ours x |dt|,
    # so its beta is kl_weight = beta |dt| here (10 steps: |dt| = 0.111)
    kl_weight: float = 0.0
    # the loss's gradient through guidance's unconditional branch too (the exact gradient);
    # false: detached, as Flow-GRPO's loss
    uncond_grad: bool = True
    minibatches: int = 2               # optimizer steps per update
    loss_batch: int = 0                # pairs per backward pass (0: a minibatch's; less memory)
    grad_clip: float = 1.0
    eval_every: int = 20
    eval_per_prompt: int = 8           # ODE samples per held-out prompt at each evaluation
    eval_steps: int = 20
    seed: int = 0
    resume: bool = False               # continue out_dir's run (MAY_CHANGE below may change)
    overwrite: bool = False            # start afresh in a used out_dir (its run's files removed)
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)
    grad_checkpointing: bool = False   # re-run each policy block in the backward: less memory
    rollout_batch: int = 0             # rows per rollout policy pass (0: all; less memory)
    drm_batch: int = 0                 # rows per DRM pass (0: all; less memory)
    fsdp: bool = False                 # under torchrun: shard weights, grads and optimizer state
    device: str = "auto"


# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "updates", "max_nfe", "eval_every", "device", "compile", "grad_checkpointing",
              "rollout_batch", "drm_batch", "loss_batch", "fsdp"}
# a run's files
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors", "transformer", "lora")


def check(cfg):
    check_numbers(cfg)
    check_choice(cfg, "credit", CREDIT_MODES)
    check_choice(cfg, "follow", ("random", "best"))
    check_choice(cfg, "tree_norm", ("siblings", "depth"))
    check_choice(cfg, "score", SCORES)
    check_choice(cfg, "group_std", ("group", "global"))
    check_at_least(cfg, 2, "k", "group_size", "branch")  # GRPO compares at least 2 samples a group
    check_at_least(cfg, 1, "updates", "trajectories", "steps", "minibatches", "eval_every",
                   "eval_per_prompt", "eval_steps", "drm_draws")
    check_at_least(cfg, 0, "rollout_batch", "drm_batch", "loss_batch")  # 0: all at once
    if not cfg.split_noise > 0:
        raise UserError(f"--split_noise={cfg.split_noise}: a positive factor (1: a split's noise "
                        "as any step's; BranchGRPO's script: 4)")
    kind, *window = parse_window(cfg)
    trained = [i for i, t in enumerate(trained_steps(cfg.steps, window if kind == "fixed" else None,
                                                     cfg.train_last_step)) if t]
    if not trained:
        raise UserError(f"--sde_window={cfg.sde_window} trains no step: the last of --steps="
                        f"{cfg.steps} is not trained unless --train_last_step")
    a, b = trained[0], trained[-1] + 1
    splits = parse_numbers(cfg, "split_steps")
    if cfg.credit == "tree" and kind in ("random", "slide"):
        raise UserError(f"--credit=tree --sde_window={cfg.sde_window}: a tree splits at fixed "
                        "steps; give it a fixed window a:b or none")
    if cfg.credit == "tree" and not (splits and splits == sorted(set(splits))
                                     and a <= splits[0] and splits[-1] < b):
        raise UserError(f"--split_steps={cfg.split_steps}: give increasing steps in [{a}, {b}), "
                        "the trained ones (--steps, --sde_window, --train_last_step)")
    if cfg.trajectories % group_of(cfg):
        group = "--group_size" if cfg.credit != "tree" else "--branch^splits"
        raise UserError(f"--trajectories={cfg.trajectories} must be a multiple of "
                        f"{group}={group_of(cfg)}")
    if not 0 <= cfg.drm_sigma < 1:
        raise UserError(f"--drm_sigma={cfg.drm_sigma}: a sigma in [0, 1)")
    if not 0 < cfg.noise_level:
        raise UserError(f"--noise_level={cfg.noise_level}: GRPO needs a stochastic sampler, "
                        "use > 0 (0.7 is Flow-GRPO's)")
    if not cfg.shift > 0:
        raise UserError(f"--shift={cfg.shift}: SD3's schedule shift is positive "
                        "(1: none; SD3 at 1024 px: 3)")


def parse_window(cfg):
    """--sde_window -> ("all",), ("fixed", a, b), ("random", n) or ("slide", n, every), checked."""
    kind, _, rest = cfg.sde_window.partition(":") if ":" in cfg.sde_window else ("", "", "")
    T, text = cfg.steps, cfg.sde_window
    if not text:
        return ("all",)
    if kind in ("random", "slide"):
        numbers = rest.split(":")
        if not all(n.isdigit() for n in numbers) or len(numbers) != (1 if kind == "random" else 2):
            raise UserError(f"--sde_window={text}: give random:n or slide:n:every, e.g. random:3 "
                            "(Flow-GRPO-Fast) or slide:2:12 (MixGRPO)")
        n, *every = map(int, numbers)
        top = T // 2 if kind == "random" else T - 2  # Flow-GRPO-Fast's range (0, num_steps // 2)
        if not 1 <= n <= top or every == [0]:
            raise UserError(f"--sde_window={text}: n in [1, {top}] for --steps={T}, every >= 1")
        return (kind, n, *every)
    bounds = parse_numbers(cfg, "sde_window", sep=":")
    if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1] <= T:
        raise UserError(f"--sde_window={text}: give a:b, 0 <= a < b <= --steps={T}, or random:n, "
                        "slide:n:every")
    return ("fixed", *bounds)


def window_at(cfg, update, generator):
    """The SDE window (a, b) of an update, or None (every step). random: Flow-GRPO-Fast's window of
    n steps, its start uniform in [0, steps // 2 - n], one draw an update for all its trajectories
    (its code: one a GPU batch); slide: MixGRPO's, which moves one step every `every` updates
    through [0, steps - 2) (it never trains the last two steps) and rolls back to 0 past the end
    (MixGRPO idles one interval with an empty window first; we roll back at once)."""
    kind, *numbers = parse_window(cfg)
    if kind == "all":
        return None
    if kind == "fixed":
        return tuple(numbers)
    if kind == "random":
        n = numbers[0]
        start = int(torch.randint(cfg.steps // 2 - n + 1, (1,), generator=generator))
        return start, start + n
    n, every = numbers
    start = (update - 1) // every % (cfg.steps - 2)
    return start, min(start + n, cfg.steps - 2)


def group_of(cfg):
    """Trajectories a prompt: a tree's leaves, or --group_size (every other mode)."""
    if cfg.credit == "tree":
        return cfg.branch ** len(parse_numbers(cfg, "split_steps"))
    return cfg.group_size


def streams(seed, update):
    """An update's random numbers, a generator each, seeded by (seed, update, name): prompts,
    sde (the SDE's noise), picks (stepwise's candidate picks), order (the minibatches' order),
    window (random windows), noise(p) (prompt p's initial noises). So every mode and method run
    with one seed draws the same prompts and initial noise at each update, whatever else it draws
    (common random numbers: runs compare pairwise), and a resumed run needs no saved streams."""
    def stream(name):
        digest = hashlib.sha256(f"{seed}/{update}/{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    names = ("prompts", "sde", "picks", "order", "window")
    return SimpleNamespace(**{name: stream(name) for name in names},
                           noise=lambda p: stream(f"noise/{p}"))


class Scorer:
    """The DRM on one batch of prompts, `batch` rows a pass; `calls`: states scored on all ranks."""

    def __init__(self, drm, drm_text, prompts, batch, world=1):
        self.drm, self.batch, self.world, self.calls = drm, batch, world, 0
        self.context, self.pooled = drm_text.encode(prompts)

    def __call__(self, x, sigma, rows):
        """x (N, C, H, W) at sigma (N,); rows (N,): the prompt of each -> scores (N,)."""
        self.calls += x.shape[0] * self.world * drm_passes(self.drm, sigma)
        context, pooled = self.context[rows], self.pooled[rows]
        return in_chunks(self.drm, self.batch, x, sigma, context, pooled).float()


def rollout(cfg, policy, base, scorer, noise, prompts, rng, ranks, *, window):
    """SDE trajectories from noise for this rank's prompts -> (Rollout, the terminal rewards of
    every rank's trajectories, or None for stepwise credit: its rewards are in the Rollout)."""
    stepwise = cfg.credit == "stepwise"
    cond, uncond = base.encode(prompts)
    policy.eval()
    velocity = lambda *inputs: in_chunks(policy, cfg.rollout_batch, *inputs)  # noqa: E731
    sigmas = sigma_schedule(cfg.steps, cfg.shift).to(noise.device)
    settings = dict(noise_level=cfg.noise_level, cfg_scale=cfg.cfg_scale, window=window,
                    train_last=cfg.train_last_step, generator=rng.sde, shard=ranks.shard_id)
    with autocast(noise.device):
        if cfg.credit == "tree":  # a prompt's leaves grow from one root: its first noise
            roots = slice(None, None, group_of(cfg))
            trajectories = sample_tree(
                velocity, noise[roots], take(cond, roots), take(uncond, roots), sigmas,
                split_steps=parse_numbers(cfg, "split_steps"), branch=cfg.branch,
                split_noise=cfg.split_noise, **settings)
        else:
            trajectories = sample_rollout(
                velocity, noise, cond, uncond, sigmas, k=cfg.k if stepwise else 1,
                follow=cfg.follow, reward=scorer if stepwise else None, score=cfg.score,
                picks=rng.picks, **settings)
        final_rewards = None
        if not stepwise:  # gathered from every rank: each prompt's group is normalised whole
            rows = torch.arange(len(noise), device=noise.device)
            with torch.no_grad():
                final = scorer(trajectories.final, torch.zeros_like(rows, dtype=torch.float), rows)
            final_rewards = ranks.gather(final)
    policy.train()
    return trajectories, final_rewards


def update(cfg, trained, optimizer, reference, trajectories, advantages, mine, order, *, step,
           advice):
    """Every trained (step, trajectory) pair of the rollout once, in `minibatches` AdamW steps ->
    (mean stats, DiT passes). A rank computes the pairs of its own trajectories, `loss_batch` at a
    time (their gradients add up), each piece's mean weighted by its share of the minibatch, so that
    DDP's average over the ranks is the minibatch mean; every rank runs as many pieces as the
    busiest one, a rank out of pairs one at weight 0 (DDP needs every rank in each backward)."""
    world = cfg.trajectories // trajectories.states.shape[1]
    marked = trajectories.trained.repeat(1, world).flatten()  # the ranks' rows are marked alike
    pairs = marked.nonzero().flatten()[torch.randperm(int(marked.sum()), generator=order)]
    passes = (2 if cfg.cfg_scale != 1 else 1) * (2 if reference is not None else 1)
    stats, nfe = [], 0
    for chunk in pairs.to(trajectories.states.device).chunk(cfg.minibatches):
        step_ids, rows = chunk // cfg.trajectories, chunk % cfg.trajectories
        owners = torch.bincount(rows // (cfg.trajectories // world), minlength=world)
        here = (rows >= mine.start) & (rows < mine.stop)
        step_ids, rows = step_ids[here], rows[here] - mine.start
        size = cfg.loss_batch or int(owners.max())
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, int(owners.max()), size):
            piece = slice(start, start + size)
            n = len(step_ids[piece])
            with autocast(trajectories.states.device):
                loss, piece_stats = grpo_loss(
                    trained, trajectories, advantages, *((step_ids[piece], rows[piece]) if n else
                                                        (chunk[:1] * 0, chunk[:1] * 0)),
                    clip_range=cfg.clip_range, adv_clip=cfg.adv_clip, kl_weight=cfg.kl_weight,
                    reference=reference, uncond_grad=cfg.uncond_grad)
            loss = loss * (n * world / len(chunk))
            check_finite(loss, step, "loss", advice)
            loss.backward()
            if n or not stats:
                stats.append(piece_stats)
        params = optimizer.param_groups[0]["params"]
        check_finite(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip), step, "gradient norm",
                     advice)
        optimizer.step()
        nfe += len(chunk) * passes
    return {key: sum(s[key].item() for s in stats) / len(stats) for key in stats[0]}, nfe


def draw_rollout(cfg, base, policy, drm, drm_text, train_prompts, rng, ranks, *, step):
    """An update's prompts and initial noise (prompt p's from its own stream: every mode with one
    seed starts its p-th prompt's trajectories from the same noises), drawn whole on every rank,
    and this rank's rows rolled out -> (Rollout, terminal rewards of all ranks or None, Scorer)."""
    mine = ranks.shard(cfg.trajectories, "--trajectories")  # this rank's trajectories
    per_prompt = group_of(cfg)
    n_prompts = cfg.trajectories // per_prompt
    picks = torch.randint(len(train_prompts), (n_prompts,), generator=rng.prompts).tolist()
    prompts = [train_prompts[i] for i in picks for _ in range(per_prompt)]
    noise = torch.cat([initial_noise(policy, per_prompt, rng.noise(p), base.latent_size)
                       for p in range(n_prompts)])[mine]
    device = next(policy.parameters()).device
    scorer = Scorer(drm, drm_text, prompts[mine], cfg.drm_batch, ranks.world)
    trajectories, final_rewards = rollout(cfg, policy, base, scorer, noise.to(device),
                                          prompts[mine], rng, ranks,
                                          window=window_at(cfg, step, rng.window))
    return trajectories, final_rewards, scorer


def grpo_step(cfg, base, models, train_prompts, ranks, *, step, advice):
    """One update: the rollout (draw_rollout), the advantages, the AdamW steps -> (stats, DiT
    passes, DRM passes; all ranks)."""
    policy, trained, reference, drm, drm_text, optimizer = models
    rng = streams(cfg.seed, step)
    trajectories, final_rewards, scorer = draw_rollout(cfg, base, policy, drm, drm_text,
                                                       train_prompts, rng, ranks, step=step)
    mine = ranks.shard(cfg.trajectories, "--trajectories")
    advantages = credit_advantages(
        cfg.credit, trajectories, final_rewards, cfg.group_size, cfg.adv_clip, rows=mine,
        gather=ranks.gather, tree=(parse_numbers(cfg, "split_steps"), cfg.branch, cfg.tree_norm),
        group_std=cfg.group_std)
    stats, nfe = update(cfg, trained, optimizer, reference, trajectories, advantages, mine,
                        rng.order, step=step, advice=advice)
    last = int(trajectories.trained.any(1).nonzero().max())  # the last trained step
    rewards = trajectories.rewards[last] if final_rewards is None else final_rewards
    stats["train_reward"] = rewards.mean().item()
    stats["trained_pairs"] = int(trajectories.trained.sum()) * ranks.world
    return stats, trajectories.nfe * ranks.world + nfe, scorer.calls


def drm_pass_cost(base, policy, drm, drm_text, prompt):
    """A DRM pass's cost in DiT passes: its FLOPs over an unguided DiT pass's, on one state of
    `prompt` (counted, so the same on any machine: the run's DiT-pass equivalents per DRM pass)."""
    device = next(policy.parameters()).device
    x = initial_noise(policy, 1, torch.Generator().manual_seed(0), base.latent_size).to(device)
    sigma = torch.full((1,), 0.5, device=device)
    (context, pooled), _ = base.encode([prompt])
    drm_context, drm_pooled = drm_text.encode([prompt])
    with torch.no_grad(), autocast(device):
        dit = count_flops(lambda: policy(x, sigma, context, pooled))
        return count_flops(lambda: drm(x, sigma, drm_context, drm_pooled)) / dit


def evaluate_policy(cfg, policy, base, drm, drm_text, heldout):
    """Held-out ODE samples, fixed seeds -> (the annotator's figures if any, the DRM's; images)."""
    policy.eval()
    summary, samples, images, prompts = evaluate(
        policy, base, heldout, cfg.eval_per_prompt, seed=1234, batch_size=cfg.rollout_batch or 100,
        steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg_scale, shift=cfg.shift)
    device = next(policy.parameters()).device
    zeros = torch.zeros(len(samples), device=device)
    with torch.no_grad():
        scores = in_chunks(drm, cfg.drm_batch, samples.to(device), zeros, *drm_text.encode(prompts))
    summary["drm"] = scores.mean().item()
    policy.train()
    return summary, images


def save_run(cfg, run_dir, base, policy, optimizer, *, step, counters):
    """The policy and the train state (with LoRA: the adapters and their optimizer state alone; the
    frozen weights are the base's); every rank takes part (FSDP gathers)."""
    policy_state, optimizer_state = get_state_dict(policy, optimizer, options=WHOLE)
    if run_dir.main:
        base.save_policy(cfg.out_dir, policy_state, policy.config, cfg.lora_rank, step)
        trained = {k: v for k, v in policy_state.items() if ".lora_" in k or not cfg.lora_rank}
        save_training_state(run_dir.file("train_state.pt"), {
            "policy": trained, "optimizer": optimizer_state, "step": step,
            "counters": counters, "torch_rng": torch.get_rng_state(), "config": asdict(cfg)})
    run_dir.last_saved = step


def evaluate_and_save(cfg, run_dir, ranks, policy, optimizer, models, heldout, *, step, counters,
                      train_stats=None, save=True, stop=False):
    """Evaluate; refuse to save or log a diverged policy (NaN metrics, non-finite weights); save;
    log one line. A stop asked for during the evaluation before any update leaves nothing."""
    summary, images = {}, None
    if ranks.main or cfg.fsdp:
        summary, images = evaluate_policy(cfg, policy, *models, heldout)
    if step == 0 and any_rank(stop):
        return
    check_finite(summary, step, "held-out evaluation", run_dir.advice())
    check_weights(policy, step, run_dir.advice())
    if save:
        save_run(cfg, run_dir, models[0], policy, optimizer, step=step, counters=counters)
    if ranks.main:
        shown = min(cfg.eval_per_prompt, 8)
        grid = images.view(len(heldout), cfg.eval_per_prompt, *images.shape[1:])[:, :shown]
        save_grid(grid.flatten(0, 1), run_dir.file(f"samples_{step:05d}.png"), nrow=shown)
        record = {"step": step, "credit": cfg.credit, "seed": cfg.seed, **counters, **summary,
                  **(train_stats or {})}
        with open(run_dir.file("metrics.jsonl"), "a") as log:
            log.write(json.dumps(record) + "\n")
        tqdm.write(f"update {step:4d} | " + " | ".join(f"{k} {v:.4f}" for k, v in summary.items())
                   + f" | DiT-pass equivalents {counters['dit_equivalents']:.0f} | "
                   f"{counters['time_s']:.0f} s")


def build_models(cfg, base, device, ranks):
    """The policy (float32 weights when fully fine-tuned; LoRA when asked), its frozen copy for the
    KL, the frozen DRM, DDP or FSDP under torchrun, AdamW -> (policy, trained: what the loss calls,
    reference, drm, drm_text, optimizer)."""
    policy = base.dit if cfg.lora_rank else base.dit.float()
    drm, drm_text, _ = base.load_drm(cfg.drm, device)
    drm.requires_grad_(False).to(frozen_dtype(device))  # bf16 on a GPU
    reference = copy.deepcopy(policy).requires_grad_(False) if cfg.kl_weight > 0 else None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # the adapters' init: the seed's alone, whatever loaded before
        add_lora(policy, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))
    policy.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        for module in filter(None, (policy, reference, drm.backbone)):
            compile_regions(module)
    if cfg.fsdp:  # each rank holds 1/N of every block's weights, grads and optimizer state
        for module in filter(None, (policy, reference)):
            for block in module.joint_blocks:
                fully_shard(block)
            fully_shard(module)
    params = [p for p in policy.parameters() if p.requires_grad]
    # under torchrun, DDP (or FSDP) averages the gradients over the ranks (the weights start equal)
    trained = DDP(policy, broadcast_buffers=False) if ranks.world > 1 and not cfg.fsdp else policy
    kind = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full fine-tune"
    print(f"policy: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters ({kind}); "
          f"credit {cfg.credit}")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    drm = with_ensemble(drm, cfg.drm_draws, cfg.drm_sigma)
    return policy, trained, reference, drm, drm_text, optimizer


def resume_run(cfg, run_dir, state, policy, optimizer):
    """The saved policy and optimizer back in place (the random streams are the update's:
    streams) -> (update, counters)."""
    check_state_fits(run_dir.file("train_state.pt"), "policy", policy, state["policy"],
                     trained_only=cfg.lora_rank > 0)
    options = dataclasses.replace(WHOLE, strict=not cfg.lora_rank)  # LoRA: the adapters alone
    set_state_dict(policy, optimizer, model_state_dict=state["policy"],
                   optim_state_dict=state["optimizer"], options=options)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr  # the flag, not the saved value: a resume may lower it
    torch.set_rng_state(state["torch_rng"])
    run_dir.last_saved = state["step"]
    run_dir.trim_metrics(state["step"])
    return state["step"], state["counters"]


def main(cfg):
    check(cfg)
    check_model_flags(cfg)
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, OUTPUTS) as run_dir, GracefulStop() as stop:
        print_config(cfg)
        state = load_training_state(run_dir.file("train_state.pt"), "cpu") if cfg.resume else None
        if state:
            check_resumed_config(state["config"], cfg, MAY_CHANGE)
        device, ranks = setup_device(cfg.device)
        mine = ranks.shard(cfg.trajectories, "--trajectories")  # this rank's trajectories
        if (mine.stop - mine.start) % group_of(cfg) and cfg.credit == "tree":
            raise UserError(f"--credit=tree: each process grows whole trees; make --trajectories "
                            f"a multiple of {group_of(cfg)} x {ranks.world} processes")
        if cfg.fsdp and ranks.world == 1:
            raise UserError("--fsdp shards the policy over torchrun's processes: launch with "
                            "torchrun --nproc_per_node=N")
        torch.manual_seed(cfg.seed)
        base = load_base(cfg, device)
        train_prompts = base.train_prompts(cfg.prompts)
        heldout = base.heldout_prompts(cfg.eval_prompts, train_prompts)
        base.prepare(train_prompts + heldout, run_dir.file("cache"))  # SD3: embedded once, cached
        models = build_models(cfg, base, device, ranks)
        policy, _, _, drm, drm_text, optimizer = models
        drm_cost = drm_pass_cost(base, policy, drm, drm_text, train_prompts[0])
        print(f"a DRM pass costs {drm_cost:.3f} DiT passes (FLOPs counted)")
        step, counters = (resume_run(cfg, run_dir, state, policy, optimizer) if state else
                          (0, {"nfe": 0, "drm_calls": 0, "dit_equivalents": 0.0, "time_s": 0.0,
                               "drm_cost": drm_cost}))
        scoring = (base, drm, drm_text)
        if step == 0:
            evaluate_and_save(cfg, run_dir, ranks, policy, optimizer, scoring, heldout, step=0,
                              save=False, stop=stop, counters=counters)
        spent = lambda: cfg.max_nfe and counters["dit_equivalents"] >= cfg.max_nfe  # noqa: E731
        bar = tqdm(initial=step, total=cfg.updates, desc=f"grpo {cfg.credit}",
                   disable=not ranks.main)
        while step < cfg.updates and not spent() and not any_rank(stop):
            t0 = time.time()
            train_stats, nfe, drm_calls = grpo_step(cfg, base, models, train_prompts, ranks,
                                                    step=step + 1, advice=run_dir.advice())
            step += 1
            counters["nfe"] += nfe
            counters["drm_calls"] += drm_calls
            counters["dit_equivalents"] = counters["nfe"] + drm_cost * counters["drm_calls"]
            counters["time_s"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(reward=f"{train_stats['train_reward']:.3f}",
                            clip=f"{train_stats['clip_fraction']:.2f}")
            if step % cfg.eval_every == 0 or step >= cfg.updates or spent():
                evaluate_and_save(cfg, run_dir, ranks, policy, optimizer, scoring, heldout,
                                  step=step, train_stats=train_stats, counters=counters)
        bar.close()
        if any_rank(stop):
            if step and run_dir.last_saved != step:
                check_weights(policy, step, run_dir.advice())
                save_run(cfg, run_dir, base, policy, optimizer, step=step, counters=counters)
            print(f"stopped: saved update {step} to {cfg.out_dir}; continue with --resume" if step
                  else "stopped: nothing saved")
            return None
    return policy


if __name__ == "__main__":
    run_main(main, Config)
