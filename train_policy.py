"""Fine-tune the DiT with step-wise GRPO against the DRM (DRM, sec. 4).

    python train_policy.py                           # step-wise GRPO on the CPU toy (4 min)
    python train_policy.py --credit=sparse           # a rival: Flow-GRPO's terminal reward
    python train_policy.py --resume                  # continue an interrupted run
    torchrun --nproc_per_node=8 train_policy.py      # DDP: the rollouts split over 8 processes
    torchrun --nproc_per_node=8 train_policy.py --fsdp   # FSDP: the weights too (large models)
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium \
        --resolution=512 --prompts=prompts.txt --drm=out/drm/model.safetensors --lora_rank=16

One update (grpo_update): `trajectories` SDE rollouts, `per_prompt` of each of the update's
prompts, every trained step's k candidates scored by the DRM (grpo.sample_rollout); their
advantages, normalised within each step's k (grpo.stepwise_advantages); then `minibatches` AdamW
steps on the PPO-clipped loss over the rollout's trained (step, trajectory) pairs (grpo.grpo_loss).
Every pass is counted: DiT passes, and DRM passes and backward passes at their FLOPs' share of a
DiT pass (`--max_nfe` is a budget of DiT-pass equivalents). Every `eval_every` updates: ODE
samples of the held-out prompts with fixed seeds, scored by the DRM and, in the toy, by the
simulated annotator (gold, never seen in training); one JSON line in OUT_DIR/metrics.jsonl, a grid
PNG, a checkpoint. The rivals (other credit rules, scores, windows, objectives: --credit, --score,
--sde_window, --objective, ...) come in through one door, rivals/policy.py; the operations
(devices, streams, checkpoints) are train_ops.py's.
"""
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import grpo
import rivals.policy
import train_ops
from base import ModelFlags, load_base
from checkpoints import GracefulStop, RunDir, load_training_state
from common import (UserError, any_rank, check_flags, flag, group, print_config, run_main,
                    setup_device)
from evaluation import EvalFlags
from sde import passes


@dataclass
class Config:
    drm: str = "data/drm.safetensors"  # the reward model
    prompts: str = ""                  # training prompts, one a line (the toy's default: its 80)
    out_dir: str = "out/policy"
    updates: int = flag(60, "[1, inf)")
    # also stop after this many DiT-pass equivalents
    max_nfe: int = flag(0, "[0, inf)", zero="no limit")
    trajectories: int = flag(16, "[1, inf)")  # rollouts per update
    per_prompt: int = flag(4, "[2, inf)")  # of them a prompt's (a rival's group)
    k: int = flag(4, "[2, inf)")       # candidates per step, around one policy mean
    # go on from a random candidate (the paper) | the best
    follow: str = flag("random", choices=("random", "best"))
    # train the last step too (sigma 0.001 -> 0: its std is ~1e4 float32 roundings of the state, its
    # gradient mostly rounding); false: sampled, never in the loss, as Flow-GRPO
    train_last_step: bool = False
    steps: int = flag(10, "[1, inf)")  # SDE steps per rollout
    # Flow-GRPO's a: g = a sqrt(sigma / (1 - sigma)) (sde.py); GRPO needs a stochastic sampler
    noise_level: float = flag(0.7, "(0, inf)")
    # guidance in rollouts and loss (1: none, half the passes)
    cfg_scale: float = flag(4.0, "[0, inf)")
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
    grad_clip: float = flag(1.0, "(0, inf)")
    seed: int = flag(0, "[0, 4294967295]")  # the random streams (any 32-bit number)
    resume: bool = False               # continue out_dir's run (MAY_CHANGE below may change)
    overwrite: bool = False            # start afresh in a used out_dir (its run's files removed)
    # the groups, each flag given by its own name: the base model (--model, --base, --ckpt_dir,
    # ...: base.py), the evaluation (--eval_every, ...: evaluation.py), memory and speed
    # (--device, --compile, --rollout_batch, ...: train_ops.py), the rivals (--credit, --score,
    # --sde_window, --objective, ...: rivals/policy.py)
    pretrained: ModelFlags = group(ModelFlags)
    evaluation: EvalFlags = group(EvalFlags)
    hardware: train_ops.HardwareFlags = group(train_ops.HardwareFlags)
    rival: rivals.policy.Flags = group(rivals.policy.Flags)
    RENAMED = {"group_size": "per_prompt"}  # flags of earlier versions


# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "updates", "max_nfe", "eval_every", "device", "compile", "grad_checkpointing",
              "rollout_batch", "drm_batch", "loss_batch", "fsdp"}
# a run's files
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors", "transformer", "lora")

# -----------------------------------------------------------------------------
# One update: the rollout, its advantages, the AdamW steps


def grpo_update(cfg, base, models, train_prompts, ranks, *, update, advice):
    """One update of step-wise GRPO -> (stats, the passes it made on all ranks: {"nfe": DiT
    forward passes, "backward_passes": DiT backward passes, "drm_calls": DRM passes})."""
    batch = train_ops.draw_batch(cfg, base, models, train_prompts, ranks, update=update,
                                 per_prompt=cfg.per_prompt)
    candidates = grpo.Candidates(k=cfg.k, reward=batch.scorer, follow=cfg.follow)
    models.policy.eval()
    with models.precision:
        rollout = grpo.sample_rollout(batch.sampler, batch.noise, noise_level=cfg.noise_level,
                                      candidates=candidates, train_last=cfg.train_last_step,
                                      draws=batch.draws)
    models.policy.train()
    advantages = grpo.stepwise_advantages(rollout.rewards)
    stats, made = ppo_steps(cfg, models, rollout, advantages, batch, ranks, update=update,
                            advice=advice)
    last = int(rollout.trained.any(1).nonzero().max())  # the last trained step
    stats["train_reward"] = rollout.rewards[last].mean().item()
    return stats, made


def ppo_steps(cfg, models, rollout, advantages, batch, ranks, *, update, advice):
    """Every trained (step, trajectory) pair of the rollout once, in `minibatches` AdamW steps on
    grpo_loss (a minibatch in pieces: train_ops.pieces) -> (mean stats, the passes of the update:
    the rollout's and these)."""
    world, mine = ranks.world, batch.mine
    marked = rollout.trained.repeat(1, world).flatten()  # the ranks' rows are marked alike
    pairs = marked.nonzero().flatten()[torch.randperm(int(marked.sum()),
                                                      generator=batch.streams.order)]
    references = 2 if models.reference is not None else 1  # the KL's frozen copy, run beside
    backwards = passes(rollout.uncond, cfg.cfg_scale)  # the policy's passes of a pair
    ppo = grpo.PPO(cfg.clip_range, cfg.adv_clip, cfg.kl_weight, cfg.uncond_grad)
    stats, nfe = [], 0
    for minibatch in pairs.to(rollout.states.device).chunk(cfg.minibatches):
        models.optimizer.zero_grad(set_to_none=True)
        for step_ids, rows, weight in train_ops.pieces(minibatch, cfg.trajectories, mine, world,
                                                        cfg.hardware.loss_batch):
            with models.precision:
                loss, piece_stats = grpo.grpo_loss(models.loss_policy, rollout, advantages,
                                                   step_ids, rows, ppo=ppo,
                                                   reference=models.reference)
            (loss * weight).backward()  # a non-finite loss: optimizer_step refuses its gradient
            if weight or not stats:
                stats.append(piece_stats)
        train_ops.optimizer_step(models, cfg.grad_clip, update, advice)
        nfe += len(minibatch) * backwards * references
    means = {key: sum(s[key].item() for s in stats) / len(stats) for key in stats[0]}
    means["trained_pairs"] = int(rollout.trained.sum()) * world
    return means, {"nfe": rollout.nfe * world + nfe, "backward_passes": len(pairs) * backwards,
                   "drm_calls": batch.scorer.calls}

# -----------------------------------------------------------------------------
# The loop


def check(cfg):
    """Every flag's value, before any work -> cfg (with a rival's recipe: rivals/policy.py);
    bench/gpu_check.py checks its own the same way."""
    check_flags(cfg)
    return rivals.policy.check(cfg)


def main(cfg):
    cfg = check(cfg)
    device, ranks = setup_device(cfg.hardware.device)
    if cfg.hardware.fsdp and ranks.world == 1:
        raise UserError("--fsdp shards the policy over torchrun's processes: launch with "
                        "torchrun --nproc_per_node=N")
    ranks.shard(cfg.trajectories, "--trajectories")  # the rollouts split over the processes
    print_config(cfg)
    inputs = {**cfg.pretrained.inputs(), "--drm=": cfg.drm, "--prompts=": cfg.prompts,
              "--eval_prompts=": cfg.evaluation.eval_prompts}
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, OUTPUTS, inputs=inputs) as run_dir, \
            GracefulStop() as stop:
        state = (load_training_state(run_dir.file("train_state.pt"), "cpu", cfg, MAY_CHANGE)
                 if cfg.resume else None)
        if state:
            run_dir.check_inputs(state.get("inputs"))
        torch.manual_seed(cfg.seed)
        base = load_base(cfg.pretrained, device)
        train_prompts = base.train_prompts(cfg.prompts)
        heldout = base.heldout_prompts(cfg.evaluation.eval_prompts, train_prompts)
        base.prepare(train_prompts + heldout, run_dir.file("cache"))  # SD3: embedded once, cached
        models = train_ops.build_models(cfg, base, device, ranks, reference=cfg.kl_weight > 0)
        costs = train_ops.pass_costs(base, models, train_prompts[0])
        rival = None
        if rivals.policy.chosen(cfg.rival):  # the one door: a rival's update in grpo_update's place
            models, rival = rivals.policy.enter(cfg, models, ranks, train_ops.draw_batch, ppo_steps)
        print(f"a DRM pass costs {costs['drm_cost']:.3f} DiT passes, a DiT backward pass "
              f"{costs['backward_cost']:.3f} (FLOPs counted)")
        update, counters = (train_ops.resume_run(cfg, run_dir, state, models, costs) if state else
                            (0, {"nfe": 0, "backward_passes": 0, "drm_calls": 0,
                                 "dit_equivalents": 0.0, "time_s": 0.0, **costs}))
        if update == 0:
            train_ops.evaluate_and_save(cfg, run_dir, ranks, base, models, heldout, update=0,
                                        counters=counters, save=False, stop=stop)
        spent = lambda: cfg.max_nfe and counters["dit_equivalents"] >= cfg.max_nfe  # noqa: E731
        bar = tqdm(initial=update, total=cfg.updates, desc="updates", disable=not ranks.main)
        while update < cfg.updates and not spent() and not any_rank(stop):
            t0, update = time.time(), update + 1
            if rival is None:  # the paper's update
                train_stats, made = grpo_update(cfg, base, models, train_prompts, ranks,
                                                update=update, advice=run_dir.advice())
            else:
                train_stats, made = rival(cfg, base, models, train_prompts, ranks, update=update,
                                          advice=run_dir.advice())
            for key, n in made.items():
                counters[key] += n
            counters["dit_equivalents"] = train_ops.equivalents(counters)
            counters["time_s"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(reward=f"{train_stats['train_reward']:.3f}",
                            loss=f"{train_stats['policy_loss']:.3g}")
            if update % cfg.evaluation.eval_every == 0 or update >= cfg.updates or spent():
                train_ops.evaluate_and_save(cfg, run_dir, ranks, base, models, heldout,
                                            update=update, counters=counters,
                                            train_stats=train_stats)
        bar.close()
        if any_rank(stop):
            train_ops.finish_stopped(cfg, run_dir, base, models, update=update,
                                     counters=counters, advice=run_dir.advice())
            return None
    return models.policy


if __name__ == "__main__":
    run_main(main, Config)
