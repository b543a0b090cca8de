"""Public SD3 plumbing outside the reading path: SD3's three text encoders (their tokenizers:
sd3/tokenizers.py).

    from sd3.text import load_clip, load_t5, sd3_prompt_embedding
    clip_l = load_clip("stable-diffusion-3.5-medium/text_encoder") # or
    text_encoders/clip_l.safetensors
    clip_g = load_clip("stable-diffusion-3.5-medium/text_encoder_2") # or
    text_encoders/clip_g.safetensors
    t5 = load_t5("stable-diffusion-3.5-medium/text_encoder_3") # or
    text_encoders/t5xxl_fp16.safetensors
    context, pooled = sd3_prompt_embedding(clip_l(ids_l), clip_g(ids_g), t5(ids_t5))

SD3 (Esser et al. 2024, sec. 2.2 and appendix B.2) conditions on three
encoders: CLIP-L/14 and OpenCLIP bigG/14 give the penultimate layer's hidden
states (77 tokens) and a pooled, projected vector each; T5-XXL's encoder gives
its last hidden states. The two CLIPs' hidden states are concatenated (768 +
1280 = 2048 channels), zero-padded to T5's 4096 and put before T5's tokens;
the pooled vectors are concatenated (2048). T5 may be left out (zeros, as SD3
allows) to save 9.5 GB.

Both published layouts store these encoders under Hugging Face transformers'
key names (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`encoder.block.0.layer.0.SelfAttention.q.weight`), possibly behind a prefix in
single-file checkpoints; the module names below are those keys. Widths, depths
and head counts come from the tensor shapes, with a diffusers folder's
config.json where shapes cannot tell (CLIP's head count and activation).
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import CheckpointError
from model import RMSNorm, attention, gelu_tanh
from sd3.streaming import fill, read_headers

# -----------------------------------------------------------------------------
# CLIP's text transformer (Radford et al. 2021): pre-LayerNorm, causal self-attention


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    max_tokens: int = 77
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    projection_dim: int = 768
    activation: str = "quick_gelu"   # OpenAI's CLIP-L; OpenCLIP bigG uses "gelu"
    eos_token_id: int = 49407


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
               "gelu_new": gelu_tanh}


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim)
                                                                for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, D // self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # each token sees its left
        return self.out_proj(attention(q, k, v, is_causal=True))


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.self_attn = CLIPAttention(cfg.dim, cfg.heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim,
                                                                                cfg.dim)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.activation(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nn.Module):
    """ids (B, 77) -> (penultimate hidden states (B, 77, dim), pooled projection (B,
    projection_dim))."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_model.embeddings.position_embedding = nn.Embedding(cfg.max_tokens, cfg.dim)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.depth)])
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.text_projection = nn.Linear(cfg.dim, cfg.projection_dim, bias=False)

    def forward(self, ids):
        m = self.text_model
        positions = m.embeddings.position_embedding.weight[: ids.shape[1]]
        x = m.embeddings.token_embedding(ids) + positions
        for layer in m.encoder.layers[:-1]:
            x = layer(x)
        penultimate = x                                                  # what SD3 conditions on
        last = m.final_layer_norm(m.encoder.layers[-1](x))
        # the first end token: it has seen the prompt
        eos = (ids == self.config.eos_token_id).int().argmax(1)
        return penultimate, self.text_projection(last[torch.arange(len(ids)), eos])

# -----------------------------------------------------------------------------
# T5's encoder (Raffel et al. 2020; v1.1: gated GELU, no biases): RMS norms, relative position
# buckets


@dataclass
class T5Config:
    vocab_size: int = 32128
    dim: int = 4096
    depth: int = 24
    heads: int = 64
    head_dim: int = 64
    mlp_dim: int = 10240
    num_buckets: int = 32
    max_distance: int = 128


def relative_position_bucket(relative_position, num_buckets, max_distance):
    """Key minus query offset -> bucket (bidirectional): half the buckets per direction, exact below
    num_buckets / 4, then logarithmic up to max_distance."""
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    log_bucket = exact + (log_ratio * (num_buckets - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.cfg = cfg
        inner = cfg.heads * cfg.head_dim
        self.q, self.k, self.v = (nn.Linear(cfg.dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.dim, bias=False)
        if relative_bias:  # only the first block learns the bias; every block adds it
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads)

    def position_bias(self, L, device):
        position = torch.arange(L, device=device)
        buckets = relative_position_bucket(position[None, :] - position[:, None],
                                           self.cfg.num_buckets,
                                           # (L query, L key)
                                           self.cfg.max_distance)
        # (1, heads, L, L)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.cfg.heads, self.cfg.head_dim)
                   for proj in (self.q, self.k, self.v))
        # T5 does not scale q k^T by 1/sqrt(head_dim) (its init accounts for it): scale=1
        return self.o(attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0))


class T5Block(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        # T5's norms: RMSNorm, no mean, no bias
        self_attention, feed_forward = nn.Module(), nn.Module()
        self_attention.layer_norm, self_attention.SelfAttention = RMSNorm(cfg.dim), T5Attention(cfg,
            relative_bias)
        feed_forward.layer_norm, feed_forward.DenseReluDense = RMSNorm(cfg.dim), nn.Module()
        mlp = feed_forward.DenseReluDense
        mlp.wi_0, mlp.wi_1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False), nn.Linear(cfg.dim,
            cfg.mlp_dim, bias=False)
        mlp.wo = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)
        self.layer = nn.ModuleList([self_attention, feed_forward])

    def forward(self, x, bias):
        self_attention, feed_forward = self.layer
        x = x + self_attention.SelfAttention(self_attention.layer_norm(x), bias)
        mlp, h = feed_forward.DenseReluDense, feed_forward.layer_norm(x)
        return x + mlp.wo(gelu_tanh(mlp.wi_0(h)) * mlp.wi_1(h))                      # gated GELU


class T5Encoder(nn.Module):
    """ids (B, L) -> last hidden states (B, L, dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([T5Block(cfg, relative_bias=(i == 0))
                                            for i in range(cfg.depth)])
        self.encoder.final_layer_norm = RMSNorm(cfg.dim)

    def forward(self, ids):
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

# -----------------------------------------------------------------------------
# SD3's prompt embedding


def sd3_prompt_embedding(clip_l, clip_g, t5=None, t5_dim=4096, t5_tokens=256):
    """(hidden, pooled) of CLIP-L and CLIP-G, T5's hidden states (or None: zeros) -> context,
    pooled.

    context: [CLIP-L | CLIP-G | zeros to t5_dim] over the 77 CLIP tokens, then T5's tokens: (B, 77 +
    L_t5, 4096); pooled: [CLIP-L pooled | CLIP-G pooled]: (B, 2048).
    """
    clip = torch.cat([clip_l[0], clip_g[0]], dim=-1)
    clip = F.pad(clip, (0, t5_dim - clip.shape[-1]))
    if t5 is None:
        # SD3 without T5: zeros in its place, t5_tokens of them (diffusers' max_sequence_length)
        t5 = clip.new_zeros(clip.shape[0], t5_tokens, t5_dim)
    return torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat([clip_l[1], clip_g[1]], dim=-1)

# -----------------------------------------------------------------------------
# Loading: a safetensors file (keys possibly behind a prefix) or a transformers folder with
# config.json


def _files_and_config(path, weights_name):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors file; point at a {weights_name} "
                                  "folder or file")
        config_path = os.path.join(path, "config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        return files, config
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    return [path], {}


def _plan(files, anchor):
    """{our key: [entry]} from the files' headers, dropping any prefix before `anchor` (e.g.
    'text_model.')."""
    plan = {}
    for name, entry in read_headers(files).items():
        if "embed_tokens" in name:  # T5's copy of `shared`, tied to it
            continue
        cut = name.find(anchor)
        if cut >= 0:
            plan[name[cut:]] = [entry]
        elif name.endswith("text_projection.weight") or name.endswith("shared.weight"):
            plan[name.split(".")[-2] + ".weight"] = [entry]
    return plan


def _load(model, plan, path, what, dtype, device):
    expected = model.state_dict()
    kept = {k: v for k, v in plan.items() if k in expected}
    return fill(model, kept, {k: v[0].shape for k, v in kept.items()}, (path, what),
                unexpected=[k for k in plan if k not in expected and "position_ids" not in k],
                dtype=dtype, device=device)


def load_clip(path, dtype=None, device=None):
    """CLIP-L or CLIP-G text encoder with its projection, from either layout -> CLIPTextEncoder in
    eval mode."""
    files, hf = _files_and_config(path, "text_encoder")
    plan = _plan(files, "text_model.")
    shapes = {k: v[0].shape for k, v in plan.items()}
    needed = ("text_model.embeddings.token_embedding.weight", "text_projection.weight")
    if any(name not in shapes for name in needed):
        raise CheckpointError(f"{path} is not a CLIP text encoder with a projection ({len(shapes)} "
                              "of its tensors have CLIP names)")
    vocab, dim = shapes["text_model.embeddings.token_embedding.weight"]
    cfg = CLIPConfig(
        vocab_size=vocab, dim=dim,
        max_tokens=shapes["text_model.embeddings.position_embedding.weight"][0],
        depth=1 + max(int(k.split(".")[3]) for k in shapes
                      if k.startswith("text_model.encoder.layers.")),
        heads=hf.get("num_attention_heads", dim // 64),
        mlp_dim=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=shapes["text_projection.weight"][0],
        # CLIP-L 768 wide, bigG 1280
        activation=hf.get("hidden_act", "quick_gelu" if dim == 768 else "gelu"),
        eos_token_id=hf.get("eos_token_id", vocab - 1))
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    return _load(model, plan, path, f"a CLIP text encoder, {cfg}", dtype, device).eval()


def load_t5(path, dtype=None, device=None):
    """T5's encoder (v1.1, gated GELU) from either layout -> T5Encoder in eval mode."""
    files, hf = _files_and_config(path, "text_encoder_3")
    plan = _plan(files, "encoder.")
    shapes = {k: v[0].shape for k, v in plan.items()}
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if bias_key not in shapes or "shared.weight" not in shapes:
        raise CheckpointError(f"{path} is not a T5 encoder ({len(shapes)} of its tensors have T5 "
                              "encoder names)")
    num_buckets, heads = shapes[bias_key]
    inner, dim = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"]
    cfg = T5Config(vocab_size=shapes["shared.weight"][0], dim=dim, heads=heads,
                   head_dim=inner // heads,
                   depth=1 + max(int(k.split(".")[2]) for k in shapes
                                 if k.startswith("encoder.block.")),
                   mlp_dim=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                   num_buckets=num_buckets,
                   max_distance=hf.get("relative_attention_max_distance", 128))
    with torch.device("meta"):
        model = T5Encoder(cfg)
    return _load(model, plan, path, f"a T5 encoder, {cfg}", dtype, device).eval()
