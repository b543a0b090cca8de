"""Public weights read a tensor at a time: a model built on the meta device is filled from the
files' tensors, so the peak memory is one copy of the weights (bench/load_sd3.py measures it)."""
import torch

from checkpoints import read_tensor


def assign_from_files(module, plan, convert=None, dtype=None, device=None):
    """Fill a meta-device module from plan {name: [TensorEntry, ...]} one tensor at a time
    (parts are concatenated on dim 0; convert(name, tensor) may rearrange), casting to dtype
    (default: as stored). Only one copy of the weights is ever held. Check keys first."""
    state = {}
    for name, parts in plan.items():
        tensor = torch.cat([read_tensor(p)
                            for p in parts]) if len(parts) > 1 else read_tensor(parts[0])
        if convert is not None:
            tensor = convert(name, tensor)
        state[name] = tensor.to(device=device or "cpu", dtype=dtype or tensor.dtype)
    module.load_state_dict(state, assign=True)
    return module.eval()

