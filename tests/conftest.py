import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


def random_small_dit(seed=0):
    """A 2-block DiT on 16x16 one-channel inputs with random (not zero-initialised) weights, in eval mode."""
    from model import DiTConfig, build_dit
    torch.manual_seed(seed)
    dit = build_dit(DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=64, depth=2, heads=2, context_dim=16,
                              pooled_dim=16, pos_embed_max_size=4, qk_norm=True))
    with torch.no_grad():  # non-zero adaLN and output layers, so the velocity depends on everything
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit.eval()


def random_prompts(batch, seed=1):
    """(context (B, 3, 16), pooled (B, 16)) for random_small_dit."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 16, generator=g), torch.randn(batch, 16, generator=g))


@pytest.fixture
def compiled():
    """set_compile(True) for one test, with fresh dynamo caches and counters, then back to eager."""
    from model import set_compile
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    set_compile(True)
    yield
    set_compile(False)
    torch._dynamo.reset()
