"""Public SD3 / SD3.5 checkpoints in the three scripts: a pipeline's parts as one `Base`, images to cached latents.

    python sample.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prompt="a red fox in snow"
    python train_reward.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prefs=hpdv3/
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prompts=prompts.txt \
        --drm=out/drm/model.safetensors --lora_rank=16

The scripts ask a base model for four things (common.Base): the DiT, a text side whose encode(prompts) gives
the DiT's (context, pooled), the latent size it samples at, and how latents become images. For the toy these
are the shipped checkpoint and pixel space; here they are a diffusers pipeline folder:

    transformer/  vae/  text_encoder/ (CLIP-L)  text_encoder_2/ (CLIP-G)  text_encoder_3/ (T5-XXL)
    tokenizer/  tokenizer_2/  tokenizer_3/

or Stability's single file (DiT + VAE) as --ckpt_dir with such a folder, or Stability's
text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors beside diffusers' tokenizer folders, as --text_dir.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common import Base, CheckpointError, UserError, atomic_write
from model import PRESETS
from sd3 import load_sd3, load_vae
from sd3_text import CLIPTokenizer, T5Tokenizer, load_clip, load_t5, sd3_prompt_embedding

SD3_MODELS = ("sd3", "sd3-medium", "sd3.5-medium", "sd3.5-large")  # "sd3": any SD3-family DiT, config from its weights


class SD3Text(nn.Module):
    """SD3's prompt encoding: three tokenizers and encoders -> (context (B, 77 + 256, 4096), pooled (B, 2048))."""

    def __init__(self, clip_l, clip_g, t5, tokenizers, context_dim=4096):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizers = tokenizers  # CLIP-L's, CLIP-G's, T5's
        self.context_dim = context_dim  # T5's width, the DiT's context_dim

    @torch.no_grad()
    def encode(self, prompts):
        device = self.clip_l.text_projection.weight.device
        ids = [tokenizer(prompts).to(device) for tokenizer in self.tokenizers]
        t5 = self.t5(ids[2]) if self.t5 is not None else None
        return sd3_prompt_embedding(self.clip_l(ids[0]), self.clip_g(ids[1]), t5, self.context_dim)


def find_part(folders, names, what):
    """The first of folder/name that exists, over the folders and names given; else an error naming them all."""
    tried = [os.path.join(folder, name) for folder in folders if folder for name in names]
    for path in tried:
        if os.path.exists(path):
            return path
    raise UserError(f"no {what}: looked for {', '.join(tried)}; give a diffusers pipeline folder as "
                            "--ckpt_dir (or --text_dir for the text encoders and tokenizers)")


def load_pipeline(cfg, device):
    """--model / --ckpt_dir / --text_dir / --t5 / --resolution (common.ModelFlags) -> Base on device."""
    if cfg.model not in SD3_MODELS:
        raise UserError(f"--model={cfg.model}: choose toy or one of {', '.join(SD3_MODELS)}")
    if not cfg.ckpt_dir:
        raise UserError(f"--model={cfg.model} needs --ckpt_dir: a diffusers pipeline folder or a Stability .safetensors")
    if not os.path.exists(cfg.ckpt_dir):
        raise UserError(f"--ckpt_dir={cfg.ckpt_dir} does not exist")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # float32 on CPUs (bf16 is slow)
    dit = load_sd3(cfg.transformer or cfg.ckpt_dir, dtype, device)
    if cfg.model != "sd3" and dit.config != PRESETS[cfg.model]:
        raise CheckpointError(f"--ckpt_dir={cfg.ckpt_dir} holds a DiT of config {dit.config}, not {cfg.model}'s "
                              f"{PRESETS[cfg.model]}; name the right --model, or --model=sd3 to take it as it is")
    vae = load_vae(cfg.ckpt_dir, dtype, device)
    folders = [cfg.text_dir, cfg.ckpt_dir if os.path.isdir(cfg.ckpt_dir) else ""]
    stability = os.path.join("text_encoders", "{}.safetensors")
    clip_l = load_clip(find_part(folders, ["text_encoder", stability.format("clip_l")], "CLIP-L"), dtype, device)
    clip_g = load_clip(find_part(folders, ["text_encoder_2", stability.format("clip_g")], "CLIP-G"), dtype, device)
    t5 = (load_t5(find_part(folders, ["text_encoder_3", stability.format("t5xxl_fp16"), stability.format("t5xxl")],
                            "T5-XXL"), dtype, device) if cfg.t5 else None)
    tokenizers = (CLIPTokenizer.from_folder(find_part(folders, ["tokenizer"], "CLIP-L tokenizer")),
                  CLIPTokenizer.from_folder(find_part(folders, ["tokenizer_2"], "CLIP-G tokenizer")),
                  T5Tokenizer.from_file(find_part(folders, ["tokenizer_3"], "T5 tokenizer")))
    factor = 2 ** (len(vae.config.channels) - 1)  # the VAE halves the image between levels: 8 for SD3's
    latent, largest = cfg.resolution // factor, dit.config.pos_embed_max_size * dit.config.patch_size
    if cfg.resolution % (factor * dit.config.patch_size) or not 0 < latent <= largest:
        raise UserError(f"--resolution={cfg.resolution}: a multiple of {factor * dit.config.patch_size} up to "
                         f"{largest * factor} for this model (latents of side resolution / {factor})")
    return Base(dit, SD3Text(clip_l, clip_g, t5, tokenizers, dit.config.context_dim).eval(), latent, vae=vae,
                meta={"model": cfg.model, "ckpt_dir": cfg.ckpt_dir})

# -----------------------------------------------------------------------------
# Preference images -> latents, once


def read_image(path, size):
    """An image file -> (3, size, size) in [-1, 1]: the shorter side resized to size, the centre cropped."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError included
        raise UserError(f"{path}: not an image PIL can read ({e})") from None
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32))
    return pixels.permute(2, 0, 1) / 127.5 - 1


@torch.no_grad()
def encode_images(base, paths, resolution, cache_dir, batch_size=8):
    """VAE latents (N, 16, h, w) of the image files, the posterior mean, cached in cache_dir under a hash of
    the file list and resolution, so a second run (or --resume) skips the VAE."""
    key = hashlib.sha256(json.dumps([resolution, base.meta.get("ckpt_dir"), paths]).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"latents_{key}.safetensors")
    if os.path.exists(cache):
        return load_file(cache)["latents"]
    parameter = next(base.vae.parameters())
    latents = []
    for i in tqdm(range(0, len(paths), batch_size), desc="VAE-encoding the images"):
        images = torch.stack([read_image(p, resolution) for p in paths[i:i + batch_size]])
        latents.append(base.vae.encode(images.to(parameter.device, parameter.dtype)).float().cpu())
    latents = torch.cat(latents)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(cache, lambda tmp: save_file({"latents": latents}, tmp))
    return latents


def load_pair_latents(base, pairs, resolution, cache_dir):
    """SD3's counterpart of data/preferences.load_pair_tensors -> winners, losers (N, 16, h, w), prompts, gold (None).
    Each distinct image is VAE-encoded once, however many pairs it is in."""
    paths = sorted({pair[key] for pair in pairs for key in ("path1", "path2")})
    latents = encode_images(base, paths, resolution, cache_dir)
    row = {path: i for i, path in enumerate(paths)}
    winners, losers = (latents[[row[pair[key]] for pair in pairs]] for key in ("path1", "path2"))
    return winners, losers, [pair["prompt"] for pair in pairs], None
