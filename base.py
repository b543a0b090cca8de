"""The base model a run starts from, the CPU toy's or a public SD3 / SD3.5 pipeline, behind one
interface.

    base = load_base(cfg, device) # cfg: the ModelFlags below (--model, --base, --ckpt_dir, ...)

The method's files (sample.py, train_reward.py, train_policy.py) ask a base for these, and never ask
which world they are in:

| | the toy: `ToyBase` (below) | SD3: `SD3Base` (sd3/pipeline.py) |
|---|---|---|
| `dit`, `latent_size` | the tiny DiT of --base; 32 (pixels) | the pipeline's transformer;
resolution / 8 |
| `train_prompts(path)` | a file, or data/world.py's 80 captions | a file (required) |
| `heldout_prompts(path, train)` | a file, or the 10 held-out captions | a file, or the first 8
training prompts |
| `prepare(prompts, cache_dir, text)` | nothing | each prompt embedded once (a disk cache; a DRM's
text side if given), then the encoders and VAE leave the GPU |
| `drm_text(t5_tokens)` | the one encoder | the encoders, T5 padded to t5_tokens (the DRM
repository's: 512) |
| `encode(prompts)` | the toy text encoder (word ids) | the embeddings looked up (CLIP-L, CLIP-G and
T5, SD3's) |
| `finish(x)`, `to_images(x)` | pixels clamped to [-1, 1]; the same | latents as they are; the VAE's
decoding |
| `judge(images, prompts)` | the simulated annotator's scores of each image (gold, ...) | {} (no
annotator) |
| `pair_tensors(pairs, cache, resize)` | the PNGs, checked against the DiT's size | VAE posteriors,
each image encoded once, cached |
| `shift` | 1 | its scheduler's (SD3, SD3.5: 3) |
| `load_drm(path)`, `save_drm(...)` | the DRM file carries the toy text encoder | the pipeline's
encoders, not stored again |
| `save_policy(out_dir, state, ...)` | out_dir/model.safetensors, LoRA folded (a --base) |
out_dir/lora (diffusers' LoRA format), or out_dir/transformer |

`encode` returns (cond, uncond): the prompts' (context, pooled) and the empty prompt's at the same
batch size, for classifier-free guidance (SD3 looks the empty prompt up once and expands it; the toy
encodes it per row, which keeps its published figures bitwise: its encoder's rounding depends on the
batch).
"""
import dataclasses

from common import UserError

# "sd3": any SD3-family DiT, config from its weights
SD3_MODELS = ("sd3", "sd3-medium", "sd3.5-medium", "sd3.5-large")
ANNOTATED = ("toy",)  # the worlds with a simulated annotator (sample.py --eval needs one)


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
    resolution: int = 1024
    # SD3: a DiT to use in place of the pipeline's (train_policy.py writes out_dir/transformer)
    transformer: str = ""
    # SD3: a LoRA in diffusers' format folded into the DiT (train_policy.py writes out_dir/lora)
    lora: str = ""



def check_model_flags(cfg):
    """The ModelFlags' values, before anything is loaded."""
    if cfg.model != "toy" and cfg.model not in SD3_MODELS:
        raise UserError(f"--model={cfg.model}: choose toy or one of {', '.join(SD3_MODELS)}")
    if cfg.model != "toy" and not cfg.ckpt_dir:
        raise UserError(f"--model={cfg.model} needs --ckpt_dir: a diffusers pipeline folder or a "
                        f"Stability .safetensors")
    if cfg.model == "toy" and cfg.lora:
        raise UserError("--lora is for SD3 models; a toy policy trained with LoRA is saved whole: "
                        "pass it as --base")



def load_base(cfg, device):
    """The base model of --model (ModelFlags) on device: data.toy.ToyBase, or sd3.pipeline.SD3Base
    from --ckpt_dir. Each world is imported here, when it is asked for: the SD3 plumbing (VAE, CLIP,
    T5, tokenizers, key maps) is a third of the code and none of it is needed on the toy, nor the
    toy's annotator on SD3."""
    check_model_flags(cfg)
    if cfg.model == "toy":
        from data.toy import ToyBase
        return ToyBase.load(cfg.base, device)
    from sd3.pipeline import SD3Base
    return SD3Base(cfg, device)
