"""The base model a run starts from, the CPU toy's or a public SD3 / SD3.5 pipeline, behind one
interface.

    base = load_base(cfg, device) # cfg: the ModelFlags below (--model, --base, --ckpt_dir, ...)

The method's files (sample.py, train_reward.py, train_policy.py) ask a base for the members of
`Base` below, and never ask which world they are in: the toy (`data.toy.ToyBase`, 32x32 pixels, a
simulated annotator) or SD3 (`sd3.pipeline.SD3Base`, latents of a public pipeline, no annotator).
"""
import dataclasses
from typing import Protocol

from common import UserError, flag

# "sd3": any SD3-family DiT, config from its weights
SD3_MODELS = ("sd3", "sd3-medium", "sd3.5-medium", "sd3.5-large")
ANNOTATED = ("toy",)  # the worlds with a simulated annotator (sample.py --eval needs one)


class Base(Protocol):
    """What a base model gives the scripts; each member says what the toy and SD3 do."""
    dit: object          # the DiT (toy: the tiny one of --base; SD3: the pipeline's transformer)
    latent_size: int     # the side of its latent grid (toy: 32 pixels; SD3: resolution / 8)
    shift: float         # the sampling grid's shift (toy: 1; SD3: its scheduler's, SD3.5: 3)

    def train_prompts(self, path):
        """A prompt file's lines (toy: data/world.py's 80 captions when path is ""; SD3: a file is
        required)."""

    def heldout_prompts(self, path, train_prompts):
        """The evaluation prompts (toy: the 10 held-out captions; SD3: a file, or the first 8 of
        train_prompts)."""

    def prepare(self, prompts, cache_dir="", text=None):
        """SD3: embed each prompt once (a disk cache; a DRM's text side if given), then move the
        encoders and the VAE off the GPU. The toy: nothing."""

    def drm_text(self, t5_tokens):
        """The DRM's text side (toy: the one encoder; SD3: the encoders, T5 padded to t5_tokens,
        the DRM repository's 512)."""

    def encode(self, prompts):
        """-> (cond, uncond): the prompts' (context, pooled) and the empty prompt's at the same
        batch size, for guidance. SD3 looks embeddings up and expands the empty prompt's; the toy
        encodes the empty prompt per row, which keeps its published figures bitwise (its encoder's
        rounding depends on the batch)."""

    def finish(self, x):
        """A sample at sigma 0 as the DRM sees it (toy: pixels clamped to [-1, 1]; SD3: as is)."""

    def to_images(self, x):
        """Samples -> images in [-1, 1] (toy: the pixels; SD3: the VAE's decoding)."""

    def judge(self, images, prompts):
        """The annotator's scores of each image, {"gold": ..., ...} (SD3: {}, no annotator)."""

    def pair_tensors(self, pairs, cache_dir, resize="crop"):
        """Preference images as the DRM's inputs (toy: the PNGs, checked against the DiT's size;
        SD3: VAE posteriors, each image encoded once and cached)."""

    def load_drm(self, path, device):
        """A DRM file (toy: it carries the toy text encoder; SD3: the pipeline's encoders)."""

    def save_drm(self, path, drm, step, meta, dtype=None):
        """Write a DRM file read back by load_drm."""

    def save_policy(self, out_dir, state, config, lora_rank, step):
        """A trained policy (toy: out_dir/model.safetensors, LoRA folded, a --base; SD3:
        out_dir/lora in diffusers' LoRA format, or out_dir/transformer)."""


@dataclasses.dataclass
class ModelFlags:
    """The flags that pick the base model, shared by sample.py, train_reward.py and
    train_policy.py."""
    # toy (the CPU world) | sd3-medium | sd3.5-medium | sd3.5-large | sd3 (any SD3 checkpoint)
    model: str = "toy"
    # the toy: its pretrained DiT and text encoder (train_policy.py writes one)
    base: str = "data/base.safetensors"
    # SD3: a diffusers pipeline folder, or a single .safetensors (DiT + VAE) with --text_dir
    ckpt_dir: str = ""
    # SD3: the folder with text_encoder*/ and tokenizer*/ (default: --ckpt_dir)
    text_dir: str = ""
    # SD3: load T5-XXL (--t5=false: zeros in its place, as SD3 allows; 9.5 GB less)
    t5: bool = True
    # SD3: image side in pixels (the DiT samples latents of side resolution / 8)
    resolution: int = flag(1024, "[16, inf)")
    # SD3: a DiT to use in place of the pipeline's (train_policy.py writes out_dir/transformer)
    transformer: str = ""
    # SD3: a LoRA in diffusers' format folded into the DiT (train_policy.py writes out_dir/lora)
    lora: str = ""

    def inputs(self):
        """{flag: path} of the files and folders these flags make a run read (RunDir's
        --overwrite never removes them)."""
        return {f"--{name}=": getattr(self, name) for name in ("base", "ckpt_dir", "text_dir",
                                                               "transformer", "lora")}

    def check(self):
        """The flags' values together, before anything is loaded (common.check_flags calls a
        group's check with the rest)."""
        if self.model != "toy" and self.model not in SD3_MODELS:
            raise UserError(f"--model={self.model}: choose toy or one of {', '.join(SD3_MODELS)}")
        if self.model != "toy" and not self.ckpt_dir:
            raise UserError(f"--model={self.model} needs --ckpt_dir: a diffusers pipeline folder "
                            "or a Stability .safetensors")
        if self.model == "toy" and self.lora:
            raise UserError("--lora is for SD3 models; a toy policy trained with LoRA is saved "
                            "whole: pass it as --base")


def load_base(cfg, device):
    """The base model of --model (ModelFlags) on device: data.toy.ToyBase, or sd3.pipeline.SD3Base
    from --ckpt_dir. Each world is imported here, when it is asked for: the SD3 plumbing (VAE, CLIP,
    T5, tokenizers, key maps) is a third of the code and none of it is needed on the toy, nor the
    toy's annotator on SD3."""
    cfg.check()
    if cfg.model == "toy":
        from data.toy import ToyBase
        return ToyBase.load(cfg.base, device)
    from sd3.pipeline import SD3Base
    return SD3Base(cfg, device)
