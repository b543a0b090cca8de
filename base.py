"""The base model a run starts from, the CPU toy's or a public SD3 / SD3.5 pipeline, behind one interface.

    base = load_base(cfg, device)       # cfg: the ModelFlags below (--model, --base, --ckpt_dir, ...)

The method's files (sample.py, train_reward.py, train_policy.py) ask a base for these, and never ask which
world they are in:

| | the toy: `ToyBase` (below) | SD3: `SD3Base` (sd3/pipeline.py) |
|---|---|---|
| `dit`, `latent_size` | the tiny DiT of --base; 32 (pixels) | the pipeline's transformer; resolution / 8 |
| `train_prompts(path)` | a file, or data/world.py's 80 captions | a file (required) |
| `heldout_prompts(path, train)` | a file, or the 10 held-out captions | a file, or the first 8 training prompts |
| `prepare(prompts, cache_dir, text)` | nothing | each prompt embedded once (a disk cache; a DRM's text side if given), then the encoders and VAE leave the GPU |
| `drm_text(t5_tokens)` | the one encoder | the encoders, T5 padded to t5_tokens (the DRM repository's: 512) |
| `encode(prompts)` | the toy text encoder (word ids) | the embeddings looked up (CLIP-L, CLIP-G and T5, SD3's) |
| `finish(x)`, `to_images(x)` | pixels clamped to [-1, 1]; the same | latents as they are; the VAE's decoding |
| `judge(images, prompts)` | the simulated annotator's scores of each image (gold, ...) | {} (no annotator) |
| `pair_tensors(pairs, cache, resize)` | the PNGs, checked against the DiT's size | VAE posteriors, each image encoded once, cached |
| `shift` | 1 | its scheduler's (SD3, SD3.5: 3) |
| `load_drm(path)`, `save_drm(...)` | the DRM file carries the toy text encoder | the pipeline's encoders, not stored again |
| `save_policy(out_dir, state, ...)` | out_dir/model.safetensors, LoRA folded (a --base) | out_dir/lora (diffusers' LoRA format), or out_dir/transformer |

`encode` returns (cond, uncond): the prompts' (context, pooled) and the empty prompt's at the same batch
size, for classifier-free guidance (SD3 looks the empty prompt up once and expands it; the toy encodes it
per row, which keeps its published figures bitwise: its encoder's rounding depends on the batch).
"""
import dataclasses
import os

import torch

from common import (CheckpointError, UserError, config_from_meta, load_module, read_checkpoint, read_text,
                    save_checkpoint)
from data.judge import Judge
from data.world import HELDOUT_PROMPTS, TRAIN_PROMPTS, TextConfig, TextEncoder, read_images, tokenize
from model import DiT, DiTConfig, add_lora, export_state_dict
from reward import read_drm, save_drm

SD3_MODELS = ("sd3", "sd3-medium", "sd3.5-medium", "sd3.5-large")  # "sd3": any SD3-family DiT, config from its weights
ANNOTATED = ("toy",)  # the worlds with a simulated annotator (sample.py --eval needs one)


@dataclasses.dataclass
class ModelFlags:
    """The flags that pick the base model, shared by sample.py, train_reward.py and train_policy.py."""
    model: str = "toy"           # toy (the CPU world) | sd3-medium | sd3.5-medium | sd3.5-large | sd3 (any SD3 checkpoint)
    base: str = "data/base.safetensors"  # the toy: its pretrained DiT and text encoder (train_policy.py writes one)
    ckpt_dir: str = ""           # SD3: a diffusers pipeline folder, or a single .safetensors (DiT + VAE) with --text_dir
    text_dir: str = ""           # SD3: the folder with text_encoder*/ and tokenizer*/ (default: --ckpt_dir)
    t5: bool = True              # SD3: load T5-XXL (--t5=false: zeros in its place, as SD3 allows; 9.5 GB less)
    resolution: int = 1024       # SD3: image side in pixels (the DiT samples latents of side resolution / 8)
    transformer: str = ""        # SD3: a DiT to use in place of the pipeline's (train_policy.py writes out_dir/transformer)
    lora: str = ""               # SD3: a LoRA in diffusers' format folded into the DiT (train_policy.py writes out_dir/lora)


def check_model_flags(cfg):
    """The ModelFlags' values, before anything is loaded."""
    if cfg.model != "toy" and cfg.model not in SD3_MODELS:
        raise UserError(f"--model={cfg.model}: choose toy or one of {', '.join(SD3_MODELS)}")
    if cfg.model != "toy" and not cfg.ckpt_dir:
        raise UserError(f"--model={cfg.model} needs --ckpt_dir: a diffusers pipeline folder or a Stability .safetensors")
    if cfg.model == "toy" and cfg.lora:
        raise UserError("--lora is for SD3 models; a toy policy trained with LoRA is saved whole: pass it as --base")


def load_base(cfg, device):
    """The base model of --model (ModelFlags) on device: ToyBase, or SD3Base from --ckpt_dir."""
    check_model_flags(cfg)
    if cfg.model == "toy":
        return ToyBase.load(cfg.base, device)
    # imported here, deliberately: the SD3 plumbing (VAE, CLIP, T5, tokenizers, key maps) is a third of the code
    # and none of it is needed on the toy
    from sd3.pipeline import SD3Base
    return SD3Base(cfg, device)

# -----------------------------------------------------------------------------
# The toy's checkpoint: its DiT and text encoder in one file


def save_toy_base(path, dit, text_encoder, step, dtype=None):
    meta = {"kind": "base", "step": step, "dit_config": dataclasses.asdict(dit.config),
            "text_config": dataclasses.asdict(text_encoder.config)}
    save_checkpoint(path, {"dit": dit, "text": text_encoder}, meta, dtype)


def load_toy_base(path, device="cpu"):
    """-> (dit, text_encoder, meta) in eval mode, from a file written by save_toy_base."""
    tensors, meta = read_checkpoint(path, "base", "train one with train_base.py or use data/base.safetensors")
    dit = load_module(DiT(config_from_meta(DiTConfig, meta.get("dit_config"), path)), tensors, "dit", path)
    text_encoder = load_module(TextEncoder(config_from_meta(TextConfig, meta.get("text_config"), path)),
                               tensors, "text", path)
    return dit.to(device).eval(), text_encoder.to(device).eval(), meta


class ToyText:
    """The toy text encoder behind the text interface: prompts -> (context, pooled), through data/world.py's
    word-level tokenizer (an unknown word is an error naming it)."""

    def __init__(self, encoder):
        self.encoder = encoder

    @torch.no_grad()
    def encode(self, prompts):
        return self.encoder(tokenize(prompts).to(self.encoder.token_embedding.weight.device))


class ToyBase:
    """The CPU toy: the tiny DiT and text encoder of --base, 32x32 pixels, the simulated annotator."""

    def __init__(self, dit, text_encoder, meta=None):
        self.dit, self.text, self.meta = dit, ToyText(text_encoder), meta or {}
        self.latent_size = self.dit.config.pos_embed_max_size * self.dit.config.patch_size
        self.annotator = None  # made on first use: only evaluations need it
        self.shift = 1.0  # its sampling and training grid's shift (32 x 32 pixels need none)

    @classmethod
    def load(cls, path, device):
        return cls(*load_toy_base(path, device))

    def train_prompts(self, path):
        return read_prompts(path, "--prompts=", TRAIN_PROMPTS)

    def heldout_prompts(self, path, train_prompts):
        return read_prompts(path, "--eval_prompts=", HELDOUT_PROMPTS)

    def encode(self, prompts):
        return encode_with_empty(self.text, prompts)

    def finish(self, x):
        return x.clamp(-1, 1)

    def to_images(self, x):
        return x.clamp(-1, 1)

    def judge(self, images, prompts):
        """The annotator's scores of each image (N,): gold, digit accuracy, attribute match, fidelity, perceptual."""
        self.annotator = self.annotator or Judge()
        scores = self.annotator.score(images.cpu(), prompts)
        return {k: scores[k] for k in ("gold", "digit_correct", "attribute_match", "fidelity", "perceptual")}

    def pair_tensors(self, pairs, cache_dir, resize="crop"):
        """The pairs' images -> ((winners, losers) (N, 1, H, W) in [-1, 1], each of the DiT's size, None):
        pixels, no posterior to draw from."""
        images = read_images([p[key] for p in pairs for key in ("path1", "path2")])
        if images.shape[-1] != self.latent_size or images.shape[-2] != self.latent_size:
            raise UserError(f"the preference images are {images.shape[-2]}x{images.shape[-1]} pixels, the model's "
                            f"{self.latent_size}x{self.latent_size}")
        return (images[0::2], images[1::2]), None

    def load_drm(self, path, device):
        """-> (drm, the text encoder it reads prompts with, meta): a toy DRM carries its own."""
        drm, meta, tensors = read_drm(path, device, self.dit.config)
        if meta.get("text_config") is None:
            raise CheckpointError(f"{path} is a DRM of {meta.get('model')} (SD3): the toy cannot use it; "
                                  "pass --model and --ckpt_dir of its pipeline")
        encoder = load_module(TextEncoder(config_from_meta(TextConfig, meta["text_config"], path)), tensors, "text", path)
        return drm, ToyText(encoder.to(device).eval()), meta

    def save_drm(self, path, drm, step, meta, dtype=None):
        encoder = self.text.encoder
        meta = {**meta, "model": "toy", "text_config": dataclasses.asdict(encoder.config)}
        save_drm(path, drm, step, meta, dtype, {"text": encoder})

    def prepare(self, prompts, cache_dir="", text=None):
        """Nothing to do: the toy's encoder costs nothing (SD3Base embeds a run's prompts once)."""

    def drm_text(self, t5_tokens):
        """The text side a DRM reads prompts with: the toy's one encoder (no T5 to pad)."""
        return self.text

    def save_policy(self, out_dir, state, config, lora_rank, step):
        """The policy (LoRA folded in) as a toy base checkpoint, out_dir/model.safetensors (a --base)."""
        save_toy_base(os.path.join(out_dir, "model.safetensors"), plain_dit(state, config, lora_rank),
                      self.text.encoder, step)


def read_prompts(path, flag, default):
    """A file's non-empty lines, checked against the toy vocabulary, or the default when no file is given."""
    if not path:
        return default
    prompts = [line.strip() for line in read_text(path, flag).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{flag}{path} holds no prompt; write one prompt per line")
    tokenize(prompts)  # an unknown word fails here, naming the prompt
    return prompts


def plain_dit(state, config, lora_rank=0):
    """A DiT from a policy's state dict, its LoRA (if any) folded into the weights: what a saved policy holds."""
    with torch.device("meta"):
        policy, plain = DiT(config), DiT(config)
        if lora_rank:
            add_lora(policy, rank=lora_rank, alpha=float(lora_rank))
    policy.load_state_dict(state, assign=True)
    plain.load_state_dict(export_state_dict(policy), assign=True)
    return plain


def encode_with_empty(text, prompts):
    """(cond, uncond) for guidance: text.encode(prompts) and the empty prompt's at the same batch size."""
    return text.encode(prompts), text.encode([""] * len(prompts))
