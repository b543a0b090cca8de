"""SD3's text encoders against Hugging Face transformers' own, on tiny random models in both layouts."""
import pytest
import torch
from safetensors.torch import save_file

from sd3_text import load_clip, load_t5, relative_position_bucket, sd3_prompt_embedding

transformers = pytest.importorskip("transformers")


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms and biases too, so a wrong mapping of any tensor shows
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norm gains around 1
            p.copy_(scale + torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def clip_ids(eos, seed=1):
    """Start token, 5-20 random words, end token, then end tokens as padding (CLIP-L's padding in SD3)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, 77), eos)
    for row, n in enumerate((5, 12, 20)):
        ids[row, 0] = eos - 1
        ids[row, 1:1 + n] = torch.randint(1, eos - 1, (n,), generator=g)
    return ids


@pytest.mark.parametrize("layout, activation, heads", [
    ("diffusers folder", "quick_gelu", 4),          # CLIP-L's activation, read from config.json
    ("diffusers folder", "gelu", 4),                # bigG's
    ("single file with prefix", "gelu", 1),         # no config.json: width 64 -> 1 head of 64, not CLIP-L -> gelu
])
def test_clip_matches_transformers(layout, activation, heads, tmp_path):
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=48,
                                         hidden_act=activation, bos_token_id=97, eos_token_id=98, pad_token_id=98)
    torch.manual_seed(0)
    reference = randomize(transformers.CLIPTextModelWithProjection(config))
    if layout == "diffusers folder":
        reference.save_pretrained(tmp_path / "text_encoder")
        path = tmp_path / "text_encoder"
    else:  # how SD3's all-in-one file nests the encoders
        state = {"text_encoders.clip_l.transformer." + k: v.contiguous() for k, v in reference.state_dict().items()}
        save_file(state, tmp_path / "all_in_one.safetensors")
        path = tmp_path / "all_in_one.safetensors"
    ours = load_clip(str(path))
    ids = clip_ids(eos=98)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
    assert relative_error(hidden, out.hidden_states[-2]) < 1e-4    # SD3 takes the penultimate layer
    assert relative_error(pooled, out.text_embeds) < 1e-4          # the projected end-token state


@pytest.mark.parametrize("layout", ["diffusers folder", "single file with prefix"])
def test_t5_encoder_matches_transformers(layout, tmp_path):
    config = transformers.T5Config(vocab_size=99, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
                                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                   feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    reference = randomize(transformers.T5EncoderModel(config))
    if layout == "diffusers folder":
        reference.save_pretrained(tmp_path / "text_encoder_3")
        path = tmp_path / "text_encoder_3"
    else:
        state = {"text_encoders.t5xxl.transformer." + k: v.contiguous() for k, v in reference.state_dict().items()
                 if "embed_tokens" not in k}
        save_file(state, tmp_path / "t5.safetensors")
        path = tmp_path / "t5.safetensors"
    ours = load_t5(str(path))
    ids = torch.randint(1, 99, (2, 200), generator=torch.Generator().manual_seed(1))  # offsets past max_distance
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        assert relative_error(ours(ids), expected) < 1e-4


def test_relative_position_buckets_match_transformers():
    offsets = torch.arange(-300, 301)
    from transformers.models.t5.modeling_t5 import T5Attention
    expected = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(offsets, 32, 128), expected)


def test_prompt_embedding_layout():
    B = 2
    clip_l = (torch.ones(B, 77, 768), torch.full((B, 768), 1.0))
    clip_g = (torch.full((B, 77, 1280), 2.0), torch.full((B, 1280), 2.0))
    t5 = torch.full((B, 256, 4096), 3.0)
    context, pooled = sd3_prompt_embedding(clip_l, clip_g, t5)
    assert context.shape == (B, 77 + 256, 4096) and pooled.shape == (B, 2048)
    assert (context[:, :77, :768] == 1).all() and (context[:, :77, 768:2048] == 2).all()
    assert (context[:, :77, 2048:] == 0).all() and (context[:, 77:] == 3).all()
    assert (pooled[:, :768] == 1).all() and (pooled[:, 768:] == 2).all()
    without_t5, _ = sd3_prompt_embedding(clip_l, clip_g, None)
    assert without_t5.shape == (B, 154, 4096) and (without_t5[:, 77:] == 0).all()
