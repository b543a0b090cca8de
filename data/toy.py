"""The CPU toy as a base model (base.py's interface): the tiny DiT and text encoder of --base, 32x32
pixels, the simulated annotator, and its checkpoint (the DiT and the text encoder in one file)."""
import dataclasses
import os

import torch

from checkpoints import (CheckpointError, config_from_meta, load_module, read_checkpoint,
                         save_checkpoint)
from common import UserError, read_prompts
from data.judge import Judge
from data.world import (HELDOUT_PROMPTS, TRAIN_PROMPTS, TextConfig, TextEncoder, read_images,
                        tokenize)
from lora import add_lora, export_state_dict
from model import DiT, DiTConfig
from reward import read_drm, save_drm


def save_toy_base(path, dit, text_encoder, step, dtype=None):
    meta = {"kind": "base", "step": step, "dit_config": dataclasses.asdict(dit.config),
            "text_config": dataclasses.asdict(text_encoder.config)}
    save_checkpoint(path, {"dit": dit, "text": text_encoder}, meta, dtype)


def load_toy_base(path, device="cpu"):
    """-> (dit, text_encoder, meta) in eval mode, from a file written by save_toy_base."""
    tensors, meta = read_checkpoint(path, "base",
                                    "train one with train_base.py or use data/base.safetensors")
    dit_config = config_from_meta(DiTConfig, meta.get("dit_config"), path)
    text_config = config_from_meta(TextConfig, meta.get("text_config"), path)
    text_encoder, dit = TextEncoder(text_config), DiT(dit_config)
    load_module(text_encoder, tensors, "text", path)
    load_module(dit, tensors, "dit", path)
    return dit.to(device).eval(), text_encoder.to(device).eval(), meta


class ToyText:
    """The toy text encoder behind the text interface: prompts -> (context, pooled), through
    data/world.py's word-level tokenizer (an unknown word is an error naming it)."""

    def __init__(self, encoder):
        self.encoder = encoder

    @torch.no_grad()
    def encode(self, prompts):
        return self.encoder(tokenize(prompts).to(self.encoder.token_embedding.weight.device))


class ToyBase:
    """The CPU toy: the tiny DiT and text encoder of --base, 32x32 pixels, the simulated
    annotator."""

    def __init__(self, dit, text_encoder, meta=None):
        self.dit, self.text, self.meta = dit, ToyText(text_encoder), meta or {}
        self.latent_size = self.dit.config.pos_embed_max_size * self.dit.config.patch_size
        self.annotator = None  # made on first use: only evaluations need it
        self.shift = 1.0  # its sampling and training grid's shift (32 x 32 pixels need none)

    @classmethod
    def load(cls, path, device):
        return cls(*load_toy_base(path, device))

    def train_prompts(self, path):
        return read_prompts(path, "--prompts=", TRAIN_PROMPTS, tokenize)

    def heldout_prompts(self, path, train_prompts):
        return read_prompts(path, "--eval_prompts=", HELDOUT_PROMPTS, tokenize)

    def encode(self, prompts):
        return encode_with_empty(self.text, prompts)

    def finish(self, x):
        return x.clamp(-1, 1)

    def to_images(self, x):
        return x.clamp(-1, 1)

    def judge(self, images, prompts):
        """The annotator's scores of each image (N,): gold, digit accuracy, attribute match,
        fidelity, perceptual."""
        self.annotator = self.annotator or Judge()
        scores = self.annotator.score(images.cpu(), prompts)
        return {k: scores[k]
                for k in ("gold", "digit_correct", "attribute_match", "fidelity", "perceptual")}

    def pair_tensors(self, pairs, cache_dir, resize="crop"):
        """The pairs' images -> ((winners, losers) (N, 1, H, W) in [-1, 1], each of the DiT's size,
        None): pixels, no posterior to draw from."""
        images = read_images([p[key] for p in pairs for key in ("path1", "path2")])
        if images.shape[-1] != self.latent_size or images.shape[-2] != self.latent_size:
            raise UserError(f"the preference images are {images.shape[-2]}x{images.shape[-1]} "
                            f"pixels, the model's {self.latent_size}x{self.latent_size}")
        return (images[0::2], images[1::2]), None

    def load_drm(self, path, device):
        """-> (drm, the text encoder it reads prompts with, meta): a toy DRM carries its own."""
        drm, meta, tensors = read_drm(path, device, self.dit.config)
        if meta.get("text_config") is None:
            raise CheckpointError(f"{path} is a DRM of {meta.get('model')} (SD3): the toy cannot "
                                  "use it; pass --model and --ckpt_dir of its pipeline")
        encoder = load_module(TextEncoder(config_from_meta(TextConfig, meta["text_config"], path)),
                              tensors, "text", path)
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
        """The policy (LoRA folded in) as a toy base checkpoint, out_dir/model.safetensors (a
        --base)."""
        save_toy_base(os.path.join(out_dir, "model.safetensors"),
                      plain_dit(state, config, lora_rank), self.text.encoder, step)


def plain_dit(state, config, lora_rank=0):
    """A DiT from a policy's state dict, its LoRA (if any) folded into the weights: what a saved
    policy holds."""
    with torch.device("meta"):
        policy, plain = DiT(config), DiT(config)
        if lora_rank:
            add_lora(policy, rank=lora_rank, alpha=float(lora_rank))
    policy.load_state_dict(state, assign=True)
    plain.load_state_dict(export_state_dict(policy), assign=True)
    return plain


def encode_with_empty(text, prompts):
    """(cond, uncond) for guidance: text.encode(prompts) and the empty prompt's at the same batch
    size."""
    return text.encode(prompts), text.encode([""] * len(prompts))

