"""The operations of train_policy.py's GRPO loop, kept out of the method's way: the models and their
devices (DDP, FSDP, LoRA, compile), an update's batch and random streams, counting what the DRM
costs, the pieces a minibatch is cut into, evaluation, checkpoints and resume.

train_policy.py reads as the algorithm (rollout, advantages, update) and calls each of these once.
"""
import contextlib
import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import check_state_fits, save_training_state
from common import (DeviceFlags, any_rank, autocast, check_finite, check_fits, check_weights,
                    count_flops, flag, flag_values, frozen_dtype, in_chunks)
from evaluation import evaluate
from images import save_grid
from lora import add_lora
from model import compile_regions
from sde import Draws, Sampler, initial_noise, latent_bytes, sigma_schedule


@dataclass
class HardwareFlags(DeviceFlags):
    """train_policy.py's flags of where and how its passes run: they change memory and speed,
    never the numbers (a resumed run may change them). Its Config holds them as one group."""
    grad_checkpointing: bool = False   # re-run each policy block in the backward: less memory
    # rows per rollout policy pass, per DRM pass, pairs per backward pass (less memory)
    rollout_batch: int = flag(0, "[0, inf)", zero="all at once")
    drm_batch: int = flag(0, "[0, inf)", zero="all at once")
    loss_batch: int = flag(0, "[0, inf)", zero="a minibatch's")
    fsdp: bool = False                 # under torchrun: shard weights, grads and optimizer state

# checkpoints hold whole tensors on the CPU (gathered from the ranks' shards under --fsdp), so any
# number of processes, or one, can resume them
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)

# -----------------------------------------------------------------------------
# The models


@dataclass
class Models:
    """What an update uses: the policy (its weights), the module the loss calls (the policy, or DDP
    around it under torchrun), the frozen reference (the KL's, or None), the frozen DRM and its text
    side, AdamW, the forward passes' precision (bf16 autocast on a GPU, nothing on a CPU: one
    context, entered around each use, as nanoGPT's `ctx`, never inside itself: a torch.autocast
    object entered twice leaves autocast on) and the modules a rival keeps beside the policy
    ({name: module}, saved and resumed with it: rivals/objectives.py's shadow copy)."""
    policy: torch.nn.Module
    loss_policy: torch.nn.Module
    reference: torch.nn.Module | None
    drm: torch.nn.Module
    drm_text: object
    optimizer: torch.optim.Optimizer
    precision: object = contextlib.nullcontext()
    kept: dict = field(default_factory=dict)


def build_models(cfg, base, device, ranks, *, reference):
    """The policy (float32 weights when fully fine-tuned; LoRA when asked), its frozen copy when
    `reference` (the KL's), the frozen DRM, DDP or FSDP under torchrun, AdamW -> Models."""
    hardware = cfg.hardware
    # a rollout's states, candidates, means and clean estimates: (k + 4) latents a (step, row)
    check_fits(cfg.steps * cfg.trajectories // ranks.world * (cfg.k + 4)
               * latent_bytes(base.dit, base.latent_size),
               f"--trajectories={cfg.trajectories} x --steps={cfg.steps} x (--k={cfg.k} + 4)",
               device)
    # on a GPU: frozen weights in bf16, the forward passes under bf16 autocast; float32 on a CPU
    frozen, precision = frozen_dtype(device), autocast(device)
    policy = base.dit if cfg.lora_rank else base.dit.float()
    drm, drm_text, _ = base.load_drm(cfg.drm, device)
    drm.requires_grad_(False).to(frozen)
    reference = copy.deepcopy(policy).requires_grad_(False) if reference else None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # the adapters' init: the seed's alone, whatever loaded before
        add_lora(policy, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))
    policy.grad_checkpointing = hardware.grad_checkpointing
    if hardware.compile:
        for module in filter(None, (policy, reference, drm.backbone)):
            compile_regions(module)
    if hardware.fsdp:  # each rank holds 1/N of every block's weights, grads and optimizer state
        for module in filter(None, (policy, reference)):
            for block in module.joint_blocks:
                fully_shard(block)
            fully_shard(module)
    params = [p for p in policy.parameters() if p.requires_grad]
    # under torchrun, DDP (or FSDP) averages the gradients over the ranks (the weights start equal)
    loss_policy = (DDP(policy, broadcast_buffers=False) if ranks.world > 1 and not hardware.fsdp
                   else policy)
    kind = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full fine-tune"
    print(f"policy: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters ({kind})")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Models(policy, loss_policy, reference, drm, drm_text, optimizer, precision)

# -----------------------------------------------------------------------------
# An update's random numbers, and what the DRM costs


def streams(seed, update):
    """An update's random numbers, a generator each, seeded by (seed, update, name): prompts, sde
    (the SDE's noise), picks (stepwise's candidate picks), order (the minibatches' order), window
    (random windows), noise(p) (prompt p's initial noises). So every mode and method run with one
    seed draws the same prompts and initial noise at each update, whatever else it draws (common
    random numbers: runs compare pairwise), and a resumed run needs no saved streams."""
    def stream(name):
        digest = hashlib.sha256(f"{seed}/{update}/{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    names = ("prompts", "sde", "picks", "order", "window")
    return SimpleNamespace(**{name: stream(name) for name in names},
                           noise=lambda p: stream(f"noise/{p}"))


def draw_prompts(train_prompts, n_prompts, per_prompt, rng, policy, latent_size):
    """An update's prompts, each per_prompt times (adjacent), and their initial noises: prompt p's
    from its own stream, so its trajectories start alike in every mode -> (prompts, noise (n_prompts
    * per_prompt, ...))."""
    picks = torch.randint(len(train_prompts), (n_prompts,), generator=rng.prompts).tolist()
    prompts = [train_prompts[i] for i in picks for _ in range(per_prompt)]
    noise = torch.cat([initial_noise(policy, per_prompt, rng.noise(p), latent_size)
                       for p in range(n_prompts)])
    return prompts, noise


class Scorer:
    """The DRM on one batch of prompts, `batch` rows a pass; `calls`: the DRM passes on all
    ranks."""

    def __init__(self, drm, drm_text, prompts, batch, world=1):
        self.drm, self.batch, self.world, self.calls = drm, batch, world, 0
        self.context, self.pooled = drm_text.encode(prompts)

    def __call__(self, x, sigma, rows):
        """x (N, C, H, W) at sigma (N,); rows (N,): the prompt of each -> scores (N,)."""
        # a DRM wrapped by a rival may take several passes a scoring (rivals/reward.py's ensemble)
        passes = self.drm.passes(sigma) if hasattr(self.drm, "passes") else 1
        self.calls += x.shape[0] * self.world * passes
        context, pooled = self.context[rows], self.pooled[rows]
        return in_chunks(self.drm, self.batch, x, sigma, context, pooled).float()


@dataclass
class Batch:
    """This rank's share of an update's trajectories: the policy on their prompts (its passes
    rollout_batch rows at a time), their initial noise, the DRM on their prompts, the update's
    random streams (streams), the SDE's draws from them (sde.Draws) and which of the update's
    trajectories are this rank's (`mine`, a slice)."""
    sampler: Sampler
    noise: torch.Tensor
    scorer: Scorer
    streams: SimpleNamespace
    draws: Draws
    mine: slice


def draw_batch(cfg, base, models, train_prompts, ranks, *, update, per_prompt):
    """An update's batch (Batch): its prompts, per_prompt times each, and their initial noises, as
    every mode draws them at this update (draw_prompts), this rank's rows of them."""
    rng = streams(cfg.seed, update)
    prompts, noise = draw_prompts(train_prompts, cfg.trajectories // per_prompt, per_prompt, rng,
                                  models.policy, base.latent_size)
    mine = ranks.shard(cfg.trajectories, "--trajectories")
    device = next(models.policy.parameters()).device
    noise, prompts = noise[mine].to(device), prompts[mine]
    scorer = Scorer(models.drm, models.drm_text, prompts, cfg.hardware.drm_batch, ranks.world)
    cond, uncond = base.encode(prompts)
    policy = partial(in_chunks, models.policy, cfg.hardware.rollout_batch)
    sampler = Sampler(policy, sigma_schedule(cfg.steps, cfg.shift).to(device), cond, uncond,
                      cfg.cfg_scale)
    return Batch(sampler, noise, scorer, rng, Draws(rng.sde, rng.picks, ranks.shard_id), mine)


def pass_costs(base, models, prompt):
    """What a DRM pass and a DiT backward pass cost in DiT forward passes: their FLOPs over an
    unguided DiT pass's, on one state of `prompt` (counted, so the same on any machine) ->
    {"drm_cost", "backward_cost"}. The backward is the policy's as trained: a full fine-tune's
    computes every weight's gradient and the input's (about 2 forwards), LoRA's the adapters'."""
    policy, drm = models.policy, models.drm
    device = next(policy.parameters()).device
    x = initial_noise(policy, 1, torch.Generator().manual_seed(0), base.latent_size).to(device)
    sigma = torch.full((1,), 0.5, device=device)
    (context, pooled), _ = base.encode([prompt])
    drm_context, drm_pooled = models.drm_text.encode([prompt])
    with models.precision:
        with torch.no_grad():
            forward = count_flops(lambda: policy(x, sigma, context, pooled))
            drm_flops = count_flops(lambda: drm(x, sigma, drm_context, drm_pooled))
        both = count_flops(lambda: policy(x, sigma, context, pooled).float().square().mean()
                           .backward())
    for p in policy.parameters():
        p.grad = None
    return {"drm_cost": drm_flops / forward, "backward_cost": (both - forward) / forward}


def equivalents(counters):
    """DiT-pass equivalents: DiT forward passes, plus backward passes and DRM passes at their
    FLOPs' share of a DiT forward pass (pass_costs)."""
    return (counters["nfe"] + counters["backward_cost"] * counters["backward_passes"]
            + counters["drm_cost"] * counters["drm_calls"])

# -----------------------------------------------------------------------------
# A minibatch's pieces under torchrun


def pieces(pairs, trajectories, mine, world, loss_batch):
    """One minibatch's (step, trajectory) pairs (flat indices step * trajectories + row, of every
    rank's rows) -> this rank's pieces [(step_ids, rows, weight)], rows local to the rank,
    `loss_batch` pairs a piece (0: all).

    DDP averages the ranks' gradients; a piece's mean loss times weight = n x world / (minibatch
    size) makes that average the minibatch's mean, and the pieces' gradients add up. Every rank runs
    as many pieces as the busiest one: DDP needs every rank in each backward, so a rank out of pairs
    runs one pair at weight 0."""
    step_ids, rows = pairs // trajectories, pairs % trajectories
    owners = torch.bincount(rows // (trajectories // world), minlength=world)
    here = (rows >= mine.start) & (rows < mine.stop)
    step_ids, rows = step_ids[here], rows[here] - mine.start
    size, busiest = loss_batch or int(owners.max()), int(owners.max())
    out = []
    for start in range(0, busiest, size):
        piece = slice(start, start + size)
        n = len(step_ids[piece])
        if n:
            out.append((step_ids[piece], rows[piece], n * world / len(pairs)))
        else:
            out.append((pairs[:1] * 0, pairs[:1] * 0, 0.0))
    return out


def optimizer_step(models, grad_clip, update, advice):
    """Clip the gradient's norm (refusing a non-finite one), then one AdamW step."""
    params = models.optimizer.param_groups[0]["params"]
    check_finite(torch.nn.utils.clip_grad_norm_(params, grad_clip), update, "gradient norm",
                 advice)
    models.optimizer.step()

# -----------------------------------------------------------------------------
# Evaluation, checkpoints, resume


def evaluate_policy(cfg, policy, base, models, heldout):
    """Held-out ODE samples, fixed seeds -> (the annotator's figures if any, the DRM's; images), at
    --eval_cfg_scale and, where asked (--also_eval_cfg_scale: a rival's authors evaluate at another
    guidance), at that one too: its figures keyed NAME_cfgW."""
    policy.eval()
    device, evaluation = next(policy.parameters()).device, cfg.evaluation
    summary, images = {}, None
    also = ([evaluation.also_eval_cfg_scale]
            if evaluation.also_eval_cfg_scale not in (0, evaluation.eval_cfg_scale) else [])
    for scale in [evaluation.eval_cfg_scale, *also]:
        figures, samples, shown, prompts = evaluate(
            policy, base, heldout, evaluation.eval_per_prompt, seed=1234,
            batch_size=cfg.hardware.rollout_batch or 100, steps=evaluation.eval_steps,
            cfg_scale=scale, shift=cfg.shift)
        zeros = torch.zeros(len(samples), device=device)
        with torch.no_grad():
            scores = in_chunks(models.drm, cfg.hardware.drm_batch, samples.to(device), zeros,
                               *models.drm_text.encode(prompts))
        figures["drm"] = scores.mean().item()
        if images is None:  # the first, --eval_cfg_scale's
            summary, images = figures, shown
        else:
            summary.update({f"{key}_cfg{scale:g}": value for key, value in figures.items()})
    policy.train()
    return summary, images


def trained(state, lora_rank):
    """The weights a train state keeps: with LoRA the adapters alone (the rest are the base's)."""
    return {k: v for k, v in state.items() if ".lora_" in k or not lora_rank}


def save_run(cfg, run_dir, base, models, *, update, counters):
    """The policy and the train state (with LoRA: the adapters and their optimizer state alone; the
    frozen weights are the base's), and the modules a rival keeps; every rank takes part (FSDP
    gathers)."""
    policy_state, optimizer_state = get_state_dict(models.policy, models.optimizer, options=WHOLE)
    if run_dir.main:
        base.save_policy(cfg.out_dir, policy_state, models.policy.config, cfg.lora_rank, update)
        kept = {name: trained(module.state_dict(), cfg.lora_rank)
                for name, module in models.kept.items()}
        save_training_state(run_dir.file("train_state.pt"), {
            "policy": trained(policy_state, cfg.lora_rank), "optimizer": optimizer_state,
            "shadow": None, **kept, "step": update, "counters": counters,
            "inputs": run_dir.fingerprints, "torch_rng": torch.get_rng_state(),
            "config": flag_values(cfg)})
    run_dir.last_saved = update


def evaluate_and_save(cfg, run_dir, ranks, base, models, heldout, *, update, counters,
                      train_stats=None, save=True, stop=False):
    """Evaluate; refuse to save or log a diverged policy (NaN metrics, non-finite weights); save;
    log one line. A stop asked for during the evaluation before any update leaves nothing."""
    summary, images = {}, None
    if ranks.main or cfg.hardware.fsdp:
        summary, images = evaluate_policy(cfg, models.policy, base, models, heldout)
    if update == 0 and any_rank(stop):
        return
    check_finite(summary, update, "held-out evaluation", run_dir.advice())
    check_weights(models.policy, update, run_dir.advice())
    if ranks.main:  # the row and grid before the checkpoint (RunDir.log)
        per_prompt = cfg.evaluation.eval_per_prompt
        shown = min(per_prompt, 8)
        grid = images.view(len(heldout), per_prompt, *images.shape[1:])[:, :shown]
        save_grid(grid.flatten(0, 1), run_dir.file(f"samples_{update:05d}.png"), nrow=shown)
        run_dir.log({"step": update, "credit": cfg.rival.credit, "seed": cfg.seed, **counters,
                     **summary, **(train_stats or {})})
        tqdm.write(f"update {update:4d} | " + " | ".join(f"{k} {v:.4f}"
                                                         for k, v in summary.items())
                   + f" | DiT-pass equivalents {counters['dit_equivalents']:.0f} | "
                     f"{counters['time_s']:.0f} s")
    if save:
        save_run(cfg, run_dir, base, models, update=update, counters=counters)


def resume_run(cfg, run_dir, state, models, costs):
    """The saved policy and optimizer back in place, and the modules a rival keeps (the random
    streams are the update's: streams) -> (update, counters; a run saved before backward passes
    were counted counts them from here, at `costs`)."""
    check_state_fits(run_dir.file("train_state.pt"), "policy", models.policy, state["policy"],
                     trained_only=cfg.lora_rank > 0)
    options = dataclasses.replace(WHOLE, strict=not cfg.lora_rank)  # LoRA: the adapters alone
    set_state_dict(models.policy, models.optimizer, model_state_dict=state["policy"],
                   optim_state_dict=state["optimizer"], options=options)
    for name, module in models.kept.items():
        module.load_state_dict(state[name], strict=not cfg.lora_rank)
    for group in models.optimizer.param_groups:
        group["lr"] = cfg.lr  # the flag, not the saved value: a resume may lower it
    torch.set_rng_state(state["torch_rng"])
    run_dir.last_saved = state["step"]
    run_dir.trim_metrics(state["step"])
    return state["step"], {"backward_passes": 0, **costs, **state["counters"]}


def finish_stopped(cfg, run_dir, base, models, *, update, counters, advice):
    """A stop asked for (Ctrl-C, SIGTERM): save the last update if it is not saved yet, and say how
    to go on."""
    if update and run_dir.last_saved != update:
        check_weights(models.policy, update, advice)
        save_run(cfg, run_dir, base, models, update=update, counters=counters)
    print(f"stopped: saved update {update} to {cfg.out_dir}; continue with --resume" if update
          else "stopped: nothing saved")
