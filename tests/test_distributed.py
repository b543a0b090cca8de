"""Many processes and hard stops: torchrun with 2 gloo processes against one process, SIGTERM and resume.

The reference for a DDP run is the single-process run of the same global batch: every rank draws the
global batch's random numbers and keeps its rows, so the two differ by float rounding of the gradient
average only. Adam's first steps divide each gradient by its own magnitude, which turns rounding in a
near-zero gradient into an update of up to 2 lr for that one weight; so the tests compare the whole
update, final minus initial weights: the two runs' updates must agree to 0.1% of its norm (measured:
under 0.01%; a rank sampling the wrong rows gives about 100%), step-wise credit to 10% (STEPWISE_TOLERANCE).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_preferences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, processes=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    result = subprocess.run(launcher + list(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def flat(tensors, keys):
    return torch.cat([tensors[k].float().flatten() for k in keys])


def assert_same_training(single, ddp, start, tolerance=1e-3):
    """single, ddp: {name: tensor} after training; start: {name: tensor} before (the names compared)."""
    keys = sorted(start)
    single, ddp, start = flat(single, keys), flat(ddp, keys), flat(start, keys)
    moved = (single - start).norm()
    assert moved > 0
    assert (single - ddp).norm() < tolerance * moved  # the two runs took the same step, up to rounding


# SD3's grid ends with a step from sigma 0.001 to 0: its k candidates differ by noise of std ~1e-3, so their DRM
# scores differ by ~1e-4 and the rounding of a DRM pass over other rows (two ranks score half the batch each) is
# amplified by the normalisation within the k. Measured: 2.9% of the update at 2 steps (6e-5 before that grid);
# a rank sampling rank 0's rows gives 110%.
STEPWISE_TOLERANCE = 0.1


@pytest.mark.ex2_drm
def test_ddp_reward_step_equals_one_process(tmp_path):
    tiny_preferences(tmp_path / "prefs")
    args = [f"--prefs={tmp_path / 'prefs'}", "--steps=2", "--batch_size=8", "--eval_every=2", "--eval_noise_draws=1",
            "--head_dropout=0", "--warmup=1"]  # no dropout: its masks would depend on how the batch is split
    run("train_reward.py", *args, f"--out_dir={tmp_path / 'one'}")
    result = run("train_reward.py", *args, f"--out_dir={tmp_path / 'two'}", processes=2)
    assert "distributed: 2 processes (gloo)" in result.stdout
    single, ddp = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base = load_file("data/base.safetensors")
    start = {k: base["dit." + k[len("drm.backbone."):]] for k in single
             if k.startswith("drm.backbone.") and "dit." + k[len("drm.backbone."):] in base}
    assert_same_training(single, ddp, start)
    assert len(open(tmp_path / "two" / "metrics.jsonl").readlines()) == 1      # rank 0 alone writes


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
@pytest.mark.parametrize("credit, k, extra", [
    ("stepwise", 2, []),
    ("sparse", 4, []),                                                      # one group of 4 split over 2 ranks
    ("tree", 2, ["--split_steps=0", "--sde_window=0:1"]),                   # a tree of 2 leaves a rank, a window
    ("sparse", 4, ["--loss_batch=3", "--minibatches=1"])])                  # pieces of 3 pairs: 2 ranks, uneven
def test_ddp_policy_update_equals_one_process(tmp_path, credit, k, extra):
    args = ["--updates=1", "--trajectories=4", f"--k={k}", f"--group_size={k}", f"--credit={credit}", "--steps=2", "--eval_every=1",
            "--eval_per_prompt=1", "--eval_steps=2", *extra]
    run("train_policy.py", *args, f"--out_dir={tmp_path / 'one'}")
    run("train_policy.py", *args, f"--out_dir={tmp_path / 'two'}", processes=2)
    single, ddp = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base = load_file("data/base.safetensors")
    assert_same_training(single, ddp, {k: v for k, v in base.items() if k.startswith("dit.")},
                         STEPWISE_TOLERANCE if credit == "stepwise" else 1e-3)
    records = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1]
    assert records[-1]["gold"] == pytest.approx(json.loads(open(tmp_path / "one" / "metrics.jsonl").readlines()[-1])["gold"],
                                                abs=1e-4 if credit != "stepwise" else 1e-3)


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_loss_pieces_add_up_to_the_whole_minibatch(tmp_path):
    """--loss_batch runs a minibatch's pairs a few at a time, their gradients summed: the same update."""
    args = ["--updates=1", "--trajectories=4", "--group_size=4", "--credit=sparse", "--steps=2", "--eval_every=1",
            "--eval_per_prompt=1", "--eval_steps=2", "--minibatches=1"]
    run("train_policy.py", *args, f"--out_dir={tmp_path / 'whole'}")
    run("train_policy.py", *args, "--loss_batch=3", f"--out_dir={tmp_path / 'pieces'}")
    whole, pieces = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "pieces"))
    base = load_file("data/base.safetensors")
    assert_same_training(whole, pieces, {k: v for k, v in base.items() if k.startswith("dit.")}, 1e-4)


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_fsdp_lora_update_equals_one_process(tmp_path):
    """--fsdp shards the policy over the ranks; a LoRA update, folded into the exported weights, as one process's."""
    args = ["--updates=1", "--trajectories=4", "--k=2", "--steps=2", "--eval_every=1", "--eval_per_prompt=1",
            "--eval_steps=2", "--lora_rank=4"]
    run("train_policy.py", *args, f"--out_dir={tmp_path / 'one'}")
    run("train_policy.py", *args, "--fsdp", f"--out_dir={tmp_path / 'two'}", processes=2)
    single, sharded = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base = load_file("data/base.safetensors")
    assert_same_training(single, sharded, {k: v for k, v in base.items() if ".attn.qkv." in k or ".attn.proj." in k},
                         STEPWISE_TOLERANCE)
    state = torch.load(tmp_path / "two" / "train_state.pt", weights_only=False)  # whole tensors, resumable anywhere
    assert state["policy"]["joint_blocks.0.x_block.attn.qkv.lora_A"].shape == (4, 128)


@pytest.mark.ex1_flow_matching
def test_ddp_base_steps_equal_one_process(tmp_path):
    """train_base.py too: 3 steps on 2 processes end where one process ends (weights relative to their norm)."""
    args = ["train_base.py", "--steps=3", "--batch_size=8", "--eval_every=3", "--eval_per_prompt=1", "--warmup=1"]
    run(*args, f"--out_dir={tmp_path / 'one'}")
    run(*args, f"--out_dir={tmp_path / 'two'}", processes=2)
    single, ddp = (torch.load(tmp_path / name / "train_state.pt", weights_only=False)["net"] for name in ("one", "two"))
    keys = sorted(single)
    single, ddp = flat(single, keys), flat(ddp, keys)
    assert (single - ddp).norm() < 1e-6 * single.norm()  # measured 6e-9; rank 1 taking rank 0's rows: 3e-3


@pytest.mark.ex1_flow_matching
def test_sigterm_then_resume_equals_one_uninterrupted_run(tmp_path):
    """A real SIGTERM to a training process mid-run: it saves and leaves; --resume ends where a straight run ends."""
    args = ["train_base.py", "--steps=40", "--batch_size=4", "--eval_every=10", "--eval_per_prompt=1", "--warmup=2"]
    run(*args, f"--out_dir={tmp_path / 'straight'}")
    state = tmp_path / "stopped" / "train_state.pt"
    process = subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path / 'stopped'}"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not state.exists() and process.poll() is None:  # the first checkpoint (step 10) is written
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    stopped_at = torch.load(state, weights_only=False)["step"]
    assert 10 <= stopped_at < 40 and f"stopped: saved step {stopped_at}" in out
    run(*args, f"--out_dir={tmp_path / 'stopped'}", "--resume")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)            # bitwise, on CPU
    assert not list((tmp_path / "stopped").glob("*.tmp-*"))
