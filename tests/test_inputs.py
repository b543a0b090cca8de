"""Every file the project reads is checked against what it must hold: a bad one ends in one line
naming the file, the record or key, and what was expected (docs/faults.md), and nothing is written.

Preference records, checkpoint metadata, non-finite weights, tokenizer files, LoRA files, pipeline
folders and 16-bit images, each a test over the cases a user meets, in this process on tiny files.
"""
import importlib
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import max_abs, tiny_preferences, within
from PIL import Image
from safetensors.torch import load_file, save_file
from test_faults import error_line
from test_sd3_pipeline import clip_tokenizer_files, pipeline  # noqa: F401 (a fixture)

import sample
from checkpoints import CheckpointError, read_checkpoint
from common import UserError, check_flags, flag_fields, in_interval
from data.pairs import read_pairs
from data.toy import ToyBase, load_toy_base
from lora import add_lora
from reward import read_drm
from sd3.mmdit import fold_lora, load_sd3, save_lora
from sd3.pipeline import read_image
from sd3.tokenizers import CLIPTokenizer, T5Tokenizer


def toy_sample(tmp_path, *flags):
    """sample.py on these flags -> its one error line; no image was written."""
    out = tmp_path / "samples.png"
    line = error_line(sample, "--images=1", "--steps=1", f"--out={out}", *flags)
    assert not out.exists()
    return line

# -----------------------------------------------------------------------------
# 0. Numbers: each flag's range, declared beside its field, checked before any work

SCRIPTS = ["train_base", "train_reward", "train_policy", "sample", "data.preferences",
           "bench.grpo_credit", "bench.search", "bench.sd3_memory", "bench.gpu_check",
           "bench.dit_speed", "bench.load_sd3", "bench.rl_loop", "bench.stepwise_cost"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_number_declares_its_range_and_its_default_lies_in_it(name):
    """A property of every script's Config: each int and float flag (but the seed) declares its
    range, its default passes the check, and a note on what 0 means sits on a range holding 0."""
    config = importlib.import_module(name).Config
    for _, field in flag_fields(config()):
        within = field.metadata.get("within")
        if field.type in (int, float) and field.name != "seed":
            assert within or field.metadata.get("choices"), f"{name} --{field.name}: no range"
        if field.metadata.get("zero"):
            assert in_interval(0, within), f"{name} --{field.name}: 0 is out of its range"
    check_flags(config())


@pytest.mark.parametrize("name, flags, says", [
    ("train_policy", ["--grad_clip=0"], "--grad_clip=0.0: must be in (0, inf)"),
    ("train_policy", ["--grad_clip=-1"], "--grad_clip=-1.0: must be in (0, inf)"),
    ("train_policy", ["--clip_range=-1"], "--clip_range=-1.0: must be in (0, inf)"),
    ("train_policy", ["--adv_clip=-1"], "--adv_clip=-1.0: must be in (0, inf)"),
    ("train_policy", ["--kl_weight=-1"], "--kl_weight=-1.0: must be in [0, inf) (0: no KL)"),
    ("train_policy", ["--max_nfe=-1"], "--max_nfe=-1: must be in [0, inf) (0: no limit)"),
    ("train_policy", ["--lora_rank=-1"], "--lora_rank=-1: must be in [0, inf) (0: a full"),
    ("train_policy", ["--weight_decay=-1"], "--weight_decay=-1.0: must be in [0, inf)"),
    ("train_reward", ["--lr=-1"], "--lr=-1.0: must be in (0, inf)"),
    ("train_reward", ["--drm_sigma=1"], "--drm_sigma=1.0: must be in [0, 1)"),
    ("sample", ["--drm_sigma=1"], "--drm_sigma=1.0: must be in [0, 1)"),
    ("train_base", ["--lr=nan"], "--lr=nan: must be a finite number"),
    ("data.preferences", ["--temperature=0"], "--temperature=0.0: must be in (0, inf)"),
    ("data.preferences", ["--cfg_scales=1,nan"], "--cfg_scales=1.0,nan: must be a finite"),
    ("data.preferences", ["--step_counts=0,4"], "--step_counts=0,4: must be in [1, inf)"),
    ("data.preferences", ["--cfg_scales="], "--cfg_scales=: give one or more values, none twice"),
    ("data.preferences", ["--step_counts=4,4"], "--step_counts=4,4: give one or more values"),
    ("data.preferences", ["--seeds_per_setting=1", "--cfg_scales=1", "--step_counts=4"],
     "one image a prompt makes no pair"),
    ("bench.search", ["--lmbdas=nan"], "--lmbdas=nan: must be a finite number"),
    ("bench.search", ["--lmbdas=0"], "--lmbdas=0.0: must be in (0, inf)"),
    ("bench.search", ["--lmbdas="], "--lmbdas: give at least one lambda"),
    ("train_policy", ["--seed=18446744073709551616"], "--seed=18446744073709551616: must be in"),
    ("bench.dit_speed", ["--sizes=banana"], "--sizes=banana: 'banana' is not one of"),
    ("bench.grpo_credit", ["--max_nfe=0"], "--max_nfe=0: must be in [1, inf)"),
    ("bench.grpo_credit", ["--jobs=zero"], "--jobs=zero: expected a int"),
    ("bench.gpu_check", ["--k=1"], "--k=1: must be in [2, inf)"),
    ("bench.load_sd3", ["--preset=huge"], "--preset=huge: choose one of"),
])
def test_a_number_out_of_its_range_is_refused_before_any_work(name, flags, says, tmp_path):
    """The cases a hostile user tried (each ran silently wrong, or crashed, before the ranges):
    one line naming the flag, its range and what 0 means where it may; no output folder made."""
    place, file = {"sample": ("--out", "grid.png"), "bench.search": ("--out", "search"),
                   "bench.load_sd3": ("--dir", "run")}.get(name, ("--out_dir", "run"))
    where = [] if name == "bench.dit_speed" else [f"{place}={tmp_path / file}"]
    assert says in error_line(importlib.import_module(name), *flags, *where)
    assert not os.listdir(tmp_path)

@pytest.mark.parametrize("name, flags, says", [
    ("sample", ["--images=1000000000000"], "--images=1000000000000"),
    ("sample", ["--eval", "--per_prompt=100000000000"], "x 100000000000 held-out samples"),
    ("train_policy", ["--trajectories=100000000000"], "--trajectories=100000000000"),
    ("train_reward", ["--batch_size=100000000000"], "--batch_size=100000000000")])
def test_a_count_too_large_for_memory_is_refused_before_allocating(name, flags, says, tmp_path):
    """A count in range but beyond any machine's memory (each allocated its tensors and crashed,
    or was killed, before): one line naming the count and the memory it needs."""
    place, file = ("--out", "grid.png") if name == "sample" else ("--out_dir", "run")
    line = error_line(importlib.import_module(name), *flags, f"{place}={tmp_path / file}")
    assert "GiB at once" in line and says in line, line


# -----------------------------------------------------------------------------
# 1. Preference records


@pytest.mark.parametrize("field, value, says", [
    ("gold", "x", "gold 'x' is not two finite scores"),
    ("gold", [1], "gold [1] is not two finite scores"),
    ("gold", [float("nan"), 0], "gold [nan, 0] is not two finite scores"),
    ("path1", None, "path1 None is not a non-empty string"),
    ("prompt", 5, "prompt 5 is not a non-empty string"),
    ("prompt", " ", "prompt ' ' is not a non-empty string"),
    ("confidence", True, "confidence True is not a number in [0, 1]"),
    ("confidence", float("nan"), "confidence nan is not a number in [0, 1]"),
    ("choice_dist", [True, False], "choice_dist [True, False] is not two vote counts"),
])
def test_a_preference_record_of_the_wrong_types_is_named(field, value, says, tmp_path):
    tiny_preferences(tmp_path / "prefs")
    path = tmp_path / "prefs" / "test.jsonl"
    lines = path.read_text().splitlines()
    record = {**json.loads(lines[1]), field: value}
    path.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]))
    with pytest.raises(UserError, match=re.escape(f"{path} line 2: {says}")):
        read_pairs(str(path))

# -----------------------------------------------------------------------------
# 2. Checkpoint metadata


def changed(meta, config, **values):
    """meta with values set in its saved config (dit_config, text_config)."""
    meta[config].update(values)
    return meta


@pytest.mark.parametrize("change, says", [
    (lambda _: [1, 2], "its metadata 'meta' is [1, 2], expected a JSON object"),
    (lambda meta: changed(meta, "dit_config", dim="128"),
     "its DiTConfig field dim is '128', expected an int"),
    (lambda meta: changed(meta, "dit_config", depth=True),
     "its DiTConfig field depth is True, expected an int"),
    (lambda meta: changed(meta, "dit_config", qk_norm=1),
     "its DiTConfig field qk_norm is 1, expected true or false"),
    (lambda meta: changed(meta, "dit_config", mlp_ratio="4"),
     "its DiTConfig field mlp_ratio is '4', expected a finite number"),
    (lambda meta: changed(meta, "dit_config", dual_attention_layers=0),
     "its DiTConfig field dual_attention_layers is 0, expected a list"),
    (lambda meta: changed(meta, "text_config", heads=2.0),
     "its TextConfig field heads is 2.0, expected an int"),
], ids=["meta a list", "dim a string", "depth a bool", "qk_norm an int", "mlp_ratio a string",
        "dual_attention_layers a number", "heads a float"])
def test_checkpoint_settings_of_the_wrong_type_are_named(change, says, tmp_path):
    tensors, meta = read_checkpoint("data/base.safetensors")
    path = tmp_path / "base.safetensors"
    save_file(tensors, path, metadata={"meta": json.dumps(change(meta))})
    assert f"{path}: {says}" in toy_sample(tmp_path, f"--base={path}")

@pytest.mark.parametrize("heads", [1, 4])
def test_a_setting_no_shape_checks_edited_in_a_header_is_refused(heads, tmp_path):
    """The toy text encoder's heads (2) shape no tensor: edited to 1 or 4 in a checkpoint's header
    the file loaded and its images and DRM scores moved (by up to 0.23). The meta's SHA-256,
    written with it, no longer matches: refused naming the file."""
    from safetensors import safe_open
    with safe_open("data/base.safetensors", "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata["meta"])
    assert meta["text_config"]["heads"] == 2
    path = tmp_path / "base.safetensors"
    save_file(tensors, path, metadata={**metadata, "meta": json.dumps(changed(meta, "text_config",
                                                                              heads=heads))})
    says = "its metadata 'meta' was changed after the weights were written"
    assert f"{path}: {says}" in toy_sample(tmp_path, f"--base={path}")

# -----------------------------------------------------------------------------
# 3. Non-finite weights, refused as they are read


def lora_state(folder, fill):
    """Our-named LoRA adapters of rank 2 on the DiT of the pipeline folder, each B filled with
    `fill`."""
    dit = load_sd3(str(folder))
    add_lora(dit, rank=2)
    state = dit.state_dict()
    return {k: torch.full_like(v, fill) if k.endswith(".lora_B") else v for k, v in state.items()}


@pytest.mark.parametrize("kind", ["toy base", "DRM", "SD3 transformer", "LoRA"])
def test_non_finite_weights_are_refused_at_load(kind, pipeline, tmp_path):  # noqa: F811
    if kind in ("toy base", "DRM"):
        source = f"data/{'base' if kind == 'toy base' else 'drm'}.safetensors"
        tensors, meta = read_checkpoint(source)
        key = "dit.final_layer.linear.weight" if kind == "toy base" else "drm.head.down1.0.weight"
        path = tmp_path / "nan.safetensors"
        save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, path,
                  metadata={"meta": json.dumps(meta)})
        if kind == "toy base":  # today: black images, and exit 0
            line = toy_sample(tmp_path, f"--base={path}")
            assert f"{path}: tensor {key} holds NaN or inf values" in line
            return
        load = lambda: read_drm(str(path))  # noqa: E731
    elif kind == "SD3 transformer":
        tensors = load_file(pipeline / "transformer" / "diffusion_pytorch_model.safetensors")
        key = "transformer_blocks.1.ff.net.2.weight"
        path = tmp_path / "nan.safetensors"
        save_file({**tensors, key: torch.full_like(tensors[key], float("inf"))}, path)
        load = lambda: load_sd3(str(path))  # noqa: E731
    else:
        save_lora(lora_state(pipeline, float("nan")), str(tmp_path / "lora"))
        path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
        key = sorted(k for k in load_file(path) if "lora_B" in k)[0]
        dit = load_sd3(str(pipeline))
        load = lambda: fold_lora(dit, str(tmp_path / "lora"))  # noqa: E731
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: tensor {key} holds NaN or inf")):
        load()

# -----------------------------------------------------------------------------
# 4. Tokenizer files


@pytest.mark.parametrize("name, contents", [
    ("vocab.json", b"{not json"),
    ("vocab.json", b"[1, 2]"),
    ("vocab.json", '{"a": 1}'.encode("utf-16")),
    ("vocab.json", b'{"<|startoftext|>": "0", "<|endoftext|>": 1, "!": 2}'),
    ("merges.txt", "#version: 0.2\nt h\n".encode("utf-16")),
    ("merges.txt", b"#version: 0.2\nt h e\n"),
    ("special_tokens_map.json", b'{"pad_token": '),
    ("spiece.model", b"\x0b"),  # a protobuf field of wire type 3, which sentencepiece never writes
    ("tokenizer.json", b"[]"),
], ids=["vocab not JSON", "vocab a list", "vocab not UTF-8", "vocab ids not ints",
        "merges not UTF-8", "merges of three", "special tokens not JSON", "spiece not protobuf",
        "tokenizer.json a list"])
def test_a_broken_tokenizer_file_is_named(name, contents, tmp_path):
    folder = tmp_path / "tokenizer"
    if name in ("spiece.model", "tokenizer.json"):
        folder.mkdir()
    else:
        clip_tokenizer_files(str(folder), "!")
    (folder / name).write_bytes(contents)
    read = T5Tokenizer.from_file if name in ("spiece.model", "tokenizer.json") else (
        CLIPTokenizer.from_folder)
    with pytest.raises(UserError, match=re.escape(str(folder / name))):
        read(str(folder / name) if read is T5Tokenizer.from_file else str(folder))

# -----------------------------------------------------------------------------
# 5. A LoRA file that is not one


@pytest.mark.parametrize("case, says", [
    ("truncated", "is not a readable safetensors file"),
    ("a transformer", "holds no LoRA of a transformer (no key transformer.<layer>.lora_A.weight); "
                      "it looks like a whole SD3 transformer (diffusers' layout)"),
    ("our DRM", "it looks like a DRM of nanoDRM"),
    ("the DRM repository's", "it looks like the DRM repository's DRM"),
])
def test_a_lora_that_is_not_a_lora_is_named(case, says, pipeline, tmp_path):  # noqa: F811
    path = tmp_path / "lora.safetensors"
    transformer = pipeline / "transformer" / "diffusion_pytorch_model.safetensors"
    if case == "truncated":
        save_lora(lora_state(pipeline, 0.01), str(tmp_path / "lora"))
        whole = (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
        path.write_bytes(whole[:-64])
    elif case == "a transformer":
        path.write_bytes(transformer.read_bytes())
    elif case == "our DRM":
        path.write_bytes(open("data/drm.safetensors", "rb").read())
    else:
        save_file({"transformer." + k: v for k, v in load_file(transformer).items()}
                  | {"reward_output.proj.weight": torch.zeros(1, 4)}, path)
    line = toy_sample(tmp_path, "--model=sd3", f"--ckpt_dir={pipeline}", "--resolution=32",
                      f"--lora={path}")
    assert str(path) in line and says in line, line

# -----------------------------------------------------------------------------
# 6-7. Pipeline folders


@pytest.mark.parametrize("case, says", [
    ("no text_dir", "--text_dir={tmp}/nowhere does not exist: give the folder of the text "
                    "encoders"),
    ("no vae", "--ckpt_dir={tmp}/pipeline has no vae/ folder ({tmp}/pipeline/vae does not exist)"),
])
def test_a_missing_pipeline_folder_is_named(case, says, pipeline, tmp_path):  # noqa: F811
    folder = pipeline
    if case == "no vae":
        folder = tmp_path / "pipeline"
        folder.mkdir()
        for part in os.listdir(pipeline):
            if part != "vae":
                os.symlink(pipeline / part, folder / part)
    flags = [f"--text_dir={tmp_path / 'nowhere'}"] if case == "no text_dir" else []
    line = toy_sample(tmp_path, "--model=sd3", f"--ckpt_dir={folder}", "--resolution=32", *flags)
    assert says.format(tmp=tmp_path) in line, line

# -----------------------------------------------------------------------------
# 8. Preference images: 16-bit greyscale at its full depth, other depths refused

LEVELS = [0, 1000, 40000, 65535]


def read_with(reader, path):
    """The image at path as a reader of preference images gives it: the toy's (1, H, W), SD3's
    (3, H, W)."""
    if reader == "toy":
        base = ToyBase(*load_toy_base("data/base.safetensors"))
        return base.pair_tensors([{"path1": str(path), "path2": str(path)}], "")[0][0][0]
    return read_image(str(path), 32)


@pytest.mark.parametrize("reader", ["toy", "SD3"])
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grey_images_keep_their_depth(mode, reader, tmp_path):
    levels = np.resize(np.array(LEVELS, dtype=np.uint16), (32, 32))
    image = (Image.fromarray(levels) if mode == "I;16" else
             Image.frombytes("I;16B", (32, 32), levels.astype(">u2").tobytes()) if mode == "I;16B"
             else Image.fromarray(levels.astype(np.int32)))
    # PNG stores 16 bits as I;16 alone; TIFF keeps the others
    path = tmp_path / ("grey.png" if mode == "I;16" else "grey.tif")
    image.save(path)
    assert Image.open(path).mode == mode
    pixels = read_with(reader, path)
    expected = torch.from_numpy(levels / 65535 * 2 - 1).float()
    assert pixels.shape == (1 if reader == "toy" else 3, 32, 32)
    within(max_abs(pixels, expected.expand_as(pixels)), 1e-6, "pixels")


@pytest.mark.parametrize("reader", ["toy", "SD3"])
@pytest.mark.parametrize("array", [np.full((32, 32), 0.5, dtype=np.float32),
                                   np.full((32, 32), 70000, dtype=np.int32)],
                         ids=["floats", "past 16 bits"])
def test_images_of_a_depth_we_cannot_read_are_named(array, reader, tmp_path):
    path = tmp_path / "deep.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(UserError, match=re.escape(f"{path}: PIL mode {Image.open(path).mode!r} is "
                                                  "not one we read")):
        read_with(reader, path)


@pytest.mark.parametrize("reader", ["toy", "SD3"])
@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_an_image_with_transparent_pixels_is_refused_an_opaque_one_read(mode, reader, tmp_path):
    """A digit drawn in the alpha channel (grey 0 everywhere): read without alpha it was all black,
    and --eval_only reported 0.0% as a measurement. Transparent pixels are refused (no rule knows
    the background); a fully opaque alpha channel is dropped, the image read as without it."""
    digit = np.zeros((32, 32), dtype=np.uint8)
    digit[8:24, 14:18] = 255
    black = np.zeros((32, 32, len(mode) - 1), dtype=np.uint8)  # the colour channels
    for alpha, name in ((digit, "drawn_in_alpha.png"), (np.full_like(digit, 255), "opaque.png")):
        Image.fromarray(np.dstack([black, alpha]), mode=mode).save(tmp_path / name)
    with pytest.raises(UserError, match="has transparent pixels"):
        read_with(reader, tmp_path / "drawn_in_alpha.png")
    Image.fromarray(black[..., 0]).save(tmp_path / "plain.png")
    assert torch.equal(read_with(reader, tmp_path / "opaque.png"),
                       read_with(reader, tmp_path / "plain.png"))


def test_a_prompt_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """A UTF-8 BOM (Windows editors write one) is no part of the first prompt: the toy's words
    read as without it (it said "unknown word(s) ['\\ufeffa']"); SD3's prompts are read the same."""
    from common import read_prompts
    from data.toy import tokenize
    path = tmp_path / "prompts.txt"
    path.write_bytes("a thick 7 slanted right\na thin 1 upright\n".encode("utf-8-sig"))
    assert read_prompts(str(path), "--prompts=", check=tokenize) == ["a thick 7 slanted right",
                                                                     "a thin 1 upright"]
