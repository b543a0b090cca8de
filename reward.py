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

The heads are the DRM repository's (jjaxonx/DRM, drm/model.py: 2BConvGN for SD3.5-medium's 24
blocks, 7BConvGN for SD3.5-large's 38), the toy's a scaled-down copy; `read_drm` reads our files
and that repository's model.safetensors. (Its nearest rival, DiNa-LRM: rivals/reward.py.)
"""
import copy
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (CheckpointError, config_from_meta, load_module, read_checkpoint,
                         read_safetensors_header, save_checkpoint)
from common import InputError
from model import DiT, DiTConfig, build_dit

# The conv heads by name: (widths of the stride-2 convs, GroupNorm groups, MLP hidden size, blocks
# cut). 2BConvGN and 7BConvGN are the DRM repository's (drm/model.py's ConvScalarHeadGroupNorm,
# drm/utils.py's HEAD_LAYER_MISSING) for SD3.5-medium's 24 blocks and SD3.5-large's 38; conv is the
# toy's, scaled down.
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
                nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width),
                nn.ReLU()))
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
    """The head a DiT of `depth` blocks gets: the DRM repository's for SD3.5's 24 and 38, else the
    toy's."""
    return {24: "2BConvGN", 38: "7BConvGN"}.get(depth, "conv")


class DRM(nn.Module):
    """Reward of a noisy latent: forward(x_sigma, sigma, context, pooled) -> (B,)."""

    def __init__(self, backbone, drop_last, head_dropout=0.1, head="conv"):
        super().__init__()
        if head not in HEADS:
            raise InputError(f"head={head!r}: choose one of {', '.join(HEADS)}")
        self.drop_last, self.head_type = drop_last, head
        self.backbone = backbone  # a DiT whose last drop_last joint blocks are removed
        if head == "token":
            self.head = TokenHead(backbone.config.dim, dropout=head_dropout)
        else:
            widths, groups, hidden, _ = CONV_HEADS[head]
            self.head = ConvHead(backbone.config.out_channels, widths, groups, hidden, head_dropout)

    @classmethod
    def from_dit(cls, dit, drop_last=None, head_dropout=0.1, head=None):
        """Copy the DiT (its weights are not shared) and cut its last drop_last blocks (None: the
        head's own, 3 for conv and 2BConvGN, 5 for 7BConvGN; head None: default_head of its
        depth)."""
        depth = dit.config.depth
        head = head or default_head(depth)
        drop_last = drop_last or (CONV_HEADS[head][3] if head in CONV_HEADS else 3)
        if not 0 < drop_last < depth:
            raise InputError(f"drop_last={drop_last}: keep at least one of the DiT's {depth} "
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
            dit, head, meta = read_official_drm(path, entries, torch.float32, drop_last)
            check_shapes(path, dit.config, policy_config)
            drm = DRM(dit, meta["drop_last"], head=meta["head"])
            tensors = {f"drm.head.{k}": v for k, v in head.items()}
            tensors.update({f"drm.backbone.{k}": v for k, v in dit.state_dict().items()})
            return load_module(drm, tensors, "drm", path).to(device).eval(), meta, {}
    tensors, meta = read_checkpoint(path, "drm", "train one with train_reward.py, or use "
                                                 "data/drm.safetensors")
    config = config_from_meta(DiTConfig, meta.get("dit_config"), path)
    check_shapes(path, config, policy_config)
    with torch.device("meta"):
        skeleton = DiT(config)
    drm = DRM.from_dit(skeleton.to_empty(device="cpu"), meta["drop_last"],
                       head=meta.get("head", "conv"))
    return load_module(drm, tensors, "drm", path).to(device).eval(), meta, tensors


def check_shapes(path, config, policy_config):
    """The DRM of `config` scores the images the policy of policy_config (if given) makes."""
    side = lambda c: c.pos_embed_max_size * c.patch_size  # noqa: E731
    if policy_config is not None and (config.in_channels, side(config)) != (
            policy_config.in_channels, side(policy_config)):
        shapes = [(c.in_channels, side(c), side(c)) for c in (config, policy_config)]
        raise CheckpointError(f"{path} scores images of shape {shapes[0]}, the policy makes "
                              f"{shapes[1]}: use a DRM trained from this base (train_reward.py)")
