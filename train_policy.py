"""Fine-tune the DiT with GRPO against the DRM: step-wise credit (the paper) or the sparse / cosine baselines.

    python train_policy.py                                  # step-wise GRPO on the CPU toy (5 minutes on 2 cores)
    python train_policy.py --credit=sparse                  # Flow-GRPO: terminal reward on every step
    python train_policy.py --credit=cosine                  # terminal reward spread by cosine credit
    python train_policy.py --resume                         # continue an interrupted run
    torchrun --nproc_per_node=8 train_policy.py             # DDP: the rollouts split over 8 processes
    torchrun --nproc_per_node=8 train_policy.py --fsdp      # FSDP: the policy's weights too (large models)
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --resolution=512 \
        --prompts=prompts.txt --drm=out/drm/model.safetensors --lora_rank=16   # public weights (sd3_pipeline.py)

One update: `trajectories` SDE rollouts on training prompts, DRM rewards, advantages
(grpo.py), then `minibatches` AdamW steps on the PPO-clipped loss over the
rollout's (step, trajectory) pairs. Every mode spends the same DiT passes per
update: stepwise draws k candidates per step from one policy mean (DRM passes
are counted apart), sparse and cosine run the trajectories as groups of k per
prompt. Every `eval_every` updates: ODE samples of the held-out prompts with
fixed seeds, scored by the simulated annotator (gold, never seen in training)
and by the DRM, one JSON line in OUT_DIR/metrics.jsonl and a grid PNG.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (GracefulStop, ModelFlags, RunDir, UserError, any_rank, autocast, check_finite, check_numbers,
                    check_resumed_config, check_state_fits, check_weights, load_model, load_training_state, print_config,
                    read_text, run_main, save_base, save_training_state, setup_device)
from data.world import HELDOUT_PROMPTS, TRAIN_PROMPTS, tokenize
from grpo import CREDIT_MODES, credit_advantages, grpo_loss, sample_rollout
from model import DiT, TextEncoder, add_lora, export_state_dict, in_chunks, set_compile
from reward import load_drm
from sample import encode_prompts, evaluate, generate, initial_noise, save_grid, sigma_schedule


# checkpoints hold whole tensors on the CPU (gathered from the ranks' shards under --fsdp), so any number of
# processes, or one, can resume them
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Config(ModelFlags):                  # --model, --ckpt_dir, ... for public SD3 weights (common.py)
    base: str = "data/base.safetensors"    # the toy's policy starts from this DiT (and reads prompts with its text encoder)
    drm: str = "data/drm.safetensors"      # the reward model
    prompts: str = ""                      # a text file, one training prompt per line (default: data/world.py's)
    eval_prompts: str = ""                 # one per line (default: the toy's held-out prompts; SD3: the first 8 of --prompts)
    out_dir: str = "out/policy"
    credit: str = "stepwise"               # stepwise (the paper) | sparse (Flow-GRPO) | cosine (arXiv 2505.19196)
    updates: int = 60
    max_nfe: int = 0                       # also stop once this many DiT forward passes are spent (0: no limit)
    trajectories: int = 16                 # rollouts per update
    k: int = 4                             # stepwise: candidates per step; sparse/cosine: trajectories per prompt
    steps: int = 10                        # SDE steps per rollout
    noise_level: float = 0.7               # Flow-GRPO's a in sigma_t = a sqrt(sigma / (1 - sigma))
    cfg_scale: float = 4.0                 # guidance in rollouts and in the loss (1: none, half the DiT passes)
    eval_cfg_scale: float = 4.0            # guidance of the held-out evaluation samples
    shift: float = 1.0                     # SD3 schedule shift
    follow: str = "random"                 # stepwise: go on from a random candidate (the paper) or the best
    lr: float = 3e-5
    weight_decay: float = 0.0
    lora_rank: int = 0                     # 0: full fine-tune; r > 0: LoRA of rank r on the attention projections
    clip_range: float = 1e-3               # PPO clip on the ratio (log-probs are per-pixel means, so ratios stay near 1)
    adv_clip: float = 5.0
    kl_weight: float = 0.0                 # weight of the exact Gaussian KL to the frozen base policy. Flow-GRPO's KL is
                                           # ours x |dt|: its beta is kl_weight = beta |dt| (10 steps: |dt| = 0.111)
    uncond_grad: bool = True               # the loss's gradient flows through guidance's unconditional branch too
                                           # (the exact gradient); false: detached, as Flow-GRPO's loss
    minibatches: int = 2                   # optimizer steps per update
    grad_clip: float = 1.0
    eval_every: int = 20
    eval_per_prompt: int = 8               # ODE samples per held-out prompt at each evaluation
    eval_steps: int = 20
    seed: int = 0
    resume: bool = False                   # continue the run in out_dir (learning rate, length, evaluation cadence and
                                           # memory knobs may change; any other flag must be the run's)
    overwrite: bool = False                # start afresh in an out_dir an earlier run used (its files are removed)
    compile: bool = False                  # torch.compile the DiT and DRM blocks and the SDE step (model.py)
    grad_checkpointing: bool = False       # recompute each policy block in the loss's backward: less memory
    rollout_batch: int = 0                 # rollout policy passes this many rows at a time (0: all; less memory)
    drm_batch: int = 0                     # DRM scoring this many candidates at a time (0: all; less memory)
    fsdp: bool = False                     # under torchrun: shard weights, gradients and optimizer state (large models)
    device: str = "auto"


# the flags a resumed run may change; any other change would make it another experiment
MAY_CHANGE = {"lr", "updates", "max_nfe", "eval_every", "device", "compile", "grad_checkpointing", "rollout_batch",
              "drm_batch", "fsdp"}
OUTPUTS = ("metrics.jsonl", "train_state.pt", "model.safetensors", "transformer")  # what a run writes in out_dir


def read_prompts(path, default, flag, toy):
    """A file's non-empty lines (the toy's: checked against its vocabulary), or the default when no file is given."""
    if not path:
        if default is None:
            raise UserError(f"--{flag}: give a text file of prompts, one per line")
        return default
    prompts = [line.strip() for line in read_text(path, f"--{flag}=").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--{flag}={path} holds no prompt; write one prompt per line")
    if toy:
        tokenize(prompts)  # unknown words fail here, naming the prompt
    return prompts


def check(cfg):
    check_numbers(cfg)
    if cfg.credit not in CREDIT_MODES:
        raise UserError(f"--credit={cfg.credit}: choose one of {', '.join(CREDIT_MODES)}")
    if cfg.k < 2:
        raise UserError(f"--k={cfg.k}: GRPO compares at least 2 samples per group")
    if cfg.credit != "stepwise" and cfg.trajectories % cfg.k:
        raise UserError(f"--trajectories={cfg.trajectories} must be a multiple of --k={cfg.k} (groups of k per prompt)")
    for name in ("updates", "trajectories", "steps", "minibatches", "eval_every", "eval_per_prompt", "eval_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    for name in ("rollout_batch", "drm_batch"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name}={getattr(cfg, name)}: rows per pass, at least 1 (or 0 for all at once)")
    if cfg.follow not in ("random", "best"):
        raise UserError(f"--follow={cfg.follow}: choose random (the paper) or best")
    if not 0 < cfg.noise_level:
        raise UserError(f"--noise_level={cfg.noise_level}: GRPO needs a stochastic sampler, use > 0 (0.7 is Flow-GRPO's)")
    if not cfg.shift > 0:
        raise UserError(f"--shift={cfg.shift}: SD3's schedule shift is positive (1: none; SD3 at 1024 px: 3)")


def export_policy(out_dir, policy_state, config, lora_rank, text_encoder, step):
    """The policy's whole state dict, LoRA folded in, as a file sample.py reads: the toy's base checkpoint
    (out_dir/model.safetensors, for --ckpt) or an SD3 transformer in diffusers' layout (out_dir/transformer)."""
    with torch.device("meta"):
        policy, plain = DiT(config), DiT(config)
        if lora_rank:
            add_lora(policy, rank=lora_rank, alpha=float(lora_rank))
    policy.load_state_dict(policy_state, assign=True)
    plain.load_state_dict(export_state_dict(policy), assign=True)
    if isinstance(text_encoder, TextEncoder):
        save_base(os.path.join(out_dir, "model.safetensors"), plain, text_encoder, step)
    else:
        from sd3 import save_sd3
        save_sd3(plain, os.path.join(out_dir, "transformer"))


class Scorer:
    """The DRM on one batch of prompts, `batch` rows a pass; `calls` counts the states it scored (on every rank)."""

    def __init__(self, drm, drm_text, prompts, batch, world=1):
        self.drm, self.batch, self.world, self.calls = drm, batch, world, 0
        self.context, self.pooled = encode_prompts(drm_text, prompts)[0]

    def __call__(self, x, sigma, rows):
        """x (N, C, H, W) at sigma (N,); rows (N,): the prompt of each -> scores (N,)."""
        self.calls += x.shape[0] * self.world
        return in_chunks(self.drm, self.batch, x, sigma, self.context[rows], self.pooled[rows]).float()


def rollout(cfg, policy, text, scorer, noise, prompts, generator, ranks):
    """SDE trajectories from noise for this rank's prompts -> (Rollout, terminal rewards of all ranks' trajectories,
    or None for stepwise credit, whose rewards are the k candidates' scores in the Rollout)."""
    stepwise = cfg.credit == "stepwise"
    cond, uncond = encode_prompts(text, prompts)
    policy.eval()
    with autocast(noise.device):
        trajectories = sample_rollout(
            lambda *inputs: in_chunks(policy, cfg.rollout_batch, *inputs), noise, cond, uncond,
            sigma_schedule(cfg.steps, cfg.shift).to(noise.device), cfg.noise_level, cfg.cfg_scale,
            k=cfg.k if stepwise else 1, reward=scorer if stepwise else None, follow=cfg.follow, generator=generator,
            shard=(ranks.rank, ranks.world))
        final_rewards = None
        if not stepwise:  # gathered from every rank, so that each prompt's group is normalised whole
            with torch.no_grad():
                rows = torch.arange(len(noise), device=noise.device)
                final_rewards = ranks.gather(scorer(trajectories.final, torch.zeros_like(rows, dtype=torch.float), rows))
    policy.train()
    return trajectories, final_rewards


def update(cfg, trained, optimizer, reference, trajectories, advantages, mine, generator, *, step, advice):
    """Every (step, trajectory) pair of the rollout once, in `minibatches` AdamW steps -> (mean stats, DiT passes).

    A rank computes the pairs of its own trajectories, its mean weighted by its share of the minibatch, so that
    DDP's average over the ranks is the minibatch mean; a rank with no pair there runs one at weight 0 (DDP needs
    every rank in each step).
    """
    world = cfg.trajectories // trajectories.states.shape[1]
    pairs = torch.randperm(cfg.steps * cfg.trajectories, generator=generator).to(trajectories.states.device)
    params = optimizer.param_groups[0]["params"]
    passes = (2 if cfg.cfg_scale != 1 else 1) * (2 if reference is not None else 1)
    stats, nfe = [], 0
    for chunk in pairs.chunk(cfg.minibatches):
        steps, rows = chunk // cfg.trajectories, chunk % cfg.trajectories
        here = (rows >= mine.start) & (rows < mine.stop)
        n_here = int(here.sum())
        steps, rows = (steps[here], rows[here] - mine.start) if n_here else (steps[:1] * 0, rows[:1] * 0)
        with autocast(trajectories.states.device):
            loss, chunk_stats = grpo_loss(trained, trajectories, advantages, steps, rows, cfg.noise_level, cfg.cfg_scale,
                                          cfg.clip_range, cfg.adv_clip, cfg.kl_weight, reference, cfg.uncond_grad)
        loss = loss * (n_here * world / len(chunk))
        optimizer.zero_grad(set_to_none=True)
        check_finite(loss, step, "loss", advice)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        check_finite(grad_norm, step, "gradient norm", advice)
        optimizer.step()
        stats.append(chunk_stats)
        nfe += len(chunk) * passes
    return {key: sum(s[key].item() for s in stats) / len(stats) for key in stats[0]}, nfe


def evaluate_policy(cfg, policy, base, drm, drm_text, heldout, judge):
    """ODE samples of the held-out prompts with fixed seeds -> (the DRM's mean score and, in the toy, the annotator's
    figures; the images). Every rank takes part under FSDP (a sharded policy needs all of them in each pass)."""
    policy.eval()
    sampling = dict(seed=1234, steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg_scale, shift=cfg.shift)
    if judge is not None:
        summary, samples, prompts = evaluate(policy, base.text, judge, heldout, cfg.eval_per_prompt, **sampling)
    else:
        prompts = [p for p in heldout for _ in range(cfg.eval_per_prompt)]
        summary, samples = {}, generate(policy, base.text, prompts, batch_size=cfg.rollout_batch or 100,
                                        size=base.latent_size, **sampling)
    device = next(policy.parameters()).device
    (context, pooled), _ = encode_prompts(drm_text, prompts)
    with torch.no_grad():
        scores = in_chunks(drm, cfg.drm_batch, samples.to(device), torch.zeros(len(samples), device=device), context, pooled)
        summary["drm"] = scores.mean().item()
        images = torch.cat([base.to_images(s.to(device)).cpu() for s in samples.split(cfg.rollout_batch or 100)])
    policy.train()
    return summary, images


def save_run(cfg, run_dir, policy, optimizer, text_encoder, *, step, counters, generator):
    """The policy (LoRA folded in) for sample.py, and the train state for --resume; every rank takes part (FSDP
    gathers the whole tensors), rank 0 writes."""
    policy_state, optimizer_state = get_state_dict(policy, optimizer, options=WHOLE)
    if run_dir.main:
        export_policy(cfg.out_dir, policy_state, policy.config, cfg.lora_rank, text_encoder, step)
        save_training_state(run_dir.file("train_state.pt"), {
            "policy": policy_state, "optimizer": optimizer_state, "step": step, "counters": counters,
            "torch_rng": torch.get_rng_state(), "generator": generator.get_state(), "config": asdict(cfg)})
    run_dir.last_saved = step


def evaluate_and_save(cfg, run_dir, ranks, policy, optimizer, models, heldout, judge, *, step, counters, generator,
                      train_stats=None, save=True, stop=False):
    """Evaluate; refuse to save or log a diverged policy (NaN metrics, non-finite weights); save; log one line.
    A stop asked for during the evaluation before any update leaves nothing behind."""
    summary, images = {}, None
    if ranks.main or cfg.fsdp:
        summary, images = evaluate_policy(cfg, policy, *models, heldout, judge)
    if step == 0 and any_rank(stop):
        return
    check_finite(summary, step, "held-out evaluation", run_dir.advice())
    check_weights(policy, step, run_dir.advice())
    if save:
        save_run(cfg, run_dir, policy, optimizer, models[0].text, step=step, counters=counters, generator=generator)
    if ranks.main:
        shown = min(cfg.eval_per_prompt, 8)
        save_grid(images.view(len(heldout), cfg.eval_per_prompt, *images.shape[1:])[:, :shown].flatten(0, 1),
                  run_dir.file(f"samples_{step:05d}.png"), nrow=shown)
        record = {"step": step, "credit": cfg.credit, "seed": cfg.seed, **counters, **summary, **(train_stats or {})}
        with open(run_dir.file("metrics.jsonl"), "a") as log:
            log.write(json.dumps(record) + "\n")
        tqdm.write(f"update {step:4d} | " + " | ".join(f"{key} {value:.4f}" for key, value in summary.items())
                   + f" | nfe {counters['nfe']} | {counters['time_s']:.0f} s")


def main(cfg):
    check(cfg)
    toy = cfg.model == "toy"
    train_prompts = read_prompts(cfg.prompts, TRAIN_PROMPTS if toy else None, "prompts", toy)
    heldout = read_prompts(cfg.eval_prompts, HELDOUT_PROMPTS if toy else train_prompts[:8], "eval_prompts", toy)
    with RunDir(cfg.out_dir, cfg.resume, cfg.overwrite, OUTPUTS) as run_dir, GracefulStop() as stop:
        print_config(cfg)
        state = load_training_state(run_dir.file("train_state.pt"), "cpu") if cfg.resume else None
        if state:
            check_resumed_config(state["config"], cfg, MAY_CHANGE)
        device, ranks = setup_device(cfg.device)
        mine = ranks.shard(cfg.trajectories, "--trajectories")  # this rank's trajectories of each update
        if cfg.fsdp and ranks.world == 1:
            raise UserError("--fsdp shards the policy over torchrun's processes: launch with torchrun --nproc_per_node=N")
        set_compile(cfg.compile)
        torch.manual_seed(cfg.seed)
        from data.judge import Judge
        judge = Judge() if toy else None  # the simulated annotator exists in the toy world only
        base = load_model(cfg, cfg.base, device)
        policy = base.dit if cfg.lora_rank else base.dit.float()  # a full fine-tune trains float32 weights
        drm, drm_text, _ = load_drm(cfg.drm, device, policy=policy, text=base.text)
        drm.requires_grad_(False)
        reference = copy.deepcopy(policy).requires_grad_(False) if cfg.kl_weight > 0 else None
        if cfg.lora_rank > 0:
            add_lora(policy, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))
        policy.grad_checkpointing = cfg.grad_checkpointing
        if cfg.fsdp:  # each rank holds 1/N of every block's weights (and grads, optimizer state), gathered per block
            for module in filter(None, (policy, reference)):
                for block in module.joint_blocks:
                    fully_shard(block)
                fully_shard(module)
        params = [p for p in policy.parameters() if p.requires_grad]
        # under torchrun, DDP (or FSDP) averages the loss's gradients over the ranks (the weights start equal: same seed)
        trained = DDP(policy, broadcast_buffers=False) if ranks.world > 1 and not cfg.fsdp else policy
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        print(f"policy: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters "
              f"({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tune'}); credit {cfg.credit}")

        step, counters = 0, {"nfe": 0, "drm_calls": 0, "time_s": 0.0}
        generator = torch.Generator().manual_seed(cfg.seed)  # prompts, noise and candidate picks of the rollouts
        if state:
            check_state_fits(run_dir.file("train_state.pt"), "policy", policy, state["policy"])
            set_state_dict(policy, optimizer, model_state_dict=state["policy"], optim_state_dict=state["optimizer"],
                           options=WHOLE)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr  # the flag, not the saved value: a resume may lower it
            step, counters = state["step"], state["counters"]
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            run_dir.last_saved = step
            run_dir.trim_metrics(step)
        models = (base, drm, drm_text)
        saving = dict(counters=counters, generator=generator)
        if step == 0:
            evaluate_and_save(cfg, run_dir, ranks, policy, optimizer, models, heldout, judge, step=0, save=False,
                              stop=stop, **saving)
        # stepwise takes one trajectory per prompt; sparse/cosine groups of k per prompt
        n_prompts = cfg.trajectories if cfg.credit == "stepwise" else cfg.trajectories // cfg.k
        bar = tqdm(initial=step, total=cfg.updates, desc=f"grpo {cfg.credit}", disable=not ranks.main)
        while step < cfg.updates and not (cfg.max_nfe and counters["nfe"] >= cfg.max_nfe) and not any_rank(stop):
            t0 = time.time()
            # the update's prompts and noise are drawn whole on every rank; each rank runs its rows
            picks = torch.randint(len(train_prompts), (n_prompts,), generator=generator).tolist()
            prompts = [train_prompts[i] for i in picks for _ in range(cfg.trajectories // n_prompts)]
            noise = initial_noise(policy, len(prompts), generator, base.latent_size)[mine].to(device)
            scorer = Scorer(drm, drm_text, prompts[mine], cfg.drm_batch, ranks.world)
            trajectories, final_rewards = rollout(cfg, policy, base.text, scorer, noise, prompts[mine], generator, ranks)
            advantages = credit_advantages(cfg.credit, trajectories, final_rewards, cfg.k, cfg.adv_clip, rows=mine,
                                           gather=ranks.gather)
            train_stats, nfe = update(cfg, trained, optimizer, reference, trajectories, advantages, mine, generator,
                                      step=step + 1, advice=run_dir.advice())
            step += 1
            counters["nfe"] += len(prompts) * cfg.steps * (2 if cfg.cfg_scale != 1 else 1) + nfe
            counters["drm_calls"] += scorer.calls
            counters["time_s"] += time.time() - t0
            bar.update(1)
            train_stats["train_reward"] = (trajectories.rewards[-1] if final_rewards is None else final_rewards).mean().item()
            bar.set_postfix(reward=f"{train_stats['train_reward']:.3f}", clip=f"{train_stats['clip_fraction']:.2f}")
            done = step >= cfg.updates or (cfg.max_nfe and counters["nfe"] >= cfg.max_nfe)
            if step % cfg.eval_every == 0 or done:
                evaluate_and_save(cfg, run_dir, ranks, policy, optimizer, models, heldout, judge, step=step,
                                  train_stats=train_stats, **saving)
        bar.close()
        if any_rank(stop):
            if step and run_dir.last_saved != step:
                check_weights(policy, step, run_dir.advice())
                save_run(cfg, run_dir, policy, optimizer, base.text, step=step, **saving)
            print(f"stopped: {f'saved update {step} to {cfg.out_dir}; continue with --resume' if step else 'nothing saved'}")
            return None
    return policy


if __name__ == "__main__":
    run_main(main, Config)
