"""LoRA (Hu et al. 2021) on the DiT's attention: W x + (alpha / r) B A x, the base weights frozen,
B zero at start; folded back into the weights for export.

    add_lora(dit, rank=16, alpha=16.0)     # train_policy.py --lora_rank=16
    state = export_state_dict(dit)         # the plain DiT's tensors, the updates folded in
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; keeps the base keys weight, bias."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))  # B A = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x):
        update = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return F.linear(x, self.weight, self.bias) + update


LORA_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")


def add_lora(model, rank=8, alpha=8.0, targets=LORA_TARGETS):
    """Freeze every parameter of `model`, then wrap the linears whose names end with a target
    -> the LoRA modules (export_state_dict folds them into the weights)."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(tuple(targets)):
            parent_name, _, child = name.rpartition(".")
            lora = LoRALinear(module, rank, alpha)
            setattr(model.get_submodule(parent_name), child, lora)
            wrapped.append(lora)
    if not wrapped:
        raise InputError(f"add_lora: no nn.Linear matches the targets {targets}")
    return wrapped


def export_state_dict(dit):
    """Our-named tensors of a DiT with any LoRA folded in (the module itself is left as it is)."""
    state = {k: v for k, v in dit.state_dict().items() if ".lora_" not in k}
    for name, module in dit.named_modules():
        if isinstance(module, LoRALinear):
            delta = (module.lora_B @ module.lora_A) * module.scaling
            state[name + ".weight"] = state[name + ".weight"] + delta.to(module.weight.dtype)
    return state

