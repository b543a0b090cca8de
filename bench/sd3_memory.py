"""What each script keeps on the GPU at SD3.5-medium size, by arithmetic: parameter counts times bytes, no activations.

    python -m bench.sd3_memory            # needs transformers and diffusers (requirements-dev.txt); builds on `meta`

The parts are built on the meta device with the public models' configs (CLIP-L, OpenCLIP bigG, T5-XXL's
encoder, SD3's VAE; our DiT and DRM), so their parameter counts are exact and nothing is allocated. Frozen
weights are bf16 (2 bytes) as sd3/pipeline.py loads them on a GPU; the DRM is float32 as SD3Base.load_drm
keeps it; a trained model costs 16 bytes a parameter (float32 weights, gradients, AdamW's two moments).
"""

import torch

from model import PRESETS, build_dit
from reward import DRM


def count(module):
    """-> (parameters, buffers). The DiT's stored position grid (226M numbers at SD3.5's 384 x 384) is a buffer:
    it takes memory but no gradient or optimizer state."""
    return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())


def gigabytes(counts, bytes_per_parameter, bytes_per_buffer=None):
    parameters, buffers = counts
    return (parameters * bytes_per_parameter + buffers * (bytes_per_buffer or bytes_per_parameter)) / 1e9


def main():
    import transformers
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        clip_l = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768))
        clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280))
        t5 = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    dit = build_dit(PRESETS["sd3.5-medium"], device="meta")
    drm = DRM.from_dit(dit, drop_last=3)
    n = {"CLIP-L": count(clip_l), "CLIP-G": count(clip_g), "T5-XXL encoder": count(t5), "VAE": count(vae),
         "DiT": count(dit), "DRM": count(drm)}
    print("| part | parameters + buffers | bf16 GB | float32 GB |")
    print("|---|---|---|---|")
    for name, (parameters, buffers) in n.items():
        print(f"| {name} | {parameters / 1e6:,.0f}M + {buffers / 1e6:,.0f}M | {gigabytes(n[name], 2):.2f} | "
              f"{gigabytes(n[name], 4):.2f} |")
    clips = gigabytes(n["CLIP-L"], 2) + gigabytes(n["CLIP-G"], 2)
    vae_dit = gigabytes(n["VAE"], 2) + gigabytes(n["DiT"], 2)
    frozen_drm = gigabytes(n["DRM"], 4)
    rows = [("sample.py", vae_dit),
            ("sample.py --search=stepwise --drm=...", vae_dit + frozen_drm),
            ("train_reward.py (DRM trained, AdamW)", gigabytes(n["DRM"], 16, 4) + gigabytes(n["VAE"], 2)),
            ("train_policy.py --lora_rank=16", vae_dit + frozen_drm),
            ("train_policy.py (full fine-tune, AdamW)", gigabytes(n["DiT"], 16, 4) + frozen_drm + gigabytes(n["VAE"], 2))]
    print("\n| script | GB before activations | with --t5=false |")
    print("|---|---|---|")
    for name, gb in rows:
        print(f"| `{name}` | {gb + clips + gigabytes(n['T5-XXL encoder'], 2):.0f} | {gb + clips:.0f} |")

if __name__ == "__main__":
    main()
