"""Public SD3 plumbing outside the reading path: the SD3 VAE.

    from sd3.vae import load_vae
    vae = load_vae("sd3.5_medium.safetensors")      # Stability single file (first_stage_model.*)
    vae = load_vae("stable-diffusion-3.5-medium") # diffusers pipeline folder (vae/) or a vae/
    folder
    latents = vae.encode(images)                     # (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8)
    images = vae.decode(latents)

The autoencoder is LDM's (Rombach et al. 2022, the `Encoder`/`Decoder` of their
code) with 16 latent channels and no quant convs. SD3 (Esser et al. 2024,
sec. 5.2.1) normalises its latents: latent = (z - 0.0609) * 1.5305. Module names
are the keys of Stability's checkpoints; diffusers' `AutoencoderKL` names are
mapped by `diffusers_name`.
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import CheckpointError
from sd3.streaming import fill, read_headers

# -----------------------------------------------------------------------------
# The autoencoder


@dataclass
class VAEConfig:
    image_channels: int = 3
    # per resolution level; the image shrinks 2x between levels
    channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    shift: float = 0.0609                   # SD3's latent normalisation
    scale: float = 1.5305


def group_norm(channels):
    # 32 groups in every SD / SD3 VAE (not stored in the weights)
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1)
                   for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class MidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnet blocks, then a resampler (none at the innermost level)."""

    def __init__(self, c_in, c_out, n_blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out)
                                    for j in range(n_blocks)])
        if resample is not None:
            setattr(self, resample.__name__.lower(), resample(c_out))

    def forward(self, x):
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) -> mean and log-variance (B, 2 * latent_channels, H / 2^(levels-1), ...)."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block,
                                         Downsample if i < n - 1 else None) for i in range(n)])
        self.mid = MidBlock(ch[-1])
        self.norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, 3, h * 2^(levels-1), ...). up[i] mirrors down[i]; run from
    the innermost."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1])
        self.up = nn.ModuleList([Level(ch[min(i + 1, n - 1)], ch[i], cfg.layers_per_block + 1,
                                       Upsample if i > 0 else None) for i in range(n)])
        self.norm_out = group_norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.image_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    """SD3's autoencoder: encode(images) -> normalised latents, decode(latents) -> images, both in
    SD3's scaling."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or VAEConfig()
        self.encoder, self.decoder = Encoder(self.config), Decoder(self.config)

    def posterior(self, images):
        """images (B, 3, H, W) in [-1, 1] -> the posterior's (mean, std) in SD3's latent scaling: a
        draw is mean + std z, as diffusers' latent_dist.sample() then (z - shift_factor) x
        scaling_factor."""
        mean, log_var = self.encoder(images).chunk(2, dim=1)
        std = torch.exp(0.5 * log_var.clamp(-30, 20))  # diffusers' DiagonalGaussianDistribution
        return (mean - self.config.shift) * self.config.scale, std * self.config.scale

    def encode(self, images, sample=False, generator=None):
        """images (B, 3, H, W) in [-1, 1] -> latents; the posterior mean, or a draw from it with
        sample=True."""
        mean, std = self.posterior(images)
        if not sample:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device,
                                        dtype=mean.dtype)

    def decode(self, latents):
        return self.decoder(latents / self.config.scale + self.config.shift)

# -----------------------------------------------------------------------------
# Loading the public weights


STABILITY_VAE_PREFIX = "first_stage_model."


def diffusers_name(ours, levels):
    """Our (Stability) VAE key -> diffusers' AutoencoderKL key. diffusers counts decoder levels from
    the inside."""
    rules = [
        (r"^(encoder|decoder)\.mid\.block_(\d)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}"),
        (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
        (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    ]
    for pattern, replacement in rules:
        ours = re.sub(pattern, replacement, ours)
    return ours


def _vae_files(path):
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    return read_headers([path])


def _count(names, pattern):
    return len({m[1] for m in (re.match(pattern, n) for n in names) if m})


def vae_config_from_shapes(shapes, path="checkpoint"):
    if "encoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"{path} holds no SD3 VAE: no encoder.conv_in.weight among its "
                              f"{len(shapes)} tensors")
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    return VAEConfig(image_channels=shapes["encoder.conv_in.weight"][1],
                     channels=tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
                                    for i in range(levels)),
                     layers_per_block=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
                     latent_channels=shapes["encoder.conv_out.weight"][0] // 2)


def load_vae(path, dtype=None, device=None):
    """The SD3 VAE from a Stability single file (`first_stage_model.*`), a bare Stability VAE file,
    or diffusers' AutoencoderKL (file, vae/ folder, pipeline folder) -> VAE in eval mode."""
    entries = _vae_files(path)
    if any(k.startswith(STABILITY_VAE_PREFIX) for k in entries):
        # ignore the transformer and text encoders
        entries = {k[len(STABILITY_VAE_PREFIX):]: v for k,
                   v in entries.items() if k.startswith(STABILITY_VAE_PREFIX)}
    layout = "diffusers" if any(".down_blocks." in k for k in entries) else "stability"
    unexpected = []
    if layout == "diffusers":
        # diffusers keeps the mid-block attention as linears: (C, C) here is (C, C, 1, 1) ours
        levels = _count(entries, r"encoder\.down_blocks\.(\d+)\.")
        layers = _count(entries, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        with torch.device("meta"):
            # names only: widths that all differ, so every shortcut conv is named
            names_of_any_width = VAE(VAEConfig(channels=tuple(32 * (i + 1) for i in range(levels)),
                                               layers_per_block=layers)).state_dict()
        ours_by_theirs = {diffusers_name(k, levels): k for k in names_of_any_width}
        renamed = {}
        for name, entry in entries.items():
            if name in ours_by_theirs:
                renamed[ours_by_theirs[name]] = entry
            else:  # quant convs included: SD3's VAE has none, so such a file is another model's
                unexpected.append(name)
        entries = renamed
    shapes = {k: e.shape + ((1, 1) if len(e.shape) == 2 else ()) for k, e in entries.items()}
    config = vae_config_from_shapes(shapes, path)
    with torch.device("meta"):
        vae = VAE(config)
    return fill(vae, {k: [e] for k, e in entries.items()}, shapes,
                (path, f"the SD3 VAE ({layout} layout) with the config its shapes give, {config}"),
                unexpected=unexpected, convert=lambda name, t: t.view(shapes[name]), dtype=dtype,
                device=device)
