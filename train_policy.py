"""Fine-tune the DiT with GRPO against the DRM: step-wise credit (DRM, sec. 4), or a rival's.

    python train_policy.py                           # step-wise GRPO on the CPU toy (4 min)
    python train_policy.py --credit=sparse           # Flow-GRPO: terminal reward on every step
    python train_policy.py --credit=cosine           # CoCA: terminal reward spread by cosine credit
    python train_policy.py --credit=tree             # BranchGRPO's trees
    python train_policy.py --sde_window=random:3     # Flow-GRPO-Fast: SDE and training on 3 steps
    python train_policy.py --resume                  # continue an interrupted run
    torchrun --nproc_per_node=8 train_policy.py      # DDP: the rollouts split over 8 processes
    torchrun --nproc_per_node=8 train_policy.py --fsdp   # FSDP: the weights too (large models)
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --resolution=512 --prompts=prompts.txt --drm=out/drm/model.safetensors --lora_rank=16

One update: `trajectories` SDE rollouts, `per_prompt` of each of the update's prompts; the DRM
scores each trained step's k candidates (grpo.py); their advantages; then `minibatches` AdamW
steps on the PPO-clipped loss over the rollout's trained (step, trajectory) pairs. Every pass is
counted: DiT passes, and DRM passes at their FLOPs share of a DiT pass (`--max_nfe` is a budget
of DiT-pass equivalents). Every `eval_every` updates: ODE samples of the held-out prompts with
fixed seeds, scored by the DRM and, in the toy, by the simulated annotator (gold, never seen in
training); one JSON line in OUT_DIR/metrics.jsonl, a grid PNG, a checkpoint. The rival credit
rules are rivals/credit.py's; the operations (devices, streams, checkpoints) train_ops.py's.
"""
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import train_ops
from base import ModelFlags, check_model_flags, load_base, model_inputs
from checkpoints import (GracefulStop, RunDir, check_finite, check_resumed_config,
                         load_training_state)
from common import (UserError, any_rank, autocast, check_flags, flag, print_config, run_main,
                    setup_device)
from grpo import grpo_loss
from model import in_chunks
from rivals.credit import CREDIT, CreditFlags, check_credit, settings, window_at
from rivals.objectives import ObjectiveFlags, check_objective, matching_update, with_objective
from rivals.reward import EnsembleFlags
from rivals.scores import SCORES
from sde import passes, sigma_schedule


@dataclass
class Config(ModelFlags, CreditFlags, ObjectiveFlags, EnsembleFlags):  # base.py's, rivals' flags
    drm: str = "data/drm.safetensors"  # the reward model
    prompts: str = ""                  # training prompts, one a line (the toy's default: its 80)
    eval_prompts: str = ""             # held-out prompts (the toy: its 10; SD3: 8 of --prompts)
    out_dir: str = "out/policy"
    # stepwise (the paper) | a rival's: rivals/credit.py's CREDIT
    credit: str = flag("stepwise", choices=CREDIT)
    # stepwise: what the DRM scores: noisy (x_next, the paper) | a rival's (rivals/scores.py)
    score: str = flag("noisy", choices=SCORES)
    updates: int = flag(60, "[1, inf)")
    # also stop after this many DiT-pass equivalents
    max_nfe: int = flag(0, "[0, inf)", zero="no limit")
    trajectories: int = flag(16, "[1, inf)")  # rollouts per update
    per_prompt: int = flag(4, "[2, inf)")  # of them a prompt's (sparse, cosine: its group)
    k: int = flag(4, "[2, inf)")       # stepwise: candidates per step, around one policy mean
    # stepwise: go on from a random candidate (the paper) | the best
    follow: str = flag("random", choices=("random", "best"))
    # train the last step too (sigma 0.001 -> 0: its std is ~1e4 float32 roundings of the state, its
    # gradient mostly rounding); false: sampled, never in the loss, as Flow-GRPO
    train_last_step: bool = False
    steps: int = flag(10, "[1, inf)")  # SDE steps per rollout
    # Flow-GRPO's a: g = a sqrt(sigma / (1 - sigma)) (sde.py); GRPO needs a stochastic sampler
    noise_level: float = flag(0.7, "(0, inf)")
    # guidance in rollouts and loss (1: none, half the passes)
    cfg_scale: float = flag(4.0, "[0, inf)")
    eval_cfg_scale: float = flag(4.0, "[0, inf)")  # guidance of the held-out evaluation samples
    shift: float = flag(1.0, "(0, inf)")  # SD3's schedule shift (1: none; SD3 at 1024 px: 3)
    lr: float = flag(3e-5, "(0, inf)")
    weight_decay: float = flag(0.0, "[0, inf)")
    lora_rank: int = flag(0, "[0, inf)", zero="a full fine-tune")  # r > 0: LoRA on attention
    # PPO's clip (per-pixel mean log-probs: ratios stay near 1)
    clip_range: float = flag(1e-3, "(0, inf)")
    adv_clip: float = flag(5.0, "(0, inf)")
    # weight of the exact Gaussian KL to the frozen base policy. Flow-GRPO's KL is ours x |dt|,
    # so its beta is kl_weight = beta |dt| here (10 steps: |dt| = 0.111)
    kl_weight: float = flag(0.0, "[0, inf)", zero="no KL")
    # the loss's gradient through guidance's unconditional branch too (the exact gradient);
    # false: detached, as Flow-GRPO's loss
    uncond_grad: bool = True
    minibatches: int = flag(2, "[1, inf)")  # optimizer steps per update
    # pairs per backward pass (less memory)
    loss_batch: int = flag(0, "[0, inf)", zero="a minibatch's")
    grad_clip: float = flag(1.0, "(0, inf)")
    eval_every: int = flag(20, "[1, inf)")
    eval_per_prompt: int = flag(8, "[1, inf)")  # ODE samples per held-out prompt an evaluation
    eval_steps: int = flag(20, "[1, inf)")
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    resume: bool = False               # continue out_dir's run (MAY_CHANGE below may change)
    overwrite: bool = False            # start afresh in a used out_dir (its run's files removed)
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)
    grad_checkpointing: bool = False   # re-run each policy block in the backward: less memory
    # rows per rollout policy pass, per DRM pass (less memory)
    rollout_batch: int = flag(0, "[0, inf)", zero="all at once")
    drm_batch: int = flag(0, "[0, inf)", zero="all at once")
    fsdp: bool = False                 # under torchrun: shard weights, grads and optimizer state
    device: str = "auto"
    RENAMED = {"group_size": "per_prompt"}  # flags of earlier versions


# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "updates", "max_nfe", "eval_every", "device", "compile", "grad_checkpointing",
              "rollout_batch", "drm_batch", "loss_batch", "fsdp"}
# a run's files
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors", "transformer", "lora")

# -----------------------------------------------------------------------------
# One update: the rollout, its advantages, the AdamW steps


def rollout(cfg, models, base, train_prompts, rng, ranks, *, step):
    """This rank's rollout of the update's prompts -> (Rollout, the terminal rewards of every rank's
    trajectories or None (stepwise: the candidates' rewards are in the Rollout), the Scorer)."""
    run, mine = settings(cfg), ranks.shard(cfg.trajectories, "--trajectories")
    prompts, noise = train_ops.draw_prompts(train_prompts, cfg.trajectories // run.per_prompt,
                                            run.per_prompt, rng, models.policy, base.latent_size)
    device = next(models.policy.parameters()).device
    noise, prompts = noise[mine].to(device), prompts[mine]
    scorer = train_ops.Scorer(models.drm, models.drm_text, prompts, cfg.drm_batch, ranks.world)
    cond, uncond = base.encode(prompts)
    sigmas = sigma_schedule(cfg.steps, cfg.shift).to(device)
    velocity = lambda *inputs: in_chunks(models.policy, cfg.rollout_batch, *inputs)  # noqa: E731
    mode = CREDIT[cfg.credit]
    models.policy.eval()
    with autocast(device):
        trajectories = mode.rollout(
            velocity, noise, cond, uncond, sigmas, run, scorer, SCORES[cfg.score],
            noise_level=cfg.noise_level, cfg_scale=cfg.cfg_scale,
            window=window_at(cfg, step, rng.window), train_last=cfg.train_last_step,
            generator=rng.sde, picks=rng.picks, shard=ranks.shard_id)
        final_rewards = None
        if mode.terminal:  # gathered from every rank: each prompt's group is normalised whole
            rows = torch.arange(len(noise), device=device)
            with torch.no_grad():
                final = scorer(trajectories.final, torch.zeros(len(noise), device=device), rows)
            final_rewards = ranks.gather(final)
    models.policy.train()
    return trajectories, final_rewards, scorer


def update(cfg, models, trajectories, advantages, rng, ranks, *, step, advice):
    """Every trained (step, trajectory) pair of the rollout once, in `minibatches` AdamW steps (a
    minibatch in pieces: train_ops.pieces) -> (mean stats, DiT forward passes, DiT backward
    passes)."""
    world, mine = ranks.world, ranks.shard(cfg.trajectories, "--trajectories")
    marked = trajectories.trained.repeat(1, world).flatten()  # the ranks' rows are marked alike
    pairs = marked.nonzero().flatten()[torch.randperm(int(marked.sum()), generator=rng.order)]
    references = 2 if models.reference is not None else 1  # the KL's frozen copy, run beside
    backwards = passes(trajectories.uncond, cfg.cfg_scale)  # the policy's passes of a pair
    stats, nfe = [], 0
    for minibatch in pairs.to(trajectories.states.device).chunk(cfg.minibatches):
        models.optimizer.zero_grad(set_to_none=True)
        for step_ids, rows, weight in train_ops.pieces(minibatch, cfg.trajectories, mine, world,
                                                        cfg.loss_batch):
            with autocast(trajectories.states.device):
                loss, piece_stats = grpo_loss(
                    models.loss_policy, trajectories, advantages, step_ids, rows,
                    clip_range=cfg.clip_range, adv_clip=cfg.adv_clip, kl_weight=cfg.kl_weight,
                    reference=models.reference, uncond_grad=cfg.uncond_grad)
            loss = loss * weight
            check_finite(loss, step, "loss", advice)
            loss.backward()
            if weight or not stats:
                stats.append(piece_stats)
        train_ops.optimizer_step(models, cfg.grad_clip, step, advice)
        nfe += len(minibatch) * backwards * references
    means = {key: sum(s[key].item() for s in stats) / len(stats) for key in stats[0]}
    return means, nfe, len(pairs) * backwards


def grpo_step(cfg, base, models, train_prompts, ranks, *, step, advice):
    """One update -> (stats, the passes it made on all ranks: {"nfe": DiT forward passes,
    "backward_passes": DiT backward passes, "drm_calls": DRM passes})."""
    rng = train_ops.streams(cfg.seed, step)
    trajectories, final_rewards, scorer = rollout(cfg, models, base, train_prompts, rng, ranks,
                                                  step=step)
    advantages = CREDIT[cfg.credit].advantages(trajectories, final_rewards, settings(cfg),
                                               ranks.shard(cfg.trajectories), ranks.gather)
    stats, nfe, backward = update(cfg, models, trajectories, advantages, rng, ranks, step=step,
                                  advice=advice)
    last = int(trajectories.trained.any(1).nonzero().max())  # the last trained step
    rewards = trajectories.rewards[last] if final_rewards is None else final_rewards
    stats["train_reward"] = rewards.mean().item()
    stats["trained_pairs"] = int(trajectories.trained.sum()) * ranks.world
    return stats, {"nfe": trajectories.nfe * ranks.world + nfe, "backward_passes": backward,
                   "drm_calls": scorer.calls}

# -----------------------------------------------------------------------------
# The loop


def check(cfg):
    """Every flag's value, before any work (bench/gpu_check.py checks its own the same way)."""
    check_flags(cfg)
    check_credit(cfg)
    check_objective(cfg)
    check_model_flags(cfg)


def main(cfg):
    cfg = with_objective(cfg)  # DiffusionNFT's and AWM's own settings, unless given
    check(cfg)
    inputs = {**model_inputs(cfg), "--drm=": cfg.drm, "--prompts=": cfg.prompts,
              "--eval_prompts=": cfg.eval_prompts}
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, OUTPUTS, inputs=inputs) as run_dir, \
            GracefulStop() as stop:
        print_config(cfg)
        state = load_training_state(run_dir.file("train_state.pt"), "cpu") if cfg.resume else None
        if state:
            check_resumed_config(state["config"], cfg, MAY_CHANGE)
            run_dir.check_inputs(state.get("inputs"))
        device, ranks = setup_device(cfg.device)
        mine, per_prompt = ranks.shard(cfg.trajectories, "--trajectories"), settings(cfg).per_prompt
        if (mine.stop - mine.start) % per_prompt and cfg.credit == "tree":
            raise UserError("--credit=tree: each process grows whole trees; make --trajectories a "
                            f"multiple of {per_prompt} x {ranks.world} processes")
        if cfg.objective != "ppo" and ranks.world > 1:
            raise UserError(f"--objective={cfg.objective} runs in one process (no torchrun)")
        if cfg.fsdp and ranks.world == 1:
            raise UserError("--fsdp shards the policy over torchrun's processes: launch with "
                            "torchrun --nproc_per_node=N")
        torch.manual_seed(cfg.seed)
        base = load_base(cfg, device)
        train_prompts = base.train_prompts(cfg.prompts)
        heldout = base.heldout_prompts(cfg.eval_prompts, train_prompts)
        base.prepare(train_prompts + heldout, run_dir.file("cache"))  # SD3: embedded once, cached
        models = train_ops.build_models(cfg, base, device, ranks)
        costs = train_ops.pass_costs(base, models, train_prompts[0])
        print(f"a DRM pass costs {costs['drm_cost']:.3f} DiT passes, a DiT backward pass "
              f"{costs['backward_cost']:.3f} (FLOPs counted)")
        step, counters = (train_ops.resume_run(cfg, run_dir, state, models, costs) if state else
                          (0, {"nfe": 0, "backward_passes": 0, "drm_calls": 0,
                               "dit_equivalents": 0.0, "time_s": 0.0, **costs}))
        if step == 0:
            train_ops.evaluate_and_save(cfg, run_dir, ranks, base, models, heldout, step=0,
                                        counters=counters, save=False, stop=stop)
        spent = lambda: cfg.max_nfe and counters["dit_equivalents"] >= cfg.max_nfe  # noqa: E731
        bar = tqdm(initial=step, total=cfg.updates, desc=f"{cfg.objective} {cfg.credit}",
                   disable=not ranks.main)
        one_update = grpo_step if cfg.objective == "ppo" else matching_update
        while step < cfg.updates and not spent() and not any_rank(stop):
            t0 = time.time()
            train_stats, made = one_update(cfg, base, models, train_prompts, ranks,
                                           step=step + 1, advice=run_dir.advice())
            step += 1
            for key, n in made.items():
                counters[key] += n
            counters["dit_equivalents"] = train_ops.equivalents(counters)
            counters["time_s"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(reward=f"{train_stats['train_reward']:.3f}",
                            loss=f"{train_stats['policy_loss']:.3g}")
            if step % cfg.eval_every == 0 or step >= cfg.updates or spent():
                train_ops.evaluate_and_save(cfg, run_dir, ranks, base, models, heldout, step=step,
                                            counters=counters, train_stats=train_stats)
        bar.close()
        if any_rank(stop):
            train_ops.finish_stopped(cfg, run_dir, base, models, step=step, counters=counters,
                                     advice=run_dir.advice())
            return None
    return models.policy


if __name__ == "__main__":
    run_main(main, Config)
