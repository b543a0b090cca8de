"""Public SD3 / SD3.5 checkpoints in the three scripts: a pipeline's parts as one base model,
SD3Base.

    python sample.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium --prompt="a red fox
    in snow"
    python train_reward.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium
    --prefs=hpdv3/
    python train_policy.py --model=sd3.5-medium --ckpt_dir=stable-diffusion-3.5-medium
    --prompts=prompts.txt \
        --drm=out/drm/model.safetensors --lora_rank=16

SD3Base gives what base.py's table lists, as the toy's ToyBase does, from a diffusers pipeline
folder:

    transformer/  vae/  text_encoder/ (CLIP-L)  text_encoder_2/ (CLIP-G)  text_encoder_3/ (T5-XXL)
    tokenizer/  tokenizer_2/  tokenizer_3/

or Stability's single file (DiT + VAE) as --ckpt_dir with such a folder, or Stability's
text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors beside diffusers' tokenizer folders, as
--text_dir.
"""
import contextlib
import copy
import hashlib
import json
import os

import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from checkpoints import CheckpointError, atomic_write, fingerprint
from common import UserError, frozen_dtype, read_prompts, read_text
from images import image_tensor, open_image
from model import PRESETS, build_dit
from reward import read_drm, save_drm
from sd3.mmdit import fold_lora, load_sd3, save_lora, save_sd3
from sd3.text import load_clip, load_t5, sd3_prompt_embedding
from sd3.tokenizers import CLIPTokenizer, T5Tokenizer
from sd3.vae import load_vae


class SD3Text(nn.Module):
    """SD3's prompt encoding: three tokenizers and encoders -> (context (B, 77 + 256, 4096), pooled
    (B, 2048)).

    The lean recipe: `prepare` embeds a run's prompts once (read from, and added to, a disk cache
    keyed by the encoders and the prompt, when a cache folder is given), then the encoders leave the
    GPU; `encode` looks the embeddings up (kept in memory, or read from the cache's files), on
    `device`."""

    def __init__(self, clip_l, clip_g, t5, tokenizers, context_dim=4096, identity="", device="cpu"):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizers = tokenizers  # CLIP-L's, CLIP-G's, T5's
        self.context_dim = context_dim  # T5's width, the DiT's context_dim
        # the encoders' files; where results go
        self.identity, self.device = identity, torch.device(device)
        # prompt -> (context, pooled) on the CPU; or the disk cache's folder
        self.memory, self.folder = {}, None

    @property
    def t5_tokens(self):
        return self.tokenizers[2].length

    def with_t5_tokens(self, tokens):
        """The same encoders, T5 padded to `tokens` (the DRM repository's: 512; the pipeline's:
        256), with embeddings of their own."""
        if tokens == self.t5_tokens:
            return self
        t5_tokenizer = copy.copy(self.tokenizers[2])
        t5_tokenizer.length = tokens
        return SD3Text(self.clip_l, self.clip_g, self.t5, (*self.tokenizers[:2], t5_tokenizer),
                       self.context_dim, f"{self.identity} T5 {tokens}", self.device).eval()

    @torch.no_grad()
    def run_encoders(self, prompts):
        device = self.clip_l.text_projection.weight.device
        ids = [tokenizer(prompts).to(device) for tokenizer in self.tokenizers]
        t5 = self.t5(ids[2]) if self.t5 is not None else None
        return sd3_prompt_embedding(self.clip_l(ids[0]), self.clip_g(ids[1]), t5, self.context_dim,
                                    self.t5_tokens)

    def file(self, prompt):
        return os.path.join(self.folder,
                            hashlib.sha256(prompt.encode()).hexdigest()[:32] + ".safetensors")

    def prepare(self, prompts, cache_dir="", batch=8):
        """Embed each distinct prompt not yet embedded (in batches, on the encoders' device), then
        move the encoders to the CPU. cache_dir: keep the embeddings there, one file a prompt,
        reused by later runs."""
        if cache_dir:
            key = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
            self.folder = os.path.join(cache_dir, f"prompts_{key}")
            os.makedirs(self.folder, exist_ok=True)
        missing = [p for p in dict.fromkeys(prompts) if not self.has(p)]
        if missing:
            self.to(self.device)  # back on the run's device for the moment it encodes
        for i in tqdm(range(0, len(missing), batch), desc="embedding prompts",
                      disable=len(missing) <= batch):
            chunk = missing[i:i + batch]
            for prompt, context, pooled in zip(chunk, *(t.cpu() for t in self.run_encoders(chunk))):
                if self.folder:
                    atomic_write(self.file(prompt), lambda tmp, c=context, p=pooled: save_file(
                        {"context": c.contiguous(), "pooled": p.contiguous()}, tmp))
                else:
                    self.memory[prompt] = (context, pooled)
        self.to("cpu")  # the encoders are done: rollouts and updates run without them

    def has(self, prompt):
        return prompt in self.memory or bool(self.folder) and os.path.exists(self.file(prompt))

    def lookup(self, prompt):
        if prompt in self.memory:
            return self.memory[prompt]
        tensors = load_file(self.file(prompt))
        return tensors["context"], tensors["pooled"]

    def encode(self, prompts):
        """(context, pooled) of the prompts on `device`; a prompt not prepared is embedded now."""
        self.prepare([p for p in prompts if not self.has(p)])
        # each distinct prompt read once
        stored = {p: self.lookup(p) for p in dict.fromkeys(prompts)}
        return tuple(torch.stack([stored[p][i] for p in prompts]).to(self.device) for i in (0, 1))


def find_part(folders, names, what):
    """The first of folder/name that exists, over the folders and names given; else an error naming
    them all."""
    tried = [os.path.join(folder, name) for folder in folders if folder for name in names]
    for path in tried:
        if os.path.exists(path):
            return path
    raise UserError(f"no {what}: looked for {', '.join(tried)}; give a diffusers pipeline folder "
                    "as --ckpt_dir (or --text_dir for the text encoders and tokenizers)")


def check_folders(cfg):
    """--ckpt_dir and --text_dir exist, and a pipeline folder has its vae/, before any weights are
    read (a folder that is a part itself, transformer/ or vae/, is read as such)."""
    if not os.path.exists(cfg.ckpt_dir):
        raise UserError(f"--ckpt_dir={cfg.ckpt_dir} does not exist")
    if cfg.text_dir and not os.path.isdir(cfg.text_dir):
        problem = "is a file" if os.path.exists(cfg.text_dir) else "does not exist"
        raise UserError(f"--text_dir={cfg.text_dir} {problem}: give the folder of the text "
                        "encoders and tokenizers")
    vae = os.path.join(cfg.ckpt_dir, "vae")
    part = os.path.join(cfg.ckpt_dir, "diffusion_pytorch_model.safetensors")
    if os.path.isdir(cfg.ckpt_dir) and not os.path.isdir(vae) and not os.path.exists(part):
        raise UserError(f"--ckpt_dir={cfg.ckpt_dir} has no vae/ folder ({vae} does not exist): a "
                        "diffusers pipeline folder holds its VAE there")


class SD3Base:
    """A public SD3 / SD3.5 pipeline as a base model (the interface of base.py): --ckpt_dir,
    --text_dir, --t5,
    --resolution, --transformer, --model (a preset name also checks the DiT is that model's)."""

    def __init__(self, cfg, device):
        check_folders(cfg)
        dtype, self.device = frozen_dtype(device), torch.device(device)
        self.dit = load_sd3(cfg.transformer or cfg.ckpt_dir, dtype, device)
        if cfg.lora:  # a LoRA train_policy.py wrote (out_dir/lora), folded into the weights
            fold_lora(self.dit, cfg.lora)
        if cfg.model != "sd3" and self.dit.config != PRESETS[cfg.model]:
            raise CheckpointError(
                f"--ckpt_dir={cfg.ckpt_dir} holds a DiT of config {self.dit.config}, not "
                f"{cfg.model}'s {PRESETS[cfg.model]}; name the right --model, or --model=sd3 to "
                "take it as it is")
        self.vae = load_vae(cfg.ckpt_dir, dtype, device)
        self.text = load_text(cfg, dtype, device, self.dit.config.context_dim)
        # the VAE halves the image between levels: 8 for SD3's
        factor = 2 ** (len(self.vae.config.channels) - 1)
        patch = self.dit.config.patch_size
        self.latent_size = cfg.resolution // factor
        largest = self.dit.config.pos_embed_max_size * patch
        if cfg.resolution % (factor * patch) or not 0 < self.latent_size <= largest:
            raise UserError(f"--resolution={cfg.resolution}: a multiple of "
                            f"{factor * self.dit.config.patch_size} up to {largest * factor} for "
                            f"this model (latents of side resolution / {factor})")
        self.resolution, self.meta = cfg.resolution, {"model": cfg.model, "ckpt_dir": cfg.ckpt_dir}
        self.shift = scheduler_shift(cfg.ckpt_dir)
        self.prepared = ([], "")  # the prompts prepare() embedded, and its cache folder

    def train_prompts(self, path):
        if not path:
            raise UserError("--prompts: give a text file of prompts, one per line")
        return read_prompts(path, "--prompts=")

    def heldout_prompts(self, path, train_prompts):
        return read_prompts(path, "--eval_prompts=") if path else train_prompts[:8]

    def prepare(self, prompts, cache_dir="", text=None):
        """The lean recipe: the prompts' (and the empty prompt's) embeddings computed once (cached
        in cache_dir), then the text encoders and the VAE leave the GPU; the VAE comes back only to
        decode or encode images. text: a DRM's text side (drm_text) to prepare in place of the
        pipeline's."""
        (text or self.text).prepare([*prompts, ""], cache_dir)
        if text is None:
            self.prepared = ([*self.prepared[0], *prompts, ""], cache_dir)
        self.vae.to("cpu")

    def encode(self, prompts):
        """(cond, uncond): the prompts' embeddings, and the empty prompt's, looked up once for the
        batch."""
        uncond = self.text.encode([""])
        return self.text.encode(prompts), tuple(t.expand(len(prompts), *t.shape[1:])
                                                for t in uncond)

    def finish(self, x):
        return x  # latents have no range to keep

    @contextlib.contextmanager
    def vae_on_device(self):
        """The VAE on the run's device for the moment it is used, back on the CPU after (once
        prepared)."""
        where = next(self.vae.parameters()).device
        yield self.vae.to(self.device)
        self.vae.to(where)

    def to_images(self, x):
        """Latents -> RGB images in [-1, 1], by the VAE's decoder, one image at a time: at 1024 px
        the decoder's activations are ~9 GiB an image (bench/sd3_memory.py), more than the DiT's
        weights."""
        with self.vae_on_device() as vae:
            dtype = next(vae.parameters()).dtype
            return torch.cat([vae.decode(image.to(dtype)).float().clamp(-1, 1)
                              for image in x.split(1)])

    def judge(self, images, prompts):
        return {}  # no simulated annotator for real images

    def pair_tensors(self, pairs, cache_dir, resize="crop"):
        """The pairs' images as VAE posteriors: (winners, losers) of means (N, 16, h, w) and (their
        stds, the same shapes): each distinct image encoded once, however many pairs it is in, and
        cached in cache_dir (a second run or --resume skips the VAE)."""
        paths = sorted({pair[key] for pair in pairs for key in ("path1", "path2")})
        means, stds = encode_images(self, paths, cache_dir, resize)
        row = {path: i for i, path in enumerate(paths)}
        rows = [[row[pair[key]] for pair in pairs] for key in ("path1", "path2")]
        return (means[rows[0]], means[rows[1]]), (stds[rows[0]], stds[rows[1]])

    def load_drm(self, path, device):
        """-> (drm, the text side it reads prompts with: this pipeline's encoders, T5 padded as the
        DRM was trained (the DRM repository's: 512 tokens), meta)."""
        drm, meta, _ = read_drm(path, device, self.dit.config)
        if meta.get("text_config") is not None:
            raise CheckpointError(f"{path} is a DRM of the toy; an SD3 base needs a DRM trained "
                                  "with --model=...")
        return drm, self.drm_text(meta.get("t5_tokens", self.text.t5_tokens)), meta

    def drm_text(self, t5_tokens):
        """This pipeline's encoders with T5 padded to t5_tokens, the prompts prepared so far
        embedded."""
        text = self.text.with_t5_tokens(t5_tokens)
        if text is not self.text and self.prepared[0]:
            text.prepare(*self.prepared)
        return text

    def save_drm(self, path, drm, step, meta, dtype=None):
        """Our layout; meta's t5_tokens, the T5 length its prompts were read with (default the
        pipeline's)."""
        meta = {"t5_tokens": self.text.t5_tokens, **meta, **self.meta, "text_config": None}
        save_drm(path, drm, step, meta, dtype)

    def save_policy(self, out_dir, state, config, lora_rank, step):
        """The policy: with LoRA its adapters alone in diffusers' LoRA format, out_dir/lora
        (--lora=... or diffusers' load_lora_weights reads it); else a diffusers transformer folder,
        out_dir/transformer."""
        if lora_rank:
            save_lora(state, os.path.join(out_dir, "lora"))
            return
        dit = build_dit(config, device="meta")
        dit.load_state_dict(state, assign=True)
        save_sd3(dit, os.path.join(out_dir, "transformer"))


def load_text(cfg, dtype, device, context_dim):
    """The two CLIPs, T5 (or none: --t5=false) and their tokenizers, from --text_dir or --ckpt_dir
    -> SD3Text."""
    folders = [cfg.text_dir, cfg.ckpt_dir if os.path.isdir(cfg.ckpt_dir) else ""]
    stability = os.path.join("text_encoders", "{}.safetensors")
    clip_l_path = find_part(folders, ["text_encoder", stability.format("clip_l")], "CLIP-L")
    clip_g_path = find_part(folders, ["text_encoder_2", stability.format("clip_g")], "CLIP-G")
    t5_path = (find_part(folders, ["text_encoder_3", stability.format("t5xxl_fp16"),
                                   stability.format("t5xxl")],
                         "T5-XXL") if cfg.t5 else None)
    clip_l, clip_g = load_clip(clip_l_path, dtype, device), load_clip(clip_g_path, dtype, device)
    t5 = load_t5(t5_path, dtype, device) if t5_path else None
    tokenizer_paths = (find_part(folders, ["tokenizer"], "CLIP-L tokenizer"),
                       find_part(folders, ["tokenizer_2"], "CLIP-G tokenizer"),
                       find_part(folders, ["tokenizer_3"], "T5 tokenizer"))
    tokenizers = (CLIPTokenizer.from_folder(tokenizer_paths[0]),
                  CLIPTokenizer.from_folder(tokenizer_paths[1]),
                  T5Tokenizer.from_file(tokenizer_paths[2]))
    # the prompt cache's key: what the encoders and tokenizers hold, not where (a file replaced
    # at the same path gives another key, so no embedding of the old one is reused)
    identity = json.dumps([fingerprint(path) if path else None
                           for path in (clip_l_path, clip_g_path, t5_path, *tokenizer_paths)]
                          + [str(dtype)])
    return SD3Text(clip_l, clip_g, t5, tokenizers, context_dim, identity, device).eval()

# -----------------------------------------------------------------------------
# Preference images -> latents, once


def scheduler_shift(ckpt_dir):
    """The shift of the pipeline's FlowMatchEulerDiscreteScheduler (scheduler/scheduler_config.json;
    SD3 and SD3.5 ship 3.0, the value when the folder has none): the grid its DRM trains on
    (train_reward.py)."""
    path = os.path.join(ckpt_dir, "scheduler",
                        "scheduler_config.json") if os.path.isdir(ckpt_dir) else ""
    if not os.path.exists(path):
        return 3.0
    try:
        shift = json.loads(read_text(path, "the scheduler's config")).get("shift", 1.0)
    except json.JSONDecodeError:
        raise UserError(f"{path} is not JSON; the pipeline folder is damaged") from None
    if not isinstance(shift, (int, float)) or not shift > 0:
        raise UserError(f"{path}: shift {shift!r} is not a positive number")
    return float(shift)


def read_image(path, size, resize="crop"):
    """An image file (8 bits, or 16-bit grey) -> (3, size, size) in [-1, 1], bicubic:
    resize="stretch" to size x size whatever its aspect (the DRM repository's dataset.py), "crop"
    the shorter side to size and the centre cropped."""
    image = open_image(path, "RGB")
    if resize == "stretch":
        return image_tensor(image.resize((size, size), Image.BICUBIC), 3)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)),
                          max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image_tensor(image.crop((left, top, left + size, top + size)), 3)


@torch.no_grad()
def encode_images(base, paths, cache_dir, resize="crop", batch_size=8):
    """VAE posteriors of the image files -> (means, stds) (N, 16, h, w) each, in SD3's latent
    scaling, cached in cache_dir under a hash of the file list, the pipeline, the resolution and the
    resize."""
    key = hashlib.sha256(json.dumps([base.resolution, base.meta.get("ckpt_dir"), paths,
                                     resize]).encode())
    cache = os.path.join(cache_dir, f"latents_{key.hexdigest()[:16]}.safetensors")
    if os.path.exists(cache):
        stored = load_file(cache)
        return stored["means"], stored["stds"]
    means, stds = [], []
    with base.vae_on_device() as vae:
        parameter = next(vae.parameters())
        for i in tqdm(range(0, len(paths), batch_size), desc="VAE-encoding the images"):
            images = torch.stack([read_image(p, base.resolution, resize)
                                  for p in paths[i:i + batch_size]])
            mean, std = vae.posterior(images.to(parameter.device, parameter.dtype))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
    means, stds = torch.cat(means), torch.cat(stds)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(cache, lambda tmp: save_file({"means": means, "stds": stds}, tmp))
    return means, stds
