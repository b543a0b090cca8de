"""Public SD3 plumbing outside the reading path: the MMDiT's key maps, Stability's and diffusers'
layouts.

    from sd3.mmdit import load_sd3, save_sd3
    dit = load_sd3("sd3.5_medium.safetensors") # or a diffusers pipeline / transformer folder ->
    model.DiT
    save_sd3(dit, "out/transformer") # diffusers layout (LoRA folded in); layout="stability": one
    file

The config is read from the tensor shapes, so there is nothing to set.
"""
import dataclasses
import json
import math
import os
import re

import torch
from safetensors.torch import save_file

from checkpoints import CheckpointError, atomic_write, read_safetensors_header, read_tensor
from common import InputError
from lora import export_state_dict
from model import DiTConfig, build_dit
from sd3.streaming import fill, read_headers

# -----------------------------------------------------------------------------
# Public SD3 / SD3.5 weights. Our module names are Stability's keys, so their
# layout loads as is (after the single-file prefix). diffusers renames and
# splits tensors; the table below maps each of our tensors to theirs:
# - qkv is one (3D, D) linear here and three (D, D) linears (to_q, to_k, to_v) there;
# - a modulation with two chunks (the final layer, the last block's pre-only
#   context stream) is (shift, scale) here and (scale, shift) there.

STABILITY_PREFIX = "model.diffusion_model."
DIFFUSERS_NAMES = [  # (our name, diffusers name(s)); {i} is a block index; .weight / .bias follow
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", "transformer_blocks.{i}.norm1.linear"),
    ("joint_blocks.{i}.x_block.attn.qkv",
     ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                           "transformer_blocks.{i}.attn.to_v")),
    ("joint_blocks.{i}.x_block.attn.ln_q", "transformer_blocks.{i}.attn.norm_q"),
    ("joint_blocks.{i}.x_block.attn.ln_k", "transformer_blocks.{i}.attn.norm_k"),
    ("joint_blocks.{i}.x_block.attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("joint_blocks.{i}.x_block.attn2.qkv",
     ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                                            "transformer_blocks.{i}.attn2.to_v")),
    ("joint_blocks.{i}.x_block.attn2.ln_q", "transformer_blocks.{i}.attn2.norm_q"),
    ("joint_blocks.{i}.x_block.attn2.ln_k", "transformer_blocks.{i}.attn2.norm_k"),
    ("joint_blocks.{i}.x_block.attn2.proj", "transformer_blocks.{i}.attn2.to_out.0"),
    ("joint_blocks.{i}.x_block.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("joint_blocks.{i}.x_block.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1",
     "transformer_blocks.{i}.norm1_context.linear"),
    ("joint_blocks.{i}.context_block.attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                                 "transformer_blocks.{i}.attn.add_k_proj",
                                                 "transformer_blocks.{i}.attn.add_v_proj")),
    ("joint_blocks.{i}.context_block.attn.ln_q", "transformer_blocks.{i}.attn.norm_added_q"),
    ("joint_blocks.{i}.context_block.attn.ln_k", "transformer_blocks.{i}.attn.norm_added_k"),
    ("joint_blocks.{i}.context_block.attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
    ("joint_blocks.{i}.context_block.mlp.fc1", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("joint_blocks.{i}.context_block.mlp.fc2", "transformer_blocks.{i}.ff_context.net.2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
]


def _diffusers_names(ours):
    """Our tensor name -> the tuple of diffusers names it is stored as (three for a qkv)."""
    block = re.match(r"joint_blocks\.(\d+)\.", ours)
    for our_base, their_base in DIFFUSERS_NAMES:
        stem = our_base.replace("{i}", block.group(1)) if block else our_base
        if ours == stem or ours.startswith(stem + ".") and ours.count(".") == stem.count(".") + 1:
            suffix = ours[len(stem):]
            bases = their_base if isinstance(their_base, tuple) else (their_base,)
            return tuple(b.replace("{i}", block.group(1)) + suffix if block else b + suffix
                         for b in bases)
    raise KeyError(ours)  # only reached for a tensor our own DiT does not have


def _swaps_halves(name, shape, dim):
    """The two-chunk modulations, stored (shift, scale) by Stability and (scale, shift) by
    diffusers."""
    return "adaLN_modulation" in name and shape[0] == 2 * dim


def _swap_halves(tensor):
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _find_weight_files(path):
    """A .safetensors file, a sharded index, a diffusers transformer folder or a pipeline folder ->
    files."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
        single = os.path.join(path, "diffusion_pytorch_model.safetensors")
        if os.path.exists(index):
            path = index
        elif os.path.exists(single):
            return [single]
        else:
            raise CheckpointError(f"{path} holds no "
                                  "diffusion_pytorch_model.safetensors(.index.json); point at a "
                                  ".safetensors file, a diffusers transformer/ folder or a "
                                  "pipeline folder")
    if path.endswith(".json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(path), shard) for shard in shards]
    return [path]


def _plan_from_files(path):
    """-> ({our name: [TensorEntry, ...]}, layout, unexpected file keys), reading headers only."""
    return _plan_from_entries(read_headers(_find_weight_files(path)))


def _plan_from_entries(entries):
    """{file key: TensorEntry} of one transformer, in either layout -> _plan_from_files' triple."""
    if any(k.startswith("transformer_blocks.") for k in entries):
        by_their_name = {}
        for ours_template, theirs in DIFFUSERS_NAMES:
            for their_template in (theirs if isinstance(theirs, tuple) else (theirs,)):
                by_their_name[their_template] = ours_template
        plan, unexpected = {}, []
        for name in entries:
            block = re.match(r"transformer_blocks\.(\d+)\.", name)
            base, _, suffix = name.rpartition(".") if name != "pos_embed.pos_embed" else (name, "",
                                                                                          "")
            template = base.replace(f"transformer_blocks.{block.group(1)}.",
                                    "transformer_blocks.{i}.") if block else base
            if template not in by_their_name:
                unexpected.append(name)
                continue
            ours = by_their_name[template].replace("{i}",
                                                   block.group(1) if block
                                                   else "") + ("." + suffix if suffix else "")
            plan.setdefault(ours, {})[name] = entries[name]
        # order the parts of a split qkv as to_q, to_k, to_v
        plan = {ours: [parts[n] for n in _diffusers_names(ours) if n in parts] for ours,
                parts in plan.items()}
        return plan, "diffusers", unexpected
    if any(k.startswith(STABILITY_PREFIX) for k in entries):
        # single file: ignore the VAE and text encoders
        entries = {k[len(STABILITY_PREFIX):]: v for k,
                   v in entries.items() if k.startswith(STABILITY_PREFIX)}
    return {k: [v] for k, v in entries.items()}, "stability", []


def _shape(parts):
    return (sum(p.shape[0] for p in parts),
            *parts[0].shape[1:]) if parts[0].shape else parts[0].shape


def dit_config_from_shapes(shapes, path="checkpoint"):
    """Infer a DiTConfig from {our tensor name: shape}. Head dim is read from the qk norm, else 64
    (every SD3)."""
    needed = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight",
              "y_embedder.mlp.0.weight",
              "final_layer.linear.weight", "joint_blocks.0.x_block.mlp.fc1.weight"]
    if any(k not in shapes for k in needed):
        raise CheckpointError(f"{path} is not an SD3 transformer: it lacks "
                              f"{[k for k in needed if k not in shapes]} (found {len(shapes)} "
                              "tensors)")
    dim, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks."))
    ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q[0] if ln_q else 64
    return DiTConfig(
        in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0] // patch ** 2,
        patch_size=patch, dim=dim, depth=depth, heads=dim // head_dim,
        context_dim=shapes["context_embedder.weight"][1],
        pooled_dim=shapes["y_embedder.mlp.0.weight"][1],
        pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]), qk_norm=ln_q is not None,
        dual_attention_layers=tuple(i for i in range(depth)
                                    if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / dim)


def load_sd3(path, dtype=None, device=None):
    """An SD3 / SD3.5 transformer from Stability's layout (single file, with or without the
    `model.diffusion_model.` prefix) or diffusers' (file, folder, sharded folder) -> DiT in eval
    mode.

    The config comes from the header's shapes. The model is built on the meta device and each
    tensor is read, converted, cast to `dtype` (default: as stored) and assigned one at a time,
    so the peak memory is one copy of the model.
    """
    return _dit_from_plan(*_plan_from_files(path), path, dtype, device)


def _dit_from_plan(plan, layout, unexpected, path, dtype=None, device=None, keep_blocks=None):
    """A DiT from a plan of its files' tensors, every kept key and shape checked before any is read
    (streaming.fill); keep_blocks: only the first so many joint blocks built, checked and read (a
    DRM's)."""
    shapes = {k: _shape(v) for k, v in plan.items()}
    config = dit_config_from_shapes(shapes, path)
    dit = build_dit(config, device="meta")
    if keep_blocks is not None:  # the blocks past keep_blocks are neither checked nor read
        dit.joint_blocks = dit.joint_blocks[:keep_blocks]
        plan = {k: v for k, v in plan.items()
                if not (k.startswith("joint_blocks.") and int(k.split(".")[1]) >= keep_blocks)}

    def convert(name, tensor):
        return _swap_halves(tensor) if layout == "diffusers" and _swaps_halves(name, tensor.shape,
            config.dim) else tensor
    what = f"an SD3 transformer ({layout} layout) with the config its shapes give, {config}"
    return fill(dit, plan, {k: shapes[k] for k in plan}, (path, what), unexpected=unexpected,
                convert=convert, dtype=dtype, device=device)


def save_sd3(dit, path, layout="diffusers"):
    """Write a DiT for other tools: layout 'diffusers' -> a transformer folder (config.json +
    diffusion_pytorch_model.safetensors) that SD3Transformer2DModel.from_pretrained reads;
    'stability' -> one .safetensors with the `model.diffusion_model.` prefix, as ComfyUI and
    Stability's reference code read."""
    state = export_state_dict(dit)
    config = dit.config
    if layout == "stability":
        tensors = {STABILITY_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
        return
    if layout != "diffusers":
        raise InputError(f"save_sd3: layout={layout!r}; choose 'diffusers' or 'stability'")
    if config.mlp_ratio != 4.0:
        raise InputError("diffusers' SD3Transformer2DModel has mlp_ratio 4, this model "
                         f"{config.mlp_ratio}")
    tensors = diffusers_tensors(state, config.dim)
    diffusers_config = {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": config.patch_size,
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.dim // config.heads, "num_attention_heads": config.heads,
        "joint_attention_dim": config.context_dim, "caption_projection_dim": config.dim,
        "pooled_projection_dim": config.pooled_dim, "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": "rms_norm" if config.qk_norm else None}
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "diffusion_pytorch_model.safetensors"),
                 lambda tmp: save_file(tensors, tmp))
    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(diffusers_config, f, indent=2)
    atomic_write(os.path.join(path, "config.json"), write_config)

def diffusers_tensors(state, dim):
    """Our state dict (one DiT's, or part of it) -> the same tensors under diffusers' names (qkv
    split in three, the two-chunk modulations as (scale, shift))."""
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if _swaps_halves(name, tensor.shape, dim):
            tensor = _swap_halves(tensor)
        their_names = _diffusers_names(name)
        for their_name, part in zip(their_names, tensor.chunk(len(their_names))):
            tensors[their_name] = part.contiguous()
    return tensors

# -----------------------------------------------------------------------------
# The DRM repository's checkpoint (jjaxonx/DRM, drm/train.py's save_model_weights): one
# model.safetensors holding its DRMRewardModel's state dict, `transformer.<diffusers SD3 keys>` (the
# whole transformer, the skipped blocks included) and `reward_output.<its head>` (reward.ConvHead's
# names), no metadata.

OFFICIAL_DROP_LAST = {24: 3, 38: 5}  # its drm/utils.py HEAD_LAYER_MISSING: 2BConvGN, 7BConvGN


def is_official_drm(entries):
    return any(k.startswith("reward_output.")
               for k in entries) and any(k.startswith("transformer.") for k in entries)


def read_official_drm(path, entries, dtype=None, drop_last=None):
    """The DRM repository's file -> (its DiT, cut after depth - drop_last blocks, its head's tensors
    {name: tensor}, meta); drop_last from its table by depth unless given (reward.read_drm builds
    the DRM)."""
    transformer = {k[len("transformer."):]: v for k,
                   v in entries.items() if k.startswith("transformer.")}
    plan, layout, unexpected = _plan_from_entries(transformer)
    depth = dit_config_from_shapes({k: _shape(v) for k, v in plan.items()}, path).depth
    drop_last = drop_last or OFFICIAL_DROP_LAST.get(depth)
    if drop_last is None:
        raise CheckpointError(f"{path}: a DRM repository file of a {depth}-block transformer; its "
                              "table knows 24 (drop 3) and 38 (drop 5): say how many blocks it cut "
                              "with drop_last")
    dit = _dit_from_plan(plan, layout, unexpected, path, dtype, keep_blocks=depth - drop_last)
    head = {k[len("reward_output."):]: read_tensor(v) for k,
            v in entries.items() if k.startswith("reward_output.")}
    meta = {"kind": "drm", "layout": "official", "drop_last": drop_last, "model": "sd3",
            "text_config": None,
            "head": {3: "2BConvGN", 5: "7BConvGN"}.get(drop_last, "2BConvGN"), "t5_tokens": 512,
            "dit_config": dataclasses.asdict(dit.config)}
    return dit, head, meta


def official_drm_tensors(drm, skipped_blocks):
    """Our DRM -> the DRM repository's state dict (its DRMRewardModel loads it with strict=True):
    the backbone and `skipped_blocks` ({'joint_blocks.<i>.<...>': tensor}, the base DiT's blocks the
    DRM cut) under `transformer.`, the head under `reward_output.`."""
    if drm.head_type not in ("2BConvGN", "7BConvGN"):
        raise InputError("the DRM repository's model has the 2BConvGN / 7BConvGN head; this DRM's "
                         f"is {drm.head_type}")
    state = {**export_state_dict(drm.backbone), **skipped_blocks}
    tensors = {"transformer." + k: v for k,
               v in diffusers_tensors(state, drm.backbone.config.dim).items()}
    tensors.update({"reward_output." + k: v.detach().cpu().contiguous() for k,
                    v in drm.head.state_dict().items()})
    return tensors

# -----------------------------------------------------------------------------
# LoRA in diffusers' format: what StableDiffusion3Pipeline.load_lora_weights reads

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(state, path, scaling=1.0):
    """A policy's LoRA adapters (its state dict's `<linear>.lora_A` (r, in) and `.lora_B` (out, r),
    our names) -> path/pytorch_lora_weights.safetensors with keys `transformer.<diffusers module>.
    lora_A.weight` / `.lora_B.weight`. A fused qkv adapter B A splits exactly into q, k and v
    adapters that share A, B's three row blocks; the scaling alpha / r is folded into B (diffusers
    takes alpha = r, scale 1, when the file names none)."""
    tensors = {}
    for key in sorted(k for k in state if k.endswith(".lora_A")):
        linear = key[:-len(".lora_A")]
        their_names = _diffusers_names(linear + ".weight")
        for their_name, b in zip(their_names,
                                 (state[linear + ".lora_B"] * scaling).chunk(len(their_names))):
            stem = "transformer." + their_name[:-len(".weight")]
            # one copy each
            tensors[stem + ".lora_A.weight"] = state[key].detach().float().cpu().clone()
            tensors[stem + ".lora_B.weight"] = b.detach().float().cpu().contiguous()
    if not tensors:
        raise InputError("save_lora: the state holds no LoRA adapter")
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, LORA_FILE), lambda tmp: save_file(tensors, tmp))


# key prefixes and what a file with such keys holds: named when a file is given for another thing
HOLDERS = (("transformer_blocks.", "a whole SD3 transformer (diffusers' layout)"),
           ("joint_blocks.", "a whole SD3 transformer (Stability's layout)"),
           (STABILITY_PREFIX, "a Stability single-file SD3 checkpoint"),
           ("drm.", "a DRM of nanoDRM (train_reward.py's)"),
           ("dit.", "a toy base of nanoDRM (train_base.py's)"))


def what_it_holds(entries):
    """What a safetensors file's keys {name: TensorEntry} say it holds."""
    if is_official_drm(entries):
        return "the DRM repository's DRM (model.safetensors)"
    return next((what for prefix, what in HOLDERS if any(k.startswith(prefix) for k in entries)),
                f"{len(entries)} tensors such as {sorted(entries)[:3]}")


def read_lora(path):
    """--lora's folder (with pytorch_lora_weights.safetensors) or file -> its adapters {diffusers
    module + '.lora_A.weight' / '.lora_B.weight': tensor}; a file that holds none (a whole
    transformer, a DRM) is refused, saying what it looks like it holds."""
    file = os.path.join(path, LORA_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise CheckpointError(f"--lora={path}: no {LORA_FILE} there (train_policy.py --lora_rank "
                              "writes out_dir/lora)")
    entries = read_safetensors_header(file)[0]
    adapters = {k[len("transformer."):]: v for k, v in entries.items()
                if k.startswith("transformer.")}
    if not any(k.endswith(".lora_A.weight") for k in adapters):
        raise CheckpointError(f"--lora={path}: {file} holds no LoRA of a transformer (no key "
                              "transformer.<layer>.lora_A.weight); it looks like "
                              f"{what_it_holds(entries)}")
    return {k: read_tensor(v) for k, v in adapters.items()}


def lora_update(tensors, stems, path):
    """The update B A of the stems' adapters (q, k and v concatenated for a fused qkv), taken out
    of tensors."""
    updates = []
    for stem in stems:
        b, a = tensors.pop(stem + ".lora_B.weight"), tensors.pop(stem + ".lora_A.weight")
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"--lora={path}: {stem}'s lora_B {tuple(b.shape)} and lora_A "
                                  f"{tuple(a.shape)} are not a rank-r pair: the file is damaged")
        updates.append(b @ a)
    return torch.cat(updates)


def fold_lora(dit, path):
    """Add a diffusers-format LoRA (a folder with pytorch_lora_weights.safetensors, or the file) to
    the DiT's weights, in place: each target's B A. -> dit."""
    tensors = read_lora(path)
    params = dict(dit.named_parameters())
    with torch.no_grad():
        for name in params:
            stems = [n[:-len(".weight")]
                     for n in _diffusers_names(name)] if name.endswith(".weight") else []
            if stems and all(s + f".lora_{ab}.weight" in tensors for s in stems for ab in "AB"):
                delta = lora_update(tensors, stems, path)
                if delta.shape != params[name].shape:
                    raise CheckpointError(f"--lora={path}: its update of {name} is "
                                          f"{tuple(delta.shape)}, the DiT's weight "
                                          f"{tuple(params[name].shape)}: a LoRA of another model")
                params[name] += delta.to(params[name])
    if tensors:
        raise CheckpointError(f"--lora={path}: {len(tensors)} tensors match no layer of this DiT, "
                              f"e.g. {sorted(tensors)[:3]}: a LoRA of another model")
    return dit
