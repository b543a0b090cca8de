"""The Diffusion-based Reward Model (DRM): a pretrained DiT, cut short, with a small scalar head.

    drm = DRM.from_dit(dit, drop_last=3)        # the paper's reward model
    drm = DRM.from_dit(dit, head="token")       # ablation: an MLP on the mean hidden token
    drm = DRM.from_scratch(dit.config)          # ablation: the same shape, random weights
    reward = drm(x_sigma, sigma, context, pooled)   # (B,): higher = preferred

The paper's recipe (DRM, sec. 3): keep the patch, time and text embedders and the first
depth - drop_last joint blocks of the pretrained DiT, keep its timestep-conditioned final norm
and projection (so the hidden tokens go back to the latent grid as in the DiT), then a conv head
reduces the grid to one score. Because the backbone was trained to denoise at every sigma, the
DRM can judge a noisy state x_sigma, not only a finished image; that is what makes step-wise
rewards possible. Trained with the Bradley-Terry loss on preference pairs, both images of a pair
noised to the same sigma (eq. 4):

    L = -log sigmoid(r(x_sigma^w) - r(x_sigma^l)).

Beside it, from its nearest rival (DiNa-LRM, arXiv 2602.11146): a Thurstone loss whose comparison
noise grows with sigma, and a noise ensemble that scores a state re-noised several times.
"""
import copy
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (CheckpointError, config_from_meta, load_module, read_checkpoint,
                    read_safetensors_header, save_checkpoint)
from model import DiT, DiTConfig, build_dit

# The conv heads by name: (widths of the stride-2 convs, GroupNorm groups, MLP hidden size, blocks cut).
# 2BConvGN and 7BConvGN are the DRM repository's (drm/model.py's ConvScalarHeadGroupNorm, drm/utils.py's
# HEAD_LAYER_MISSING) for SD3.5-medium's 24 blocks and SD3.5-large's 38; conv is the toy's, scaled down.
CONV_HEADS = {"conv": ((32, 64, 128), 8, 64, 3),
              "2BConvGN": ((256, 512, 512), 32, 512, 3),
              "7BConvGN": ((256, 512, 512), 32, 512, 5)}
HEADS = (*CONV_HEADS, "token")


def mlp_head(width, hidden, dropout):
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1))


class ConvHead(nn.Module):
    """(B, C, H, W) -> (B,): stride-2 3x3 convs, each with GroupNorm and ReLU (down1, down2, ...), a
    global average pool, an MLP with dropout: the DRM repository's ConvScalarHeadGroupNorm, module
    for module (its state-dict keys), at any widths."""

    def __init__(self, in_channels, widths=(32, 64, 128), groups=8, hidden=64, dropout=0.1):
        super().__init__()
        c = in_channels
        for i, width in enumerate(widths):
            self.add_module(f"down{i + 1}", nn.Sequential(
                nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.ReLU()))
            c = width
        self.depth = len(widths)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.mlp = mlp_head(c, hidden, dropout)

    def forward(self, x):
        for i in range(self.depth):
            x = getattr(self, f"down{i + 1}")(x)
        return self.mlp(self.gap(x).flatten(1)).squeeze(1)


class TokenHead(nn.Module):
    """(B, N, D) hidden tokens -> (B,): their mean, LayerNorm, MLP with dropout (the ablation)."""

    def __init__(self, dim, hidden=64, dropout=0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = mlp_head(dim, hidden, dropout)

    def forward(self, tokens):
        return self.mlp(self.norm(tokens.mean(1))).squeeze(1)


def default_head(depth):
    """The head a DiT of `depth` blocks gets: the DRM repository's for SD3.5's 24 and 38, else the toy's."""
    return {24: "2BConvGN", 38: "7BConvGN"}.get(depth, "conv")


class DRM(nn.Module):
    """Reward of a noisy latent: forward(x_sigma, sigma, context, pooled) -> (B,)."""

    def __init__(self, backbone, drop_last, head_dropout=0.1, head="conv"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r}: choose one of {', '.join(HEADS)}")
        self.drop_last, self.head_type = drop_last, head
        self.backbone = backbone  # a DiT whose last drop_last joint blocks are removed
        if head == "token":
            self.head = TokenHead(backbone.config.dim, dropout=head_dropout)
        else:
            widths, groups, hidden, _ = CONV_HEADS[head]
            self.head = ConvHead(backbone.config.out_channels, widths, groups, hidden, head_dropout)

    @classmethod
    def from_dit(cls, dit, drop_last=None, head_dropout=0.1, head=None):
        """Copy the DiT (its weights are not shared) and cut its last drop_last blocks (None: the head's
        own, 3 for conv and 2BConvGN, 5 for 7BConvGN; head None: default_head of its depth)."""
        depth = dit.config.depth
        head = head or default_head(depth)
        drop_last = drop_last or (CONV_HEADS[head][3] if head in CONV_HEADS else 3)
        if not 0 < drop_last < depth:
            raise ValueError(f"drop_last={drop_last}: keep at least one of the DiT's {depth} "
                             "blocks (0 < drop_last < depth)")
        backbone = copy.deepcopy(dit)
        backbone.joint_blocks = backbone.joint_blocks[:depth - drop_last]
        return cls(backbone, drop_last, head_dropout, head).train(dit.training)

    @classmethod
    def from_scratch(cls, config, drop_last=None, head_dropout=0.1, head=None):
        """The ablation: the same network with the DiT's own random initialisation."""
        return cls.from_dit(build_dit(config), drop_last, head_dropout, head)

    def hidden_tokens(self, x_sigma, sigma, context, pooled):
        """The image tokens after the last kept block (B, h*w, D), and the conditioning c (B, D)."""
        return self.backbone.features(x_sigma, sigma, context, pooled)

    def forward(self, x_sigma, sigma, context, pooled):
        """x_sigma (B, C, H, W), sigma (B,), context (B, L, context_dim), pooled (B, pooled_dim) ->
        reward (B,)."""
        # BEGIN SOLUTION ex2_drm: hidden tokens -> final_layer (given c) -> unpatchify -> head
        tokens, c = self.hidden_tokens(x_sigma, sigma, context, pooled)
        if self.head_type == "token":
            return self.head(tokens)
        patches = self.backbone.final_layer(tokens, c)
        return self.head(self.backbone.unpatchify(patches, *x_sigma.shape[-2:]))   # (B, C, H, W)
        # END SOLUTION


def bradley_terry_loss(reward_win, reward_lose):
    """-log sigmoid(r_w - r_l) per pair (B,): the negative log-likelihood of the preference seen."""
    # BEGIN SOLUTION ex2_drm: eq. 4; F.logsigmoid is the stable log sigmoid
    return -F.logsigmoid(reward_win - reward_lose)
    # END SOLUTION

def thurstone_loss(reward_win, reward_lose, sigma, scale=2.0, floor=0.05, eps=1e-6):
    """DiNa-LRM's noise-aware Thurstone loss per pair (B,), as its diffusion_rm/train/engine.py
    computes it: each score carries Gaussian comparison noise of variance scale sigma^2 + floor, so
    a noisier pair is judged less surely, P(w beats l) = Phi((r_w - r_l) / sqrt(2 var + eps)); the
    loss is their fidelity loss 1 - sqrt(P + eps) (their code leaves -log P commented out)."""
    var = scale * sigma ** 2 + floor
    z = (reward_win - reward_lose) / torch.sqrt(2 * var + eps)
    return 1 - torch.sqrt(torch.distributions.Normal(0.0, 1.0).cdf(z) + eps)


class NoiseEnsemble(nn.Module):
    """A DRM's score averaged over `draws` re-noisings of each state: a state x at sigma below
    at_sigma is carried to u = at_sigma by the flow's forward process, x_u = a x + b z with
    a = (1 - u) / (1 - sigma), b = sqrt(u^2 - (a sigma)^2) (so (1 - sigma) x0 + sigma z becomes
    (1 - u) x0 + u z'), and scored there; a state at or above at_sigma is scored as it is. The
    DRM's own call signature, so it goes wherever the DRM scores (--drm_draws, --drm_sigma); the
    samplers' counters count scorings, each `draws` DRM passes when a state is re-noised."""

    def __init__(self, drm, draws=4, at_sigma=0.25, seed=0):
        super().__init__()
        self.drm, self.draws, self.at_sigma = drm, draws, at_sigma
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x, sigma, context, pooled):
        below = sigma < self.at_sigma
        u = torch.where(below, torch.full_like(sigma, self.at_sigma), sigma)
        a = torch.where(below, (1 - u) / (1 - sigma), torch.ones_like(sigma))
        b = torch.sqrt((u ** 2 - (a * sigma) ** 2).clamp(min=0))
        shape = (-1,) + (1,) * (x.dim() - 1)
        total = 0
        for _ in range(self.draws if below.any() else 1):  # nothing to re-noise: one pass
            z = torch.randn(x.shape, generator=self.generator).to(x)
            total = total + self.drm(a.view(shape) * x + b.view(shape) * z, u, context, pooled)
        return total / (self.draws if below.any() else 1)


def drm_passes(drm, sigma):
    """DRM passes a scoring of states at sigma (N,) takes: the ensemble's draws where it re-noises."""
    if isinstance(drm, NoiseEnsemble) and bool((sigma < drm.at_sigma).any()):
        return drm.draws
    return 1


def with_ensemble(drm, draws, at_sigma):
    """The DRM, or (draws > 1 or at_sigma > 0) its NoiseEnsemble."""
    return NoiseEnsemble(drm, draws, at_sigma) if draws > 1 or at_sigma > 0 else drm

# -----------------------------------------------------------------------------
# Checkpoints: the DRM, its settings, and what the base model keeps beside it (the toy: its text
# encoder; base.py decides)


def save_drm(path, drm, step, meta, dtype=None, extra=None):
    """One safetensors file: the DRM under 'drm.', each module of `extra` under its name."""
    meta = {"kind": "drm", "step": step, "drop_last": drm.drop_last, "head": drm.head_type,
            "dit_config": asdict(drm.backbone.config), **meta}
    save_checkpoint(path, {"drm": drm, **(extra or {})}, meta, dtype)


def read_drm(path, device="cpu", policy_config=None, drop_last=None):
    """-> (drm in eval mode, meta, all the file's tensors) from a file written by save_drm, or from
    the DRM repository's model.safetensors (sd3/mmdit.py reads it: the config from its shapes,
    drop_last from its table, or as given). policy_config: the DiTConfig of the model whose samples
    the DRM will score (their image shapes must agree)."""
    entries, metadata = read_safetensors_header(path)
    if "meta" not in metadata:
        from sd3.mmdit import is_official_drm, read_official_drm  # the SD3 plumbing, only for SD3
        if is_official_drm(entries):
            drm, meta = read_official_drm(path, entries, torch.float32, drop_last)
            check_shapes(path, drm.backbone.config, policy_config)
            return drm.to(device).eval(), meta, {}
    tensors, meta = read_checkpoint(path, "drm", "train one with train_reward.py, or use "
                                    "data/drm.safetensors")
    config = config_from_meta(DiTConfig, meta.get("dit_config"), path)
    check_shapes(path, config, policy_config)
    with torch.device("meta"):
        skeleton = DiT(config)
    drm = DRM.from_dit(skeleton.to_empty(device="cpu"), meta["drop_last"],
                       head=meta.get("head", "conv"))
    old = {k: k.replace("drm.head.convs.", "drm.head.down") for k in tensors
           if k.startswith("drm.head.convs.")}  # files before the heads had the repository's names
    for key in old:
        index, rest = key[len("drm.head.convs."):].split(".", 1)
        tensors[f"drm.head.down{int(index) // 3 + 1}.{int(index) % 3}.{rest}"] = tensors.pop(key)
    return load_module(drm, tensors, "drm", path).to(device).eval(), meta, tensors


def check_shapes(path, config, policy_config):
    """The DRM of `config` scores the images the policy of policy_config (if given) makes."""
    side = lambda c: c.pos_embed_max_size * c.patch_size  # noqa: E731
    if policy_config is not None and (config.in_channels, side(config)) != (
            policy_config.in_channels, side(policy_config)):
        shapes = [(c.in_channels, side(c), side(c)) for c in (config, policy_config)]
        raise CheckpointError(f"{path} scores images of shape {shapes[0]}, the policy makes "
                              f"{shapes[1]}: use a DRM trained from this base (train_reward.py)")
