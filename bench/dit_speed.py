"""Our DiT against diffusers' SD3Transformer2DModel, and against the machine's own matmul ceiling.

    python -m bench.dit_speed # CPU, float32: the toy and a mid size
    python -m bench.dit_speed --sizes=sd3.5-medium --device=cuda # GPU, bf16 autocast, random
    weights

For each size one diffusers model with random weights is saved and loaded into ours with `load_sd3`,
so both run the same weights (their outputs are checked to agree first). Then four variants are
timed, forward without grad and a training step (forward, backward, AdamW step): diffusers as users
run it, diffusers with each of its blocks compiled, ours eager, ours with `model.compile_regions`
(what --compile does). The variants take turns round after round and each keeps its median, so a
slow spell of this noisy machine hits all of them alike; read the ratios, not the seconds.

The ceiling is a large square torch.mm. Our training step's FLOP/s counts the
forward's matmul and attention FLOPs analytically (elementwise ops are free in
this count) and triples them: the backward computes two matmuls for each
forward one (input and weight gradients).
"""
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from common import UserError, autocast, check_flags, flag, pick_device, print_config, run_main
from model import PRESETS, DiTConfig, compile_regions
from sd3.mmdit import load_sd3

# name -> (DiT config, batch, latent side, text tokens)
SIZES = {
    # the CPU toy: 64 image + 8 text tokens a sample
    "tiny": (PRESETS["tiny"], 64, 32, 8),
    "mid": (DiTConfig(in_channels=16, out_channels=16, patch_size=2, dim=512, depth=8, heads=8,
                      context_dim=1024,
                      # 256 + 77 tokens
                      pooled_dim=512, pos_embed_max_size=32, qk_norm=True), 4, 32, 77),
    # 1024 px: 4096 image tokens; 77 CLIP + 256 T5 tokens
    "sd3.5-medium": (PRESETS["sd3.5-medium"], 2, 128, 333),
}


@dataclass
class Config:
    sizes: str = "tiny,mid"        # comma-separated keys of SIZES
    # timed rounds (each variant once a round) after one untimed round
    rounds: int = flag(7, "[1, inf)")
    ceiling_n: int = flag(4096, "[1, inf)")  # side of the square matmul that measures the ceiling
    device: str = "auto"


def diffusers_model(config):
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(
        sample_size=config.pos_embed_max_size * config.patch_size, patch_size=config.patch_size,
        in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
        attention_head_dim=config.dim // config.heads, num_attention_heads=config.heads,
        joint_attention_dim=config.context_dim, caption_projection_dim=config.dim,
        pooled_projection_dim=config.pooled_dim, pos_embed_max_size=config.pos_embed_max_size,
        qk_norm="rms_norm" if config.qk_norm else None,
        dual_attention_layers=config.dual_attention_layers)
    with torch.no_grad():  # small random weights everywhere (no zero gates), so every op matters
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def forward_flops(config, batch, image_tokens, text_tokens):
    """Matmul + attention FLOPs of one forward (2 per multiply-add), embedders and adaLN
    included."""
    D, L, hidden = config.dim, image_tokens + text_tokens, int(config.mlp_ratio * config.dim)
    # qkv, proj and the MLP of one stream
    per_token = 2 * (4 * D * D + 2 * hidden * D)
    # timestep and pooled-text embedders
    flops = 2 * (256 * D + D * D) + 2 * (config.pooled_dim * D + D * D)
    flops += text_tokens * 2 * config.context_dim * D
    # patches in, out
    flops += (image_tokens * 2 * D * config.patch_size ** 2
              * (config.in_channels + config.out_channels))
    for i in range(config.depth):
        last, dual = i == config.depth - 1, i in config.dual_attention_layers
        # last: context qkv only
        flops += image_tokens * per_token + text_tokens * (2 * 3 * D * D if last else per_token)
        # q k^T and attention @ v, joint
        flops += 2 * 2 * L * L * D
        if dual:
            # SD3.5's second, image-only attention
            flops += image_tokens * 2 * 4 * D * D + 2 * 2 * image_tokens ** 2 * D
        flops += 2 * D * D * ((9 if dual else 6) + (2 if last else 6))  # adaLN, once per sample
    return batch * (flops + 2 * D * 2 * D)                               # + the final layer's adaLN


def matmul_ceiling(n, device):
    """FLOP/s of a large square matmul: what this device's BLAS reaches at best."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    times = []
    for i in range(10):  # the best of ten: the ceiling, not the average
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times[1:])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns, rounds, device):
    """Run each fn once untimed, then `rounds` rounds of each fn in turn -> {name: median
    seconds}."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_size(name, cfg, device):
    config, batch, side, text_tokens = SIZES[name]
    torch.manual_seed(0)
    theirs = diffusers_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = load_sd3(tmp)
    theirs, ours = theirs.to(device), ours.to(device)
    x = torch.randn(batch, config.in_channels, side, side, device=device)
    sigma = torch.rand(batch, device=device)
    context = torch.randn(batch, text_tokens, config.context_dim, device=device)
    pooled = torch.randn(batch, config.pooled_dim, device=device)

    def call_theirs(model):
        return lambda: model(hidden_states=x, encoder_hidden_states=context,
                             pooled_projections=pooled, timestep=sigma * 1000).sample

    def call_ours(model):
        return lambda: model(x, sigma, context, pooled)
    with torch.no_grad(), autocast(device):
        expected = call_theirs(theirs)().float()
        error = ((call_ours(ours)().float() - expected).norm() / expected.norm()).item()
    print(f"{name}: same weights, relative difference of the outputs {error:.1e}")

    theirs_compiled = diffusers_model(config).to(device)
    theirs_compiled.load_state_dict(theirs.state_dict())
    for block in theirs_compiled.transformer_blocks:
        block.compile()
    ours_compiled = compile_regions(copy.deepcopy(ours))
    variants = {  # label: (model, its forward)
        "diffusers": (theirs, call_theirs(theirs)),
        "diffusers, blocks compiled": (theirs_compiled, call_theirs(theirs_compiled)),
        "ours": (ours, call_ours(ours)),
        "ours, --compile": (ours_compiled, call_ours(ours_compiled)),
    }

    def forward(model, call):
        def run():
            with torch.no_grad(), autocast(device):
                call()
        return run

    def train_step(model, call):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def run():
            with autocast(device):
                out = call()
            out.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    rows = []
    for task, make in (("forward", forward), ("train step", train_step)):
        fns = {label: make(*variant) for label, variant in variants.items()}
        cold = {}
        for label, fn in fns.items():
            # the first call compiles, for the compiled variants: its cost, shown apart
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            cold[label] = time.perf_counter() - t0
        medians = interleaved_medians(fns, cfg.rounds, device)
        flops = forward_flops(config, batch, (side // config.patch_size) ** 2,
                              text_tokens) * (1 if task == "forward" else 3)
        for label, seconds in medians.items():
            rows.append(dict(size=name, task=task, variant=label, ms=seconds * 1e3,
                             speedup=medians["diffusers"] / seconds,
                             tflops=flops / seconds / 1e12, first_call_s=cold[label]))
    return rows


def main(cfg):
    check_flags(cfg)
    sizes = cfg.sizes.split(",")
    for name in sizes:
        if name not in SIZES:
            raise UserError(f"--sizes={cfg.sizes}: {name!r} is not one of {', '.join(SIZES)}")
    print_config(cfg)
    device = pick_device(cfg.device)
    ceiling = matmul_ceiling(cfg.ceiling_n, device)
    dtype = "bf16" if device.type == "cuda" else "float32"
    print(f"ceiling: {cfg.ceiling_n}x{cfg.ceiling_n} {dtype} torch.mm at {ceiling / 1e12:.3f} "
          f"TFLOP/s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [row for name in sizes for row in bench_size(name, cfg, device)]
    print("\n| size | task | variant | ms | throughput vs diffusers | TFLOP/s | of the mm ceiling "
          "| first call s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['task']} | {r['variant']} | {r['ms']:.1f} | {r['speedup']:.2f}x "
              f"| {r['tflops']:.3f} | {r['tflops'] * 1e12 / ceiling:.0%} | {r['first_call_s']:.1f} "
              "|")
    return rows


if __name__ == "__main__":
    run_main(main, Config)
