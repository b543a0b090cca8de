"""The DiT: an SD3-style MMDiT and rectified-flow training.

Read bottom-up, as nanoGPT: elementwise ops, embedders, attention, the joint block, the final
layer, the DiT and its compiled regions, the presets, then the flow-matching loss. (LoRA is
lora.py; the toy's text encoder is data/world.py; SD3's are sd3/text.py.)

Conventions (SD3's, so public weights drop in):
- sigma in [0, 1], 1 = pure noise. x_sigma = (1 - sigma) x0 + sigma noise, and the network
  predicts the velocity v = noise - x0 (rectified flow, Esser et al. 2024, eq. 2-3). The
  timestep input is 1000 * sigma, taken inside forward.
- Module names equal the keys of Stability's SD3 checkpoints (`x_embedder`, `t_embedder`,
  `joint_blocks.i.context_block`, `adaLN_modulation`, ...).
One block class serves every preset: qk RMSNorm, SD3.5's dual attention and the "pre-only"
context stream of the last block are config values, not subclasses.
"""
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from common import InputError

# -----------------------------------------------------------------------------
# Elementwise ops (fused by compile_regions, below the DiT, when the scripts run with --compile)


def layer_norm_modulate(x, shift, scale):
    """adaLN: weight-free LayerNorm (eps 1e-6), then x (1 + scale) + shift; x (B, L, D)."""
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x, gate, y):
    """adaLN-Zero residual: x + gate * y, with gate (B, D) zero at init."""
    return x + gate.unsqueeze(1) * y


def rms_norm(x, weight):
    """RMSNorm over the last dim, eps 1e-6, computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")

# -----------------------------------------------------------------------------
# Embedders


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of t (B,) -> (B, dim), cos half first, as SD3."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) by a strided conv."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear: the timestep and pooled-text embedders."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


class TimestepEmbedder(MLPEmbedder):
    def __init__(self, dim, frequency_dim=256):
        super().__init__(frequency_dim, dim)
        self.frequency_dim = frequency_dim

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def sincos_pos_embed(dim, grid_size):
    """Fixed 2D sin-cos position table (grid_size**2, dim), as SD3 initialises pos_embed."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def embed_1d(pos):  # (N,) -> (N, dim/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()

# -----------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """The projections of one stream: qkv in, optional per-head RMSNorm on q and k, proj out (the
    attention itself is computed over both streams at once, by `joint_attention`)."""

    def __init__(self, dim, heads, qk_norm, pre_only=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = RMSNorm(dim // heads)
            self.ln_k = RMSNorm(dim // heads)
        else:
            self.ln_q = self.ln_k = nn.Identity()
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def pre_attention(self, x):
        """x (B, L, D) -> q, k, v each (B, L, heads, D/heads)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        return self.ln_q(q), self.ln_k(k), v


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight)


def attention(q, k, v, **options):
    """q, k, v (B, L, heads, hd) -> (B, L, heads * hd), with scaled_dot_product_attention.

    options go to it as they are (is_causal, attn_mask, scale: sd3/text.py's CLIP and T5 use them).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                        # (B, heads, L, hd)
    out = F.scaled_dot_product_attention(q, k, v, **options)
    return out.transpose(1, 2).flatten(2)  # (B, heads, L, hd) -> (B, L, D)


def joint_attention(qkv_a, qkv_b):
    """One attention over the two streams' tokens, concatenated; returns each stream's part."""
    La = qkv_a[0].shape[1]
    out = attention(*(torch.cat([a, b], dim=1) for a, b in zip(qkv_a, qkv_b)))
    return out[:, :La], out[:, La:]

# -----------------------------------------------------------------------------
# The MMDiT joint block


class StreamBlock(nn.Module):
    """One stream (text or image) of a joint block: adaLN-Zero around attention and a GELU-tanh
    MLP. adaLN chunks, in order: shift, scale, gate for attention, then for the MLP, then (dual
    attention only) for the second, image-only attention. A pre-only stream (the last block's
    context) only produces q, k, v."""

    def __init__(self, dim, heads, mlp_ratio, qk_norm, pre_only=False, dual_attention=False):
        super().__init__()
        self.pre_only = pre_only
        self.attn = Attention(dim, heads, qk_norm, pre_only)
        self.attn2 = Attention(dim, heads, qk_norm) if dual_attention else None
        if not pre_only:
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential()  # keys mlp.fc1, mlp.fc2 as Stability's checkpoints
            self.mlp.fc1 = nn.Linear(dim, hidden)
            self.mlp.fc2 = nn.Linear(hidden, dim)
        self.n_chunks = 2 if pre_only else (9 if dual_attention else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_chunks * dim))

    def pre_attention(self, x, c):
        """x (B, L, D), c (B, D) -> q, k, v for the joint attention; those of attn2 or None; mod."""
        mod = self.adaLN_modulation(c).chunk(self.n_chunks, dim=1)
        qkv = self.attn.pre_attention(layer_norm_modulate(x, mod[0], mod[1]))
        qkv2 = None
        if self.attn2 is not None:  # SD3.5's second, image-only attention
            qkv2 = self.attn2.pre_attention(layer_norm_modulate(x, mod[6], mod[7]))
        return qkv, qkv2, mod

    def post_attention(self, x, attn_out, attn2_out, mod):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x = gated_residual(x, gate_msa, self.attn.proj(attn_out))
        if self.attn2 is not None:
            x = gated_residual(x, mod[8], self.attn2.proj(attn2_out))
        h = self.mlp.fc2(gelu_tanh(self.mlp.fc1(layer_norm_modulate(x, shift_mlp, scale_mlp))))
        return gated_residual(x, gate_mlp, h)


class JointBlock(nn.Module):
    """SD3's MMDiT block: text and image streams with separate weights, one joint attention."""

    def __init__(self, dim, heads, mlp_ratio, qk_norm, pre_only, dual_attention):
        super().__init__()
        self.context_block = StreamBlock(dim, heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = StreamBlock(dim, heads, mlp_ratio, qk_norm, dual_attention=dual_attention)

    def forward(self, context, x, c):
        """context (B, Lc, D), x (B, Lx, D), c (B, D) -> context (None if pre-only), x."""
        ctx_qkv, _, ctx_mod = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mod = self.x_block.pre_attention(x, c)
        ctx_attn, x_attn = joint_attention(ctx_qkv, x_qkv)
        x_attn2 = attention(*x_qkv2) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, x_attn, x_attn2, x_mod)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, ctx_attn, None, ctx_mod), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from tokens to patches."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(layer_norm_modulate(x, shift, scale))

# -----------------------------------------------------------------------------
# The DiT


@dataclass
class DiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    dim: int = 1536                 # hidden width = 64 * heads in every public model
    depth: int = 24
    heads: int = 24
    context_dim: int = 4096         # text token width (T5 / padded CLIP in SD3)
    pooled_dim: int = 2048          # pooled text vector (CLIP-L + CLIP-G in SD3)
    pos_embed_max_size: int = 192   # side of the stored position grid, centre-cropped
    qk_norm: bool = False
    dual_attention_layers: tuple = field(default_factory=tuple)
    mlp_ratio: float = 4.0


PRESETS = {
    # the CPU toy: 32x32 one-channel digits, 8x8 = 64 tokens, 3.47M parameters
    "tiny": DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=128, depth=6, heads=2,
                      context_dim=64, pooled_dim=64, pos_embed_max_size=8, qk_norm=True),
    "sd3-medium": DiTConfig(),
    "sd3.5-medium": DiTConfig(pos_embed_max_size=384, qk_norm=True,
                              dual_attention_layers=tuple(range(13))),
    "sd3.5-large": DiTConfig(dim=2432, depth=38, heads=38, qk_norm=True),
}


class DiT(nn.Module):
    """SD3's MMDiT. forward(x, sigma, context, pooled) -> velocity."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.dim)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg.dim)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, cfg.dim)
        self.context_embedder = nn.Linear(cfg.context_dim, cfg.dim)
        self.joint_blocks = nn.ModuleList([
            JointBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, pre_only=i == cfg.depth - 1,
                       dual_attention=(i in cfg.dual_attention_layers))
            for i in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.dim, cfg.patch_size, cfg.out_channels)
        # recompute each block's activations in the backward instead of storing them: activation
        # memory of one block instead of all, for about one more forward pass of compute
        self.grad_checkpointing = False

    def initialize_weights(self):
        """DiT's init: xavier linears, N(0, 0.02) timestep MLP, zero adaLN and output layer: each
        block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map on flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        for mlp in (self.t_embedder.mlp, self.y_embedder.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (StreamBlock, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[1].weight)
                nn.init.zeros_(module.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        grid = sincos_pos_embed(self.config.dim, self.config.pos_embed_max_size)
        self.pos_embed.copy_(grid[None])
        return self

    def cropped_pos_embed(self, h, w):
        """The centre h x w window of the stored position grid, (1, h*w, D)."""
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            raise InputError(f"{h}x{w} patches exceed pos_embed_max_size={m}")
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def embed(self, x, sigma, context, pooled):
        """Inputs -> image tokens (B, h*w, D), text tokens (B, L, D), conditioning c (B, D)."""
        p = self.config.patch_size
        tokens = self.x_embedder(x) + self.cropped_pos_embed(x.shape[-2] // p, x.shape[-1] // p)
        c = self.t_embedder(sigma * 1000) + self.y_embedder(pooled)
        return tokens, self.context_embedder(context), c

    def unpatchify(self, x, H, W):
        """(B, h*w, p*p*C) -> (B, C, H, W); each token's values in (p, q, C) order, as SD3."""
        p = self.config.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, w=W // p, p=p, q=p)

    def features(self, x, sigma, context, pooled, num_blocks=None):
        """The image tokens after the first num_blocks joint blocks (default all), (B, h*w, D),
        and c (B, D): what the final layer reads, and the DRM after fewer blocks."""
        tokens, context, c = self.embed(x, sigma, context, pooled)
        for block in self.joint_blocks[:num_blocks]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                context, tokens = checkpoint(block, context, tokens, c, use_reentrant=False)
            else:
                context, tokens = block(context, tokens, c)
        return tokens, c

    def forward(self, x, sigma, context, pooled):
        """x (B, C, H, W), sigma (B,), context (B, L, context_dim), pooled (B, pooled_dim) ->
        velocity (B, C, H, W)."""
        tokens, c = self.features(x, sigma, context, pooled)
        return self.unpatchify(self.final_layer(tokens, c), x.shape[-2], x.shape[-1])


def compile_regions(model):
    """torch.compile each joint block and the final layer of `model` (a DiT or a DRM's backbone),
    one region each: Inductor fuses the elementwise ops (LayerNorm + adaLN modulate, gated
    residual, qk RMSNorm, GELU-tanh) with one another and the reshapes around the matmuls, forward
    and backward. Single ops compiled fuse nothing across ops and pay a guard check per call:
    slower than eager on a CPU in training (bench/RESULTS.md). Blocks share one compiled graph
    (their parameters are graph inputs). Eager is the reference; compiling costs a cold start."""
    # one code object serves plain, dual-attention and pre-only blocks, with and without grad,
    # static and dynamic batch: more variants than dynamo's default limit of 8, after which it
    # would fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for module in model.modules():
        if isinstance(module, (JointBlock, FinalLayer)):
            compiled = _COMPILED.setdefault(type(module), torch.compile(type(module).forward))
            module.forward = functools.partial(_call_contiguous, compiled, module)
    return model


_COMPILED = {}  # one compiled function per region type, shared by every model compiled here


def _call_contiguous(compiled, module, *args):
    # contiguous inputs: with a transposed input (the patch embedder's tokens) Inductor 2.13 on a
    # CPU computed the forward right and gradients 3-25% off (tests/test_model.py checks them)
    return compiled(module, *(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))


def build_dit(preset_or_config, device=None):
    """A DiT from a preset name or a DiTConfig, initialised (on the meta device: shapes only)."""
    config = PRESETS[preset_or_config] if isinstance(preset_or_config, str) else preset_or_config
    with torch.device(device or "cpu"):
        model = DiT(config)
    return model if str(device) == "meta" else model.initialize_weights()

# -----------------------------------------------------------------------------
# Rectified-flow training (SD3, Esser et al. 2024, sec. 2-3)


def logit_normal_sigma(batch_size, device=None, generator=None):
    """sigma = sigmoid(u), u ~ N(0, 1): SD3's training density, weighting the middle sigmas."""
    return torch.sigmoid(torch.randn(batch_size, device=device, generator=generator))


def add_noise(x0, sigma, noise):
    """The rectified-flow path: x_sigma = (1 - sigma) x0 + sigma noise, sigma (B,) per sample."""
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0 + s * noise


def flow_matching_loss(model, x0, context, pooled, sigma=None, noise=None):
    """Per-sample MSE between the predicted velocity and noise - x0 -> (B,) losses, sigma (B,).

    Returns per-sample losses so the caller can log them binned by sigma.
    """
    sigma = logit_normal_sigma(x0.shape[0], x0.device) if sigma is None else sigma
    noise = torch.randn_like(x0) if noise is None else noise
    # BEGIN SOLUTION ex1_flow_matching: noise x0 to x_sigma (add_noise); the target is noise - x0
    x_sigma = add_noise(x0, sigma, noise)
    velocity = model(x_sigma, sigma, context, pooled)
    return (velocity.float() - (noise - x0).float()).pow(2).flatten(1).mean(1), sigma
    # END SOLUTION
