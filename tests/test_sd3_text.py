"""SD3's text encoders against Hugging Face transformers' own, on tiny random models in both
layouts; the tokenizers against open_clip's and sentencepiece."""
import base64
import gzip
import io
import json
import os
import random

import pytest
import torch
from conftest import relative, within
from safetensors.torch import save_file

from checkpoints import CheckpointError
from sd3.text import load_clip, load_t5, relative_position_bucket, sd3_prompt_embedding
from sd3.tokenizers import CLIPTokenizer, T5Tokenizer, read_protobuf

transformers = pytest.importorskip("transformers")


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms and biases too, so a wrong mapping of any tensor shows
        for name, p in model.named_parameters():
            # norm gains around 1
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(scale + torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def clip_ids(eos, seed=1):
    """Start token, 5-20 random words, end token, then end tokens as padding (CLIP-L's padding in
    SD3)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, 77), eos)
    for row, n in enumerate((5, 12, 20)):
        ids[row, 0] = eos - 1
        ids[row, 1:1 + n] = torch.randint(1, eos - 1, (n,), generator=g)
    return ids


@pytest.mark.parametrize("layout, activation, heads", [
    ("diffusers folder", "quick_gelu", 4),          # CLIP-L's activation, read from config.json
    ("diffusers folder", "gelu", 4),                # bigG's
    # no config.json: width 64 -> 1 head of 64, not CLIP-L -> gelu
    ("single file with prefix", "gelu", 1),
])
def test_clip_matches_transformers(layout, activation, heads, tmp_path):
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=3,
                                         num_attention_heads=heads, max_position_embeddings=77,
                                         projection_dim=48,
                                         hidden_act=activation, bos_token_id=97, eos_token_id=98,
                                         pad_token_id=98)
    torch.manual_seed(0)
    reference = randomize(transformers.CLIPTextModelWithProjection(config))
    if layout == "diffusers folder":
        reference.save_pretrained(tmp_path / "text_encoder")
        path = tmp_path / "text_encoder"
    else:  # how SD3's all-in-one file nests the encoders
        state = {"text_encoders.clip_l.transformer." + k: v.contiguous() for k,
                 v in reference.state_dict().items()}
        save_file(state, tmp_path / "all_in_one.safetensors")
        path = tmp_path / "all_in_one.safetensors"
    ours = load_clip(str(path))
    ids = clip_ids(eos=98)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
    within(relative(hidden, out.hidden_states[-2]), 1e-4, "hidden")  # SD3: the penultimate layer
    within(relative(pooled, out.text_embeds), 1e-4, "pooled")        # the projected end-token state


@pytest.mark.parametrize("layout", ["diffusers folder", "single file with prefix"])
def test_t5_encoder_matches_transformers(layout, tmp_path):
    config = transformers.T5Config(vocab_size=99, d_model=64, d_kv=16, d_ff=96, num_layers=3,
                                   num_heads=4, relative_attention_num_buckets=32,
                                   relative_attention_max_distance=128,
                                   feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    reference = randomize(transformers.T5EncoderModel(config))
    if layout == "diffusers folder":
        reference.save_pretrained(tmp_path / "text_encoder_3")
        path = tmp_path / "text_encoder_3"
    else:
        state = {"text_encoders.t5xxl.transformer." + k: v.contiguous() for k,
                 v in reference.state_dict().items() if "embed_tokens" not in k}
        save_file(state, tmp_path / "t5.safetensors")
        path = tmp_path / "t5.safetensors"
    ours = load_t5(str(path))
    # offsets past max_distance
    ids = torch.randint(1, 99, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        within(relative(ours(ids), expected), 1e-4, "hidden")


def test_relative_position_buckets_match_transformers():
    offsets = torch.arange(-300, 301)
    from transformers.models.t5.modeling_t5 import T5Attention
    expected = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32,
                                                     max_distance=128)
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
    # diffusers without T5: zeros of its max_sequence_length (256) in T5's place
    assert without_t5.shape == (B, 77 + 256, 4096) and (without_t5[:, 77:] == 0).all()
    assert sd3_prompt_embedding(clip_l, clip_g, None, t5_tokens=77)[0].shape == (B, 154, 4096)

# -----------------------------------------------------------------------------
# Tokenizers: CLIP's against open_clip's on its own vocabulary, T5's against sentencepiece


def open_clip_tokenizer_module():
    """open_clip's tokenizer.py alone: importing the package pulls torchvision, which the tests do
    not need."""
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.fail("open_clip is missing: pip install --no-deps open_clip_torch (see "
                    "requirements-dev.txt)")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, os.path.join(os.path.dirname(path), "bpe_simple_vocab_16e6.txt.gz")


def varied_strings(words, n, seed=0):
    """n strings of 0-40 words (every tenth up to 90: past the length limit) joined by assorted
    whitespace."""
    rng = random.Random(seed)
    strings = ["".join(rng.choice(words) + rng.choice([" ", "  ", "\t", "\n", "", " "])
                       for _ in range(rng.randint(0, 90 if i % 10 == 0 else 40))) for i in range(n)]
    return strings + ["", "   ", "A", "ALL CAPS", "x" * 300]


CLIP_WORDS = ("a photo of an astronaut riding horse on mars, 4k HDR!! don't it's we'll they've I'm "
              "you'd DSLR 35mm f/1.8 café naïve Ünïcödé 東京 タワー 🐱🚀 “quoted” ‘single’ "
              "&amp; &lt;b&gt; ﬁne ＡＢＣ１２３ <|endoftext|> ... --- ### (x) [y] {z} 1,000,000 "
              "3.14159 e=mc² "
              "½ über-cool self-driving O'Neil").split(" ")


def test_clip_tokenizer_matches_open_clip(tmp_path):
    """Our BPE, reading vocab.json + merges.txt as SD3's tokenizer folders hold them, written from
    open_clip's own vocabulary file; CLIP-G's padding ("!", id 0) is open_clip's."""
    module, vocab_file = open_clip_tokenizer_module()
    reference = module.SimpleTokenizer()
    merges = gzip.open(vocab_file).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(module.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    ours = CLIPTokenizer.from_folder(str(folder))
    strings = varied_strings(CLIP_WORDS, 400)
    mismatched = [s for s in strings if ours([s])[0].tolist() != reference([s])[0].tolist()]
    assert not mismatched, f"{len(mismatched)} of {len(strings)} differ, e.g. {mismatched[0]!r}"
    assert ours(["a photo"]).shape == (1, 77)
    (folder / "special_tokens_map.json").unlink()  # CLIP-L's folder: pad with the end token
    assert (CLIPTokenizer.from_folder(str(folder))(["a photo"])[0, -1].item()
            == vocab.index("<|endoftext|>"))


T5_WORDS = ("the DRM scores noisy latents ÆØÅ 漢字 ﬁne ＡＢＣ１２３ café 🐱 x tab\tnew\nline 3.14 "
            "don't "
            "<unk> </s> ▁ under_score a\u00a0b c\u3000d e\rf g\u200bh Ⅻ ①").split(" ")


def test_t5_tokenizer_matches_sentencepiece(tmp_path):
    """A unigram model trained here on this repository's README (T5's special ids: pad 0, </s> 1,
    unk 2), read from its spiece.model and from a tokenizer.json holding the same pieces and
    normalisation rules."""
    spm = pytest.importorskip("sentencepiece")
    lines = [line for line in open(os.path.join(os.path.dirname(__file__), "..", "README.md"))
             if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=400,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    reference = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # the model's field 3, its rules
    normalizer = dict(read_protobuf(dict(read_protobuf(model.getvalue()))[3]))
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": p, "special": True}
                         for i, p in enumerate(["<pad>", "</s>", "<unk>"])],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled",
             "precompiled_charsmap": base64.b64encode(normalizer[2]).decode()}]},
        "model": {"type": "Unigram", "unk_id": 2,
                  "vocab": [[reference.id_to_piece(i), reference.get_score(i)]
                            for i in range(reference.get_piece_size())]}}))
    length = 64
    for path in ("spiece.model", "tokenizer.json"):
        ours = T5Tokenizer.from_file(str(tmp_path / path), length=length)
        for text in varied_strings(T5_WORDS, 300):
            # truncated, then </s>
            expected = reference.encode(text)[:length - 1] + [1]
            assert ours([text])[0].tolist() == expected + [0] * (length - len(expected)), (path,
                                                                                           text)


def test_broken_tokenizer_files_are_named(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\xff" * 40)
    (tmp_path / "tokenizer.json").write_text("{}")
    for name in ("spiece.model", "tokenizer.json"):
        with pytest.raises(CheckpointError, match=f"{name} is not a T5 tokenizer"):
            T5Tokenizer.from_file(str(tmp_path / name))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no spiece.model or tokenizer.json"):
        T5Tokenizer.from_file(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"lacks \['<\|startoftext\|>', '<\|endoftext\|>'\]"):
        CLIPTokenizer({"!": 0}, [], pad="!")
