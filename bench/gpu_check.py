"""The first thing to run on a new GPU: the Step-GRPO update checked with your own train_policy.py
flags.

    python -m bench.gpu_check # the toy (on the GPU if there is one; a minute on a CPU)
    python -m bench.gpu_check --model=sd3.5-medium --ckpt_dir=sd35m --resolution=512
    --prompts=prompts.txt \
        --drm=out/drm_sd35m/model.safetensors --lora_rank=16 --grad_checkpointing --trajectories=8
        --steps=10

Every train_policy.py flag works here (the defaults are smaller: a few trajectories and steps). It
prints one table and exits 1 if a check fails. What each line means, and what to do when it fails:

| check | passes when | a failure means |
|---|---|---|
| ratio, the rollout's own batches | the loss's log-probs, replayed on the rollout's states with the
policy not yet updated, equal the rollout's: max abs(ratio - 1) = 0 | the rollout and the loss do
not compute the same thing (a mode-dependent layer, a non-deterministic kernel): every update would
start off-policy. Flow-GRPO's first sanity check |
| ratio, a shuffled minibatch | as above on a minibatch mixing steps and trajectories (what training
sees): below clip_range / 10 | batch-dependent rounding as large as PPO's clip: clipping would fire
on noise. Raise --clip_range or train in float32 |
| compiled = eager | the loss's gradient with the blocks compiled (--compile) against eager:
relative L2 difference below 1e-4 (float32) or 3e-2 (bf16) | an Inductor miscompile on this GPU /
driver: train without --compile |
| bf16 loss = float32 loss | a bf16-autocast and a float32 replay of the shuffled minibatch: the
losses differ by less than clip_range x mean abs(advantage), the most PPO's clip lets one update
move the loss | bf16 rounding moves the loss as much as a real update: train in float32 |
| no recompiles after the first update | a second update compiles no new graph (torch._dynamo's
unique_graphs) | shapes or guards change between updates: every update pays compile time |
| one update step's peak memory | measured (a GPU: torch.cuda.max_memory_allocated; a CPU:
MemTracker on real tensors) within 15% of the simulation of bench/sd3_memory.py at this model's size
and flags (--rollout_batch, --drm_batch, --loss_batch, --k; random weights) | the simulated SD3.5
memory table cannot be trusted on this setup; the measured figure is the one to plan with |

Below the table, for information, bf16 against float32 step by step: the largest ratio difference
and the gradients' cosine. Where the SDE's noise is tiny (SD3's last step, sigma 0.001 -> 0: std
7e-4 on the toy) bf16's rounding of the velocity is a sizeable part of it, and the step's log-prob,
its ratio and its gradient are mostly rounding (the toy: ratio 4e-3 apart, gradient cosine 0.39 at
the last step, 1.000 at the first). Training in bf16, consider leaving that step out
(--sde_window=0:T-1; Flow-GRPO's timestep_fraction=0.99 does). On a CPU the bf16 replay runs under
the CPU's bf16 autocast (slow; the CPU trains in float32).
"""
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch._dynamo.utils import counters as dynamo_counters

import rivals.policy
import train_ops
import train_policy
from base import load_base
from bench.sd3_memory import Shapes, grpo_update, peak
from common import (UserError, flag, flag_values, in_chunks, print_config, run_main, setup_device,
                    with_flags)
from grpo import PPO, grpo_loss
from model import compile_regions
from rivals.credit import CREDIT, parse_window, per_prompt, window_at


@dataclass
class Config(train_policy.Config):
    trajectories: int = flag(4, "[1, inf)")  # the ranges are train_policy.py's
    per_prompt: int = flag(2, "[2, inf)")
    k: int = flag(2, "[2, inf)")
    steps: int = flag(4, "[1, inf)")
    minibatches: int = flag(1, "[1, inf)")
    out_dir: str = "out/gpu_check"     # SD3: the prompt-embedding cache goes here


def trainable(policy):
    return [p for p in policy.parameters() if p.requires_grad]


def draw_rollout(cfg, base, models, prompts, ranks):
    """The first update's rollout as train_policy.py draws it, in any credit mode -> (rollout, the
    DRM on its prompts)."""
    batch = train_ops.draw_batch(cfg, base, models, prompts, ranks, update=1,
                                 per_prompt=per_prompt(cfg))
    window = window_at(parse_window(cfg.rival.sde_window, cfg.steps), cfg.steps, 1,
                       batch.streams.window)
    with torch.no_grad(), models.precision:  # the training's precision (Models)
        return CREDIT[cfg.rival.credit].rollout(cfg, batch, window), batch.scorer


def replay(cfg, policy, trajectories, advantages, step_ids, rows, precision):
    """The GRPO loss on the given pairs under `precision` (a context), its gradient -> (stats, flat
    gradient)."""
    chunked = lambda *inputs: in_chunks(policy, cfg.hardware.rollout_batch, *inputs)  # noqa: E731
    for p in trainable(policy):
        p.grad = None
    with precision:
        loss, stats = grpo_loss(chunked, trajectories, advantages, step_ids, rows,
                                ppo=PPO(cfg.clip_range, cfg.adv_clip, uncond_grad=cfg.uncond_grad))
    loss.backward()
    return stats, torch.cat([p.grad.flatten().float() for p in trainable(policy)])


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(cfg):
    cfg = train_policy.check(cfg)
    print_config(cfg)
    device, ranks = setup_device(cfg.hardware.device)
    if ranks.world > 1:
        raise UserError("bench.gpu_check runs in one process: python -m bench.gpu_check, not "
                        "torchrun")
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.pretrained, device)
    prompts = base.train_prompts(cfg.prompts)
    base.prepare(prompts, f"{cfg.out_dir}/cache")
    eager_cfg = with_flags(cfg, compile=False)  # compiled below, after the eager checks
    models = train_ops.build_models(eager_cfg, base, device, ranks, reference=cfg.kl_weight > 0)
    one_update = train_policy.grpo_update
    if rivals.policy.chosen(cfg.rival):  # train_policy.main's door
        models, one_update = rivals.policy.enter(cfg, models, ranks, train_ops.draw_batch,
                                                 train_policy.ppo_steps)
    policy, drm, drm_text, optimizer = models.policy, models.drm, models.drm_text, models.optimizer
    generator = torch.Generator().manual_seed(cfg.seed)  # this check's own draws
    gpu = device.type == "cuda"
    results = []  # (check, measured, limit, passed)

    # 1. the rollout replayed: the importance ratio before any update
    trajectories, scorer = draw_rollout(cfg, base, models, prompts, ranks)
    T, B, k = trajectories.candidates.shape[:3]
    # any advantages: every pair pulls
    advantages = torch.randn(T, B, k, generator=generator).to(device)
    trained_steps = [i for i in range(T) if trajectories.trained[i].any()]
    own = max(replay(cfg, policy, trajectories, advantages, torch.full((B,), i, device=device),
                     torch.arange(B, device=device),
                     models.precision)[0]["ratio_max_deviation"].item()
              for i in trained_steps)
    # a tree's rollout ran node by node, not in rows of leaves: no bitwise replay
    tree = cfg.rival.credit == "tree"
    results.append(("ratio, the rollout's own batches: max abs(ratio - 1)", own,
                    cfg.clip_range / 100 if tree else 0.0,
                    own <= (cfg.clip_range / 100 if tree else 0.0)))
    pairs = trajectories.trained.flatten().nonzero().flatten()
    pairs = pairs[torch.randperm(len(pairs), generator=generator)][
        :max(2, len(pairs) // cfg.minibatches)].to(device)
    step_ids, rows = pairs // B, pairs % B
    stats, eager_gradient = replay(cfg, policy, trajectories, advantages, step_ids, rows,
                                   models.precision)
    shuffled = stats["ratio_max_deviation"].item()
    results.append(("ratio, a shuffled minibatch: max abs(ratio - 1)", shuffled,
                    cfg.clip_range / 10, shuffled < cfg.clip_range / 10))

    # 2. bf16 against float32: the shuffled minibatch's loss, then step by step
    bf16, float32 = (lambda: torch.autocast(device.type, dtype=torch.bfloat16),
                     lambda: torch.autocast(device.type, enabled=False))
    half, _ = replay(cfg, policy, trajectories, advantages, step_ids, rows, bf16())
    full, _ = replay(cfg, policy, trajectories, advantages, step_ids, rows, float32())
    loss_gap = abs(half["policy_loss"].item() - full["policy_loss"].item())
    limit = cfg.clip_range * advantages[step_ids, rows].clamp(-cfg.adv_clip,
                                                              cfg.adv_clip).abs().mean().item()
    results.append(("bf16 loss = float32 loss, a shuffled minibatch: abs difference", loss_gap,
                    limit, loss_gap < limit))
    by_step = []  # (step, sigma, ratio gap, gradient cosine)
    for i in trained_steps:
        here = (torch.full((B,), i, device=device), torch.arange(B, device=device))
        (half, half_gradient), (full, full_gradient) = (
            replay(cfg, policy, trajectories, advantages, *here, precision())
            for precision in (bf16, float32))
        by_step.append((i, trajectories.sigmas[i].item(),
                        abs(half["ratio_max_deviation"].item()
                            - full["ratio_max_deviation"].item()),
                        torch.nn.functional.cosine_similarity(half_gradient, full_gradient,
                                                              dim=0).item()))

    # 3. compiled against eager, then two updates: the second must compile nothing
    compile_regions(policy)
    compile_regions(getattr(drm, "drm", drm).backbone)
    _, compiled_gradient = replay(cfg, policy, trajectories, advantages, step_ids, rows,
                                  models.precision)
    gap, limit = relative(compiled_gradient, eager_gradient), (3e-2 if gpu else 1e-4)
    results.append(("compiled = eager: relative L2 gradient difference", gap, limit, gap < limit))
    advice = "bench.gpu_check"
    one_update(cfg, base, models, prompts, ranks, update=1, advice=advice)
    graphs = dynamo_counters["stats"]["unique_graphs"]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    one_update(cfg, base, models, prompts, ranks, update=2, advice=advice)
    recompiles = dynamo_counters["stats"]["unique_graphs"] - graphs
    results.append(("no recompiles after the first update: new graphs", recompiles, 0,
                    recompiles == 0))
    whole_update = torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None

    # 4. one update step's memory, measured against the simulation at this model's size
    shapes = Shapes(policy.config, tuple(trajectories.final.shape[1:]), scorer.context.shape[1],
                    getattr(drm, "drm", drm).drop_last)
    hardware = cfg.hardware
    sizes = SimpleNamespace(**{**flag_values(cfg),  # k: the rollout's candidates a step
                               "rollout_batch": hardware.rollout_batch or cfg.trajectories,
                               "loss_batch": hardware.loss_batch or len(pairs), "k": k})
    del models, policy, drm, drm_text, optimizer, trajectories, base, scorer
    if gpu:
        torch.cuda.empty_cache()
    step = grpo_update(sizes, shapes, cfg.lora_rank, hardware.grad_checkpointing)
    simulated, measured = peak(*step)["Total"], peak(*step, device=device, fake=False)["Total"]
    gap = abs(measured - simulated) / simulated
    results.append((f"one update step's peak memory: measured {measured:.3f} GiB, simulated "
                    f"{simulated:.3f} GiB; relative difference", gap, 0.15, gap < 0.15))

    print(f"\n{torch.cuda.get_device_name(device) if gpu else 'CPU'}, torch {torch.__version__}\n| "
          "check | measured | limit | |\n|---|---|---|---|")
    for name, value, limit, passed in results:
        print(f"| {name} | {value:.3g} | {limit:.3g} | {'pass' if passed else '**FAIL**'} |")
    print("\nbf16 against float32 step by step (information: the table's line is the training "
          "loss's)\n| step | sigma | max abs(ratio_bf16 - ratio_float32) | gradient cosine | "
          "|\n|---|---|---|---|---|")
    for i, sigma, gap, cosine in by_step:
        note = "bf16 rounding reaches PPO's clip" if gap >= cfg.clip_range else ""
        print(f"| {i} | {sigma:.4f} | {gap:.2g} | {cosine:.3f} | {note} |")
    if whole_update is not None:
        print(f"\nthe second whole update (rollout + all minibatches) peaked at {whole_update:.2f} "
              "GiB on this GPU")
    failed = [name for name, *_, passed in results if not passed]
    if failed:
        print(f"\n{len(failed)} check(s) failed: see the table in bench/gpu_check.py for what each "
              "means")
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    run_main(main, Config)
