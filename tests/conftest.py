import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from assignments.make_student_copy import EXERCISES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the scripts' default paths (data/base.safetensors, ...) are relative to the repository
os.chdir(ROOT)
# one thread a test process when pytest-xdist runs two (pytest.ini), else at most two; the scripts
# a test runs as processes inherit it (two test processes each running a two-thread script put
# four threads on two cores, and OpenMP's waiting threads spin: a test that kills and resumes a
# run took 21 s so, 6 s with one thread a script; the whole suite 8.0 min, 6.2 min: docs/testing.md)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    """A test marked with an exercise needs that exercise's code: `pytest -k ex3_sde_step` grades it
    (assignments/). A test marked `rounding` compares floating-point results computed two ways:
    tests/arithmetic.py runs those under other processors' arithmetic."""
    for name in EXERCISES:
        config.addinivalue_line("markers", f"{name}: needs the code of assignments/{name}.md")
    config.addinivalue_line("markers", "rounding: a floating-point tolerance; tests/arithmetic.py "
                                       "runs it under every arithmetic variant")


# the longest tests (pytest --durations), started first so that the two test processes finish
# together rather than one waiting on the other's last long test; but the student copy's run of
# the suite goes last: its compiled tests then find this run's graphs in Inductor's cache, and it
# runs on both cores (two processes of its own) as the rest ends
LAST = "test_student_copy_fails_exactly_the_graded_tests"
LONGEST = ("test_gpu_check_passes_on_the_cpu_toy_and_fails_loudly",
           "test_compiled_rollout_and_loss_agree_with_eager_and_compile_once",
           "test_compiled_dit_agrees_with_eager_in_forward_and_gradients",
           "test_the_search_bench_counts_every_method_at_its_budget")


def pytest_collection_modifyitems(items):
    """The longest tests first; mark `rounding` every test that compares with `within`, itself or
    through a helper of its module, so that none is left out of tests/arithmetic.py."""
    import inspect
    compiled = pytest.mark.xdist_group("compiled")  # the small DiTs' compiled tests: one process,
    for item in items:                                # in turn, so their shared graphs compile once
        if item.originalname.startswith("test_compiled_"):
            item.add_marker(compiled)
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: len(LONGEST) + 1 if item.originalname == LAST
               else rank.get(item.originalname, len(LONGEST)))  # the rest keep their order
    for item in items:
        module = inspect.getmodule(item.function)
        helpers = {name for name, f in inspect.getmembers(module, inspect.isfunction)
                   if f.__module__ == module.__name__ and "within(" in inspect.getsource(f)}
        source = inspect.getsource(item.function)
        if "within(" in source or any(f"{name}(" in source for name in helpers):
            item.add_marker(pytest.mark.rounding)

# -----------------------------------------------------------------------------
# Floating-point tolerances: each comparison's error recorded, so tests/arithmetic.py can report the
# worst rounding seen under every arithmetic variant, and tests/mutations.py the error of a bug


def max_abs(a, b):
    """The largest absolute difference of two tensors (or numbers), compared in float64."""
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def relative(a, b):
    """||a - b|| / ||b||, in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


def within(error, tolerance, what):
    """Assert error <= tolerance. With NANODRM_ROUNDING_LOG set, first append the error (before the
    assertion, so a broken code's error is recorded too) to that JSON-lines file, by test and
    `what`."""
    error = float(error)
    log = os.environ.get("NANODRM_ROUNDING_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "error": error,
                                "tolerance": tolerance}) + "\n")
    assert error <= tolerance, f"{what}: {error:.3g} above its tolerance {tolerance:.3g}"


def random_small_dit(seed=0):
    """A 2-block DiT on 16x16 one-channel inputs with random (not zero-initialised) weights, in eval
    mode."""
    from model import DiTConfig, build_dit
    torch.manual_seed(seed)
    dit = build_dit(DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=64, depth=2, heads=2,
                              context_dim=16, pooled_dim=16, pos_embed_max_size=4, qk_norm=True))
    with torch.no_grad():  # non-zero adaLN and output layers, so the velocity depends on everything
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit.eval()


def random_prompts(batch, seed=1):
    """(context (B, 3, 16), pooled (B, 16)) for random_small_dit."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 16, generator=g), torch.randn(batch, 16, generator=g))


def tiny_preferences(folder):
    """A preference folder of 8 random 32x32 images: 24 train and 8 test pairs, each with a gold
    field."""
    from data.world import TRAIN_PROMPTS
    rng = np.random.default_rng(0)
    os.makedirs(folder / "images")
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32),
                                     dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    for split, n in (("train", 24), ("test", 8)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for j in range(n):
                a, b = rng.choice(8, 2, replace=False)
                f.write(json.dumps({"prompt": TRAIN_PROMPTS[j % len(TRAIN_PROMPTS)],
                                    "path1": f"images/{a}.png",
                                    "path2": f"images/{b}.png", "gold": [0.1, -0.1]}) + "\n")


@pytest.fixture
def compiled():
    """Fresh dynamo caches and counters for a test that compiles (model.compile_regions), and again
    after it."""
    import model
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model._COMPILED.clear()
    yield
    torch._dynamo.reset()
    model._COMPILED.clear()
