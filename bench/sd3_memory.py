"""GPU memory and FLOPs of each script at SD3.5-medium size, simulated: one real step of each under
PyTorch's fake tensors, every allocation counted, no GPU and no memory needed.

    python -m bench.sd3_memory # the tables (README, bench/RESULTS.md), 16 minutes on 2 cores
    python -m bench.sd3_memory --tables=flops    # the FLOPs table alone, under a minute

Each row builds what the script keeps on the GPU (bf16 frozen weights, float32 trained ones and LoRA
adapters, as the scripts do) inside torch._subclasses.fake_tensor.FakeTensorMode and runs the
scripts' own functions for one step: the prompt embedding every SD3 run starts with, a guided DiT
step and the VAE's decoding, step-wise candidates scored by the DRM, a DRM training step, and a
Step-GRPO update: a rollout micro-batch (one SDE step with k DRM-scored candidates) then a loss
piece with its backward and AdamW step. MemTracker (torch.distributed._tools.mem_tracker) reports
the peak by category. FLOPs of a whole Step-GRPO update come from
torch.utils.flop_counter.FlopCounterMode on one rollout row, one DRM candidate and one loss pair,
times their counts in an update.

What the simulation does not see, so add it by hand: the CUDA context (about 0.5 GiB), cuBLAS /
cuDNN workspaces, the caching allocator's fragmentation (often 5-15%). The fake tensors live on the
CPU device, so attention runs as the CPU's flash kernel (it keeps O(tokens) a head for the backward,
as CUDA's flash and memory-efficient kernels do) and autocast is the CPU's bf16 autocast.
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from common import UserError, check_flags, count_flops, flag, in_chunks, print_config, run_main
from grpo import Candidates, grpo_loss, sample_rollout
from lora import add_lora
from model import PRESETS, DiTConfig, build_dit
from reward import DRM, bradley_terry_loss
from sd3.text import CLIPConfig, CLIPTextEncoder, T5Config, T5Encoder, sd3_prompt_embedding
from sd3.vae import VAE
from sde import Sampler, guided_velocity, propose, sigma_schedule

GIB = 2 ** 30
PRESET = PRESETS["sd3.5-medium"]
# OpenAI's CLIP ViT-L/14 text tower
CLIP_L = CLIPConfig()
CLIP_G = CLIPConfig(dim=1280, depth=32, heads=20, mlp_dim=5120, projection_dim=1280,
                    activation="gelu")
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp")


@dataclass
class Config:
    # step-wise candidates a step (train_policy.py's and sample.py's --k)
    k: int = flag(4, "[1, inf)")
    steps: int = flag(10, "[1, inf)")  # SDE steps a rollout (train_policy.py's --steps)
    trajectories: int = flag(8, "[1, inf)")  # rollouts an update (the README's SD3 command)
    rollout_batch: int = flag(8, "[1, inf)")  # rollout rows a pass (--rollout_batch)
    drm_batch: int = flag(8, "[1, inf)")  # DRM candidates a pass (--drm_batch)
    loss_batch: int = flag(1, "[1, inf)")  # pairs a backward (--loss_batch)
    lora_rank: int = flag(16, "[0, inf)")
    drm_drop_last: int = flag(3, "[1, 23]")  # the DRM: 21 of SD3.5-medium's 24 blocks
    h100_tflops: float = flag(989.0, "(0, inf)")  # H100 SXM, dense bf16
    # the share of it an update is assumed to reach, for the time estimate
    # which tables to print (memory: 16 minutes on 2 cores, flops: 14 s)
    utilisation: float = flag(0.4, "(0, 1]")
    tables: str = "memory,flops"


@dataclass
class Shapes:
    """What sets a step's memory besides the flags: the DiT, its latents and a prompt's text
    tokens."""
    dit: DiTConfig
    latent: tuple                      # (channels, height, width)
    tokens: int                        # text tokens a prompt (SD3: 77 CLIP + 256 T5)
    drm_drop_last: int                 # the DRM: the DiT's blocks but these


def sd35(pixels, cfg):
    return Shapes(PRESET, (16, pixels // 8, pixels // 8), 77 + 256, cfg.drm_drop_last)


class Tracker(MemTracker):
    """MemTracker with gradient hooks on trainable parameters only: its own would hook every
    parameter, and a frozen one (requires_grad False) refuses a hook."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for p in module.parameters():
            if (install_grad_hooks and p.requires_grad
                    and self._param_to_grad_hook_handles.get(p) is None):
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(self._grad),
                    p.register_post_accumulate_grad_hook(lambda q: self._grad(q.grad)))
        return sizes

    def _grad(self, grad):
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _pre_fw_hook(self, module, inputs):
        """A top-level module called again in one step (the DRM over micro-batches) starts its
        per-module statistics afresh (MemTracker would refuse); the peak over all tensors, which the
        table reads, is kept whole."""
        name = self._mod_tracker.get_known_fqn(module)
        if (module in self.memory_tracking and not self._mod_tracker.is_bw
                and set(self._mod_tracker.parents) - {name} == {"Global"}):
            del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    yield
    torch.set_default_dtype(before)


def frozen(build, dtype=torch.bfloat16):
    """A module built in `dtype`, frozen, in eval mode (how the scripts keep a base model on a
    GPU)."""
    with default_dtype(dtype):
        return build().requires_grad_(False).eval()


def policy_model(shapes, lora_rank, checkpointing):
    """The policy as train_policy.py keeps it: bf16 frozen weights with float32 LoRA adapters, or
    (rank 0) float32 weights, all trained."""
    dit = frozen(lambda: build_dit(shapes.dit)) if lora_rank else build_dit(shapes.dit)
    if lora_rank:
        add_lora(dit, rank=lora_rank, alpha=float(lora_rank))
    dit.grad_checkpointing = checkpointing
    return dit.train()


def drm_model(shapes, dtype=torch.bfloat16, trained=False):
    """The DRM as reward.DRM.from_dit makes it (its copy of the DiT cut after depth - drop_last
    blocks), built in place: a deep copy would leave the fake tensors' mode."""
    with default_dtype(dtype):
        backbone = build_dit(shapes.dit)
        backbone.joint_blocks = backbone.joint_blocks[:shapes.dit.depth - shapes.drm_drop_last]
        drm = DRM(backbone, shapes.drm_drop_last)
    return drm.train() if trained else drm.requires_grad_(False).eval()


def embeddings(batch, shapes):
    """Cached prompt embeddings on the GPU: (context (B, tokens, context_dim), pooled (B,
    pooled_dim)), bf16."""
    return (torch.randn(batch, shapes.tokens, shapes.dit.context_dim, dtype=torch.bfloat16),
            torch.randn(batch, shapes.dit.pooled_dim, dtype=torch.bfloat16))


def latents(batch, shapes, dtype=torch.float32):
    return torch.randn(batch, *shapes.latent, dtype=dtype)


def bf16(like):
    """bf16 autocast on the device of the tensor `like` (the CPU's under fake tensors)."""
    return torch.autocast(like.device.type, dtype=torch.bfloat16)


def peak(build, run, device="cpu", fake=True):
    """build() -> the objects a script keeps (modules, optimizers, tensors), made on `device` under
    fake tensors (fake=False: real ones); run(*objects): one step. -> {category: GiB} at the peak,
    and "Total". Real tensors on a GPU: the CUDA allocator's own peak (max_memory_allocated),
    "Total" alone."""
    cuda = torch.device(device).type == "cuda" and not fake
    with FakeTensorMode() if fake else contextlib.nullcontext(), torch.device(device):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        objects = build()
        if cuda:
            run(*objects)
            torch.cuda.synchronize()
            return {"Total": (torch.cuda.max_memory_allocated() - before) / GIB}
        tracker = Tracker()
        tracker.track_external(*[o for o in objects
                                 if isinstance(o, (nn.Module, torch.optim.Optimizer,
                                                   torch.Tensor))])
        with tracker:
            run(*objects)
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(getattr(k, "value", k)): v / GIB for k, v in snapshot.items()}

# -----------------------------------------------------------------------------
# One step of each script


def embedding_prompts(batch=8):
    """Every SD3 run's start: the DiT, the VAE and the three text encoders loaded, a batch of
    prompts embedded (then the encoders and the VAE leave the GPU)."""
    def build():
        return (frozen(lambda: build_dit(PRESET)), frozen(VAE),
                frozen(lambda: CLIPTextEncoder(CLIP_L)), frozen(lambda: CLIPTextEncoder(CLIP_G)),
                frozen(lambda: T5Encoder(T5Config())))

    def run(dit, vae, clip_l, clip_g, t5):
        with torch.no_grad():
            clip_ids, t5_ids = torch.zeros(batch, 77, dtype=torch.long), torch.zeros(batch, 256,
                dtype=torch.long)
            sd3_prompt_embedding(clip_l(clip_ids), clip_g(clip_ids), t5(t5_ids))
    return build, run


def sampling(shapes, n, k=0):
    """sample.py: a guided Euler step of n images, then the VAE's decoding one image at a time (the
    DiT stays); with k, step-wise sampling: k candidates an image scored by the DRM, no decoding
    (the VAE joins at the end)."""
    def build():
        dit, vae = frozen(lambda: build_dit(shapes.dit)), frozen(VAE)
        parts = (dit, vae, drm_model(shapes)) if k else (dit, vae)
        return (*parts, latents(n, shapes, torch.bfloat16), *embeddings(n, shapes),
                *embeddings(1, shapes))

    def run(dit, vae, *rest):
        *drm, x, context, pooled, empty, empty_pooled = rest
        uncond = (empty.expand(n, -1, -1), empty_pooled.expand(n, -1))
        with torch.no_grad(), bf16(x):
            sampler = Sampler(dit, torch.tensor([1.0, 0.9]), (context, pooled), uncond, 4.5)
            step = propose(sampler, x, 0, noise_level=0.7 if k else 0, k=max(k, 1))
            if k:
                candidates = step.candidates.flatten(0, 1)
                drm[0](candidates, torch.full((len(candidates),), 0.9),
                       context.repeat_interleave(k, 0), pooled.repeat_interleave(k, 0))
            else:
                for image in step.candidates[:, 0].to(torch.bfloat16).split(1):
                    vae.decode(image)
    return build, run


def reward_training(shapes, pairs, checkpointing):
    """train_reward.py: the DRM trained in float32 under bf16 autocast, one AdamW step on a batch of
    pairs (latents cached: no VAE on the GPU)."""
    def build():
        drm = drm_model(shapes, torch.float32, trained=True)
        drm.backbone.grad_checkpointing = checkpointing
        optimizer = torch.optim.AdamW(drm.parameters(), lr=1e-4)
        return drm, optimizer, latents(2 * pairs, shapes), *embeddings(2 * pairs, shapes)

    def run(drm, optimizer, x, context, pooled):
        with bf16(x):
            rewards = drm(x, torch.rand(2 * pairs), context, pooled)
        bradley_terry_loss(*rewards.float().chunk(2)).mean().backward()
        optimizer.step()
    return build, run


def grpo_update(cfg, shapes, lora_rank, checkpointing):
    """train_policy.py: a rollout micro-batch (one guided SDE step of rollout_batch trajectories, k
    candidates each scored by the DRM drm_batch at a time), then a loss piece of loss_batch pairs,
    its backward and the AdamW step."""
    def build():
        policy = policy_model(shapes, lora_rank, checkpointing)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
        return (policy, drm_model(shapes), optimizer, latents(cfg.rollout_batch, shapes),
                *embeddings(cfg.rollout_batch, shapes), *embeddings(1, shapes))

    def run(policy, drm, optimizer, noise, context, pooled, empty, empty_pooled):
        B = len(noise)
        cond, uncond = (context, pooled), (empty.expand(B, -1, -1), empty_pooled.expand(B, -1))

        def score(x, sigma, rows):
            return in_chunks(drm, cfg.drm_batch, x, sigma, context[rows], pooled[rows])
        policy.eval()
        with bf16(noise):
            rollout = sample_rollout(Sampler(policy, sigma_schedule(cfg.steps)[:2], cond, uncond,
                                             4.5), noise,
                                     candidates=Candidates(cfg.k, score) if cfg.k > 1 else None)
        policy.train()
        pairs = torch.zeros(cfg.loss_batch, dtype=torch.long)
        with bf16(noise):
            loss, _ = grpo_loss(policy, rollout, torch.randn(1, B, cfg.k), pairs, pairs)
        loss.backward()
        optimizer.step()
    return build, run

# -----------------------------------------------------------------------------
# FLOPs of a whole Step-GRPO update, from its three kinds of pass


def flops(build, *runs):
    """-> the FLOPs of each run on one set of built objects (built once: a model under fake tensors
    takes seconds)."""
    counts = []
    with FakeTensorMode():
        objects = build()
        for run in runs:
            counts.append(count_flops(lambda: run(*objects)))
    return counts


def update_flops(cfg, shapes, lora_rank):
    """-> (TFLOPs of one Step-GRPO update, its three parts' TFLOPs each): one guided rollout row,
    one DRM candidate, one loss pair (guided forward, backward), counted, times T x trajectories,
    their k candidates, and the T x trajectories pairs the update trains."""
    build, _ = grpo_update(dataclasses.replace(cfg, rollout_batch=1, k=2), shapes, lora_rank, False)

    def rollout_row(policy, drm, optimizer, noise, context, pooled, empty, empty_pooled):
        with torch.no_grad(), bf16(noise):
            guided_velocity(policy.eval(), noise, torch.ones(1), (context, pooled),
                            (empty, empty_pooled), 4.5)

    def drm_candidate(policy, drm, optimizer, noise, context, pooled, empty, empty_pooled):
        with torch.no_grad(), bf16(noise):
            drm(noise, torch.ones(1), context, pooled)

    def loss_pair(policy, drm, optimizer, noise, context, pooled, empty, empty_pooled):
        with bf16(noise):
            velocity = guided_velocity(policy, noise, torch.ones(1), (context, pooled),
                                       (empty, empty_pooled), 4.5)
        velocity.float().square().mean().backward()
    # the backward last
    parts = [count / 1e12 for count in flops(build, rollout_row, drm_candidate, loss_pair)]
    rows = cfg.steps * cfg.trajectories
    return parts[0] * rows + parts[1] * rows * cfg.k + parts[2] * rows, parts


def main(cfg):
    check_flags(cfg)
    tables = set(cfg.tables.split(","))
    if not tables or tables - {"memory", "flops"}:
        raise UserError(f"--tables={cfg.tables}: a comma-separated list of memory, flops")
    print_config(cfg)
    if "memory" in tables:
        memory_table(cfg)
    if "flops" in tables:
        flops_table(cfg)


def memory_table(cfg):
    rows = [
        ("every SD3 run's start: 8 prompts embedded (DiT, VAE, CLIP-L, CLIP-G, T5-XXL loaded)",
         embedding_prompts()),
        ("`sample.py --images=4`, 1024 px: a guided step, then the VAE decodes",
         sampling(sd35(1024, cfg), 4)),
        ("`sample.py --search=stepwise --k=4 --images=4`, 1024 px",
         sampling(sd35(1024, cfg), 4, k=4)),
        ("`train_reward.py --batch_size=16 --grad_checkpointing`, 512 px",
         reward_training(sd35(512, cfg), 16, True)),
        ("`train_reward.py --batch_size=16`, 512 px", reward_training(sd35(512, cfg), 16, False)),
    ]
    for pixels in (512, 1024):
        for rank in (cfg.lora_rank, 0):
            for checkpointing in (True, False):
                flags = ((f"--lora_rank={rank}" if rank else "(full fine-tune)")
                         + (" --grad_checkpointing" if checkpointing else ""))
                name = f"`train_policy.py {flags}`, {pixels} px"
                rows.append((name, grpo_update(cfg, sd35(pixels, cfg), rank, checkpointing)))
    print("\nSD3.5-medium, simulated (FakeTensorMode + MemTracker), GiB at the peak; Step-GRPO: "
          f"k={cfg.k}, --rollout_batch={cfg.rollout_batch} --drm_batch={cfg.drm_batch} "
          f"--loss_batch={cfg.loss_batch}")
    print("| what | " + " | ".join(c.lower() for c in CATEGORIES) + " | total |\n|---" * 1
          + "|---" * (len(CATEGORIES) + 1) + "|")
    for name, (build, run) in rows:
        result = peak(build, run)
        cells = " | ".join(f"{result.get(c, 0):.1f}" for c in CATEGORIES)
        print(f"| {name} | {cells} | **{result['Total']:.1f}** |", flush=True)


def flops_table(cfg):
    print(f"\nOne Step-GRPO update ({cfg.steps} steps x {cfg.trajectories} trajectories, "
          f"k={cfg.k}, every pair trained once), FLOPs counted (FlopCounterMode), time at "
          f"{cfg.utilisation:.0%} of an H100's {cfg.h100_tflops:.0f} dense bf16 TFLOP/s:")
    print("| px | fine-tune | rollout row | DRM candidate | loss pair | update TFLOPs | H100 "
          "seconds (estimate) |\n|---|---|---|---|---|---|---|")
    for pixels in (512, 1024):
        for rank in (cfg.lora_rank, 0):
            total, parts = update_flops(cfg, sd35(pixels, cfg), rank)
            print(f"| {pixels} | {'LoRA ' + str(rank) if rank else 'full'} | " +
                  " | ".join(f"{p:.2f}" for p in parts) +
                  f" | {total:,.0f} | {total / (cfg.h100_tflops * cfg.utilisation):.1f} |",
                  flush=True)


if __name__ == "__main__":
    run_main(main, Config)
