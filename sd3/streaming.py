"""Public weights read a tensor at a time: a model built on the meta device is checked against the
files' headers, then filled from their tensors one by one, so the peak memory is one copy of the
weights (bench/load_sd3.py measures it). Every SD3 part (DiT, VAE, CLIP, T5) loads through here."""
import torch

from checkpoints import check_keys, read_safetensors_header, read_tensor


def read_headers(files):
    """-> {file key: TensorEntry} over the files (a sharded model's), reading headers only."""
    entries = {}
    for file in files:
        entries.update(read_safetensors_header(file)[0])
    return entries


def fill(module, plan, shapes, what, *, unexpected=(), convert=None, dtype=None, device=None):
    """Fill a meta-device module from plan {name: [TensorEntry, ...]}, whose tensors have `shapes`
    {name: shape} once converted. First every key and shape is checked (what: (path, description),
    for the error); then one tensor at a time is read (parts concatenated on dim 0; convert(name,
    tensor) may rearrange) and cast to dtype (default: as stored)."""
    check_keys({k: v.shape for k, v in module.state_dict().items()}, shapes, *what, unexpected)
    state = {}
    for name, parts in plan.items():
        tensor = torch.cat([read_tensor(p)
                            for p in parts]) if len(parts) > 1 else read_tensor(parts[0])
        if convert is not None:
            tensor = convert(name, tensor)
        state[name] = tensor.to(device=device or "cpu", dtype=dtype or tensor.dtype)
    module.load_state_dict(state, assign=True)
    return module.eval()
