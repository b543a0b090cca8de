"""load_sd3 / save_sd3 against diffusers' own SD3 implementation, on tiny random models.

diffusers is the independent reference twice over: its SD3Transformer2DModel
computes the expected output, and its single-file converter (Stability keys ->
diffusers keys) checks the Stability layout we write.
"""
import json
import os

import pytest
import torch
from conftest import relative, within
from safetensors.torch import save_file

from checkpoints import CheckpointError
from lora import add_lora
from sd3.mmdit import fold_lora, load_sd3, save_lora, save_sd3

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_sd3_transformer_checkpoint_to_diffusers)

# head dim 64 as every public model; depth, width and position grid shrunk
TINY_LIKE = {
    "sd3-medium": dict(num_layers=3, num_attention_heads=2, qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(num_layers=3, num_attention_heads=2, qk_norm="rms_norm",
                         dual_attention_layers=(0, 1)),
    "sd3.5-large": dict(num_layers=4, num_attention_heads=3, qk_norm="rms_norm",
                        dual_attention_layers=()),}


def tiny_diffusers_model(kind, seed=0):
    torch.manual_seed(seed)
    cfg = TINY_LIKE[kind]
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, attention_head_dim=64,
        joint_attention_dim=48, caption_projection_dim=64 * cfg["num_attention_heads"],
        pooled_projection_dim=24, pos_embed_max_size=12, **cfg)
    with torch.no_grad():
        # every tensor random and distinct: zero-initialised gates would hide a wrong mapping
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def inputs(height, width, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, height, width, generator=g), torch.tensor([0.3, 0.9]),
            torch.randn(2, 5, 48, generator=g), torch.randn(2, 24, generator=g))


@torch.no_grad()
def diffusers_output(model, x, sigma, context, pooled):
    return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                 timestep=sigma * 1000).sample


def assert_matches(dit, reference, what):
    for height, width in ((16, 16), (12, 20), (8, 14)):  # square and not, all within the 24x24 grid
        x, sigma, context, pooled = inputs(height, width)
        with torch.no_grad():
            ours = dit(x, sigma, context, pooled)
        within(relative(ours, diffusers_output(reference, x, sigma, context, pooled)), 1e-4,
               f"{what}, {height}x{width}")


@pytest.mark.parametrize("kind", list(TINY_LIKE))
def test_load_diffusers_folder_sharded_and_single(kind, tmp_path):
    reference = tiny_diffusers_model(kind)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    reference.save_pretrained(tmp_path / "pipeline" / "transformer")
    for path in (tmp_path / "sharded", tmp_path / "pipeline",
                 tmp_path / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"):
        dit = load_sd3(str(path))
        assert dit.config.qk_norm == (TINY_LIKE[kind]["qk_norm"] is not None)
        assert dit.config.dual_attention_layers == TINY_LIKE[kind]["dual_attention_layers"]
        assert_matches(dit, reference, path.name)


@pytest.mark.parametrize("kind", list(TINY_LIKE))
def test_stability_layout_agrees_with_diffusers_converter(kind, tmp_path):
    reference = tiny_diffusers_model(kind)
    dit = load_sd3(_save_diffusers(reference, tmp_path))
    single_file = tmp_path / "sd3_single_file.safetensors"
    save_sd3(dit, str(single_file), layout="stability")
    # add what a real single file carries beside the transformer: the loader must ignore it
    from safetensors.torch import load_file
    tensors = load_file(single_file)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
    tensors["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    save_file(tensors, single_file)
    # diffusers' own converter reads our Stability file into a model that agrees with the reference
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")})
    rebuilt = tiny_diffusers_model(kind, seed=99)
    rebuilt.load_state_dict(converted, strict=True)
    x, sigma, context, pooled = inputs(16, 16)
    within(relative(diffusers_output(rebuilt, x, sigma, context, pooled),
                    diffusers_output(reference, x, sigma, context, pooled)), 1e-6,
           "diffusers' conversion")
    # and we read it back, prefixed or not
    assert_matches(load_sd3(str(single_file)), reference, "prefixed")
    bare = tmp_path / "bare.safetensors"
    save_file({k[len("model.diffusion_model."):]: v for k,
               v in tensors.items() if k.startswith("model.")}, bare)
    assert_matches(load_sd3(str(bare)), reference, "bare")


def _save_diffusers(model, tmp_path):
    path = tmp_path / "transformer"
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("layout", ["diffusers", "stability"])
def test_round_trip_gives_identical_tensors(layout, tmp_path):
    dit = load_sd3(_save_diffusers(tiny_diffusers_model("sd3.5-medium"), tmp_path))
    out = tmp_path / ("again" if layout == "diffusers" else "again.safetensors")
    save_sd3(dit, str(out), layout=layout)
    again = load_sd3(str(out))
    assert again.config == dit.config
    first, second = dit.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    if layout == "diffusers":  # diffusers itself reads what we wrote
        assert_matches(dit, SD3Transformer2DModel.from_pretrained(str(out)).eval(),
                       "read by diffusers")


def test_lora_is_merged_on_export(tmp_path):
    dit = load_sd3(_save_diffusers(tiny_diffusers_model("sd3-medium"), tmp_path))
    loras = add_lora(dit, rank=2)
    with torch.no_grad():
        for lora in loras:
            lora.lora_B.normal_(std=0.05)
    x, sigma, context, pooled = inputs(16, 16)
    with torch.no_grad():
        expected = dit(x, sigma, context, pooled)
    save_sd3(dit, str(tmp_path / "merged"), layout="diffusers")
    exported = SD3Transformer2DModel.from_pretrained(str(tmp_path / "merged")).eval()
    within(relative(diffusers_output(exported, x, sigma, context, pooled), expected), 1e-4,
           "merged export")


# with dual attention's attn2
@pytest.mark.parametrize("kind", ["sd3-medium", "sd3.5-medium"])
def test_diffusers_pipeline_loads_our_lora_and_equals_our_model(kind, tmp_path):
    """save_lora writes diffusers' LoRA format: StableDiffusion3Pipeline.load_lora_weights (peft)
    reads it, and the pipeline's transformer with it equals ours with the adapters (a fused qkv
    adapter split into q, k, v sharing A); fold_lora reads it back into a plain DiT, equal again.
    Rounding seen 5.9e-6 relative (folded; 8 arithmetic variants), tolerance 1e-4; a LoRA forward
    at 0.9 of its scaling: 1,100x the tolerance (tests/mutations.py)."""
    pytest.importorskip("peft")
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    folder = _save_diffusers(tiny_diffusers_model(kind), tmp_path)
    dit = load_sd3(folder)
    torch.manual_seed(0)
    for lora in add_lora(dit, rank=3, alpha=6.0):
        # scaling 2, folded into B on export
        with torch.no_grad():
            lora.lora_B.normal_(std=0.05)
    x, sigma, context, pooled = inputs(16, 16)
    with torch.no_grad():
        expected = dit(x, sigma, context, pooled)
    save_lora(dit.state_dict(), str(tmp_path / "lora"), scaling=2.0)
    parts = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "text_encoder_3", "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(), **parts)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    within(relative(diffusers_output(pipe.transformer, x, sigma, context, pooled), expected), 1e-4,
           "pipeline with LoRA")
    folded = fold_lora(load_sd3(folder), str(tmp_path / "lora"))
    with torch.no_grad():
        within(relative(folded(x, sigma, context, pooled), expected), 1e-4, "folded LoRA")
    with pytest.raises(CheckpointError, match="a LoRA of another model"):
        fold_lora(load_sd3(_save_diffusers(tiny_diffusers_model("sd3.5-large"),
                                           tmp_path / "other")),
                  str(tmp_path / "lora"))


def test_an_sd35_medium_lora_is_under_one_percent_of_the_policy():
    """The LoRA train_policy.py writes (rank 16, float32) against the bf16 transformer it adapts,
    counted on the meta device: 8.9M numbers against 2,243M, 0.80% of the bytes."""
    from model import build_dit
    dit = build_dit("sd3.5-medium", device="meta")
    policy_bytes = 2 * sum(p.numel() for p in dit.parameters())
    add_lora(dit, rank=16, alpha=16.0)
    lora_bytes = 4 * sum(p.numel() for p in dit.parameters() if p.requires_grad)
    assert lora_bytes < 0.01 * policy_bytes


def test_dtype_cast_while_loading(tmp_path):
    dit = load_sd3(_save_diffusers(tiny_diffusers_model("sd3-medium"), tmp_path),
                   dtype=torch.bfloat16)
    assert {p.dtype for p in dit.state_dict().values()} == {torch.bfloat16}
    assert not any(p.is_meta for p in dit.state_dict().values())


def test_broken_checkpoints_name_the_file_and_the_keys(tmp_path):
    folder = _save_diffusers(tiny_diffusers_model("sd3.5-medium"), tmp_path)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(weights)

    def write(name, changed):
        path = tmp_path / name
        save_file(changed, path)
        return str(path)

    missing = write("missing.safetensors",
                    {k: v for k, v in tensors.items() if "attn.to_out.0" not in k})
    with pytest.raises(CheckpointError,
                       match=r"missing.safetensors .*missing 6 "
                           r"\(joint_blocks.0.x_block.attn.proj.bias"):
        load_sd3(missing)
    extra = write("extra.safetensors",
                  {**tensors, "transformer_blocks.0.attn.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError,
                       match=r"unexpected 1 \(transformer_blocks.0.attn.mystery.weight\)"):
        load_sd3(extra)
    reshaped = dict(tensors)
    reshaped["proj_out.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"wrong shape 1 \(final_layer.linear.bias\)"):
        load_sd3(write("reshaped.safetensors", reshaped))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(weights, "rb").read()[:-100])
    with pytest.raises(CheckpointError,
                       match="truncated.safetensors is not a readable safetensors file "
                             ".*incomplete metadata"):
        load_sd3(str(truncated))
    text = tmp_path / "config.safetensors"
    text.write_text(json.dumps({"not": "weights"}))
    with pytest.raises(CheckpointError,
                       match="config.safetensors is not a readable safetensors file"):
        load_sd3(str(text))
    with pytest.raises(CheckpointError, match="no/such/dir"):
        load_sd3("no/such/dir")

# -----------------------------------------------------------------------------
# The SD3 VAE against diffusers' AutoencoderKL with SD3's settings


def tiny_diffusers_vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                        layers_per_block=2, latent_channels=16, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                        shift_factor=0.0609)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return vae.eval()


def assert_vae_matches(ours, reference, what):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 24, 16, generator=g) * 2 - 1
    with torch.no_grad():
        mean = reference.encode(images).latent_dist.mean
        expected_latents = (mean - 0.0609) * 1.5305
        latents = ours.encode(images)
        within(relative(latents, expected_latents), 1e-4, f"{what}: latents")
        # the posterior the DRM repository draws from (latent_dist.sample(), then shifted and
        # scaled)
        posterior_mean, posterior_std = ours.posterior(images)
        within(relative(posterior_mean, expected_latents), 1e-4, f"{what}: posterior mean")
        within(relative(posterior_std, reference.encode(images).latent_dist.std * 1.5305), 1e-4,
               f"{what}: posterior std")
        expected_images = reference.decode(expected_latents / 1.5305 + 0.0609).sample
        within(relative(ours.decode(expected_latents), expected_images), 1e-4, f"{what}: images")


def test_vae_loads_diffusers_and_stability_layouts(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sd3.vae import load_vae
    reference = tiny_diffusers_vae()
    reference.save_pretrained(tmp_path / "pipeline" / "vae")
    vae = load_vae(str(tmp_path / "pipeline"))
    assert vae.config.channels == (32, 64, 64) and vae.config.layers_per_block == 2
    assert_vae_matches(vae, reference, "folder")
    # Stability's single file: our keys under first_stage_model., beside a transformer tensor
    single = tmp_path / "single.safetensors"
    tensors = {"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file({**tensors, "model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}, single)
    assert_vae_matches(load_vae(str(single)), reference, "single file")
    # diffusers' own LDM converter reads our keys into a model equal to the reference
    converted = convert_ldm_vae_checkpoint(tensors, dict(reference.config))
    rebuilt = tiny_diffusers_vae(seed=5)
    rebuilt.load_state_dict(converted, strict=True)
    assert_vae_matches(vae, rebuilt, "diffusers' conversion")


def test_vae_from_another_model_is_refused(tmp_path):
    from sd3.vae import load_vae
    reference = tiny_diffusers_vae()
    tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
    tensors["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)  # an SD1-style VAE has quant convs
    save_file(tensors, tmp_path / "sd1_vae.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"sd1_vae.safetensors .*unexpected 1 \(quant_conv.weight\)"):
        load_vae(str(tmp_path / "sd1_vae.safetensors"))
