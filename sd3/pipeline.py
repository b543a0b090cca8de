"""Public SD3 / SD3.5 checkpoints in the three scripts: a pipeline's parts as one base model, SD3Base.

    python sample.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prompt="a red fox in snow"
    python train_reward.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prefs=hpdv3/
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prompts=prompts.txt \
        --drm=out/drm/model.safetensors --lora_rank=16

SD3Base gives what base.py's table lists, as the toy's ToyBase does, from a diffusers pipeline folder:

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

from common import CheckpointError, UserError, atomic_write, read_text
from model import PRESETS
from reward import read_drm, save_drm
from sd3.mmdit import load_sd3, save_sd3
from sd3.text import load_clip, load_t5, sd3_prompt_embedding
from sd3.tokenizers import CLIPTokenizer, T5Tokenizer
from sd3.vae import load_vae

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


class SD3Base:
    """A public SD3 / SD3.5 pipeline as a base model (the interface of base.py): --ckpt_dir, --text_dir, --t5,
    --resolution, --transformer, --model (a preset name also checks the DiT is that model's)."""

    def __init__(self, cfg, device):
        if not os.path.exists(cfg.ckpt_dir):
            raise UserError(f"--ckpt_dir={cfg.ckpt_dir} does not exist")
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # float32 on CPUs (bf16 is slow)
        self.dit = load_sd3(cfg.transformer or cfg.ckpt_dir, dtype, device)
        if cfg.model != "sd3" and self.dit.config != PRESETS[cfg.model]:
            raise CheckpointError(f"--ckpt_dir={cfg.ckpt_dir} holds a DiT of config {self.dit.config}, not {cfg.model}'s "
                                  f"{PRESETS[cfg.model]}; name the right --model, or --model=sd3 to take it as it is")
        self.vae = load_vae(cfg.ckpt_dir, dtype, device)
        self.text = load_text(cfg, dtype, device, self.dit.config.context_dim)
        factor = 2 ** (len(self.vae.config.channels) - 1)  # the VAE halves the image between levels: 8 for SD3's
        self.latent_size, largest = cfg.resolution // factor, self.dit.config.pos_embed_max_size * self.dit.config.patch_size
        if cfg.resolution % (factor * self.dit.config.patch_size) or not 0 < self.latent_size <= largest:
            raise UserError(f"--resolution={cfg.resolution}: a multiple of {factor * self.dit.config.patch_size} up to "
                            f"{largest * factor} for this model (latents of side resolution / {factor})")
        self.resolution, self.meta = cfg.resolution, {"model": cfg.model, "ckpt_dir": cfg.ckpt_dir}

    def train_prompts(self, path):
        if not path:
            raise UserError("--prompts: give a text file of prompts, one per line")
        return read_prompts(path, "--prompts=")

    def heldout_prompts(self, path, train_prompts):
        return read_prompts(path, "--eval_prompts=") if path else train_prompts[:8]

    def encode(self, prompts):
        return self.text.encode(prompts), self.text.encode([""] * len(prompts))

    def finish(self, x):
        return x  # latents have no range to keep

    def to_images(self, x):
        """Latents -> RGB images in [-1, 1], by the VAE's decoder."""
        return self.vae.decode(x.to(next(self.vae.parameters()).dtype)).float().clamp(-1, 1)

    def judge(self, images, prompts):
        return {}  # no simulated annotator for real images

    def pair_tensors(self, pairs, cache_dir):
        """The pairs' images as VAE latents (N, 16, h, w): each distinct image encoded once, however many pairs
        it is in, and cached in cache_dir (a second run or --resume skips the VAE)."""
        paths = sorted({pair[key] for pair in pairs for key in ("path1", "path2")})
        latents = encode_images(self, paths, cache_dir)
        row = {path: i for i, path in enumerate(paths)}
        return tuple(latents[[row[pair[key]] for pair in pairs]] for key in ("path1", "path2"))

    def load_drm(self, path, device):
        """-> (drm, the text side it reads prompts with: this pipeline's, meta)."""
        drm, meta, _ = read_drm(path, device, self.dit.config)
        if meta.get("text_config") is not None:
            raise CheckpointError(f"{path} is a DRM of the toy; an SD3 base needs a DRM trained with --model=...")
        return drm, self.text, meta

    def save_drm(self, path, drm, step, meta, dtype=None):
        save_drm(path, drm, step, {**meta, **self.meta, "text_config": None}, dtype)

    def save_policy(self, out_dir, dit, step):
        """The policy as a diffusers transformer folder, out_dir/transformer (--transformer=... reads it)."""
        save_sd3(dit, os.path.join(out_dir, "transformer"))


def read_prompts(path, flag):
    prompts = [line.strip() for line in read_text(path, flag).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{flag}{path} holds no prompt; write one prompt per line")
    return prompts


def load_text(cfg, dtype, device, context_dim):
    """The two CLIPs, T5 (or none: --t5=false) and their tokenizers, from --text_dir or --ckpt_dir -> SD3Text."""
    folders = [cfg.text_dir, cfg.ckpt_dir if os.path.isdir(cfg.ckpt_dir) else ""]
    stability = os.path.join("text_encoders", "{}.safetensors")
    clip_l = load_clip(find_part(folders, ["text_encoder", stability.format("clip_l")], "CLIP-L"), dtype, device)
    clip_g = load_clip(find_part(folders, ["text_encoder_2", stability.format("clip_g")], "CLIP-G"), dtype, device)
    t5 = (load_t5(find_part(folders, ["text_encoder_3", stability.format("t5xxl_fp16"), stability.format("t5xxl")],
                            "T5-XXL"), dtype, device) if cfg.t5 else None)
    tokenizers = (CLIPTokenizer.from_folder(find_part(folders, ["tokenizer"], "CLIP-L tokenizer")),
                  CLIPTokenizer.from_folder(find_part(folders, ["tokenizer_2"], "CLIP-G tokenizer")),
                  T5Tokenizer.from_file(find_part(folders, ["tokenizer_3"], "T5 tokenizer")))
    return SD3Text(clip_l, clip_g, t5, tokenizers, context_dim).eval()

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
def encode_images(base, paths, cache_dir, batch_size=8):
    """VAE latents (N, 16, h, w) of the image files, the posterior mean, cached in cache_dir under a hash of
    the file list, the pipeline and the resolution."""
    key = hashlib.sha256(json.dumps([base.resolution, base.meta.get("ckpt_dir"), paths]).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"latents_{key}.safetensors")
    if os.path.exists(cache):
        return load_file(cache)["latents"]
    parameter = next(base.vae.parameters())
    latents = []
    for i in tqdm(range(0, len(paths), batch_size), desc="VAE-encoding the images"):
        images = torch.stack([read_image(p, base.resolution) for p in paths[i:i + batch_size]])
        latents.append(base.vae.encode(images.to(parameter.device, parameter.dtype)).float().cpu())
    latents = torch.cat(latents)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(cache, lambda tmp: save_file({"latents": latents}, tmp))
    return latents
