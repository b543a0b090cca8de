"""The benchmarks' analytic FLOP count against PyTorch's own FLOP counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.dit_speed import forward_flops
from model import DiTConfig, build_dit


@pytest.mark.parametrize("dual", [(), (0, 1)])
def test_forward_flops_match_pytorchs_counter(dual):
    config = DiTConfig(in_channels=4, out_channels=4, patch_size=2, dim=128, depth=3, heads=2, context_dim=32,
                       pooled_dim=24, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=dual)
    dit, batch, text_tokens = build_dit(config, device="meta"), 3, 5
    x = torch.randn(batch, 4, 16, 16, device="meta")
    with FlopCounterMode(display=False) as counter:
        dit(x, torch.rand(batch, device="meta"), torch.randn(batch, text_tokens, 32, device="meta"),
            torch.randn(batch, 24, device="meta"))
    assert forward_flops(config, batch, 64, text_tokens) == pytest.approx(counter.get_total_flops(), rel=1e-6)
