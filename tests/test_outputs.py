"""Outputs and bad input, as a user meets them: every output place is tried before any work, a full
disk ends in one line with the previous file intact, a preference folder is held like a run folder,
a diverged base is never saved, a resumed run logs the rows of an uninterrupted one, and a library's
check of bad input is a ValueError in code and one line at a script's edge.

Each runs a script's main in this process through run_main, as the command line does, on a small
DiT (SMALL) so that the file takes seconds.
"""
import errno
import functools
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import random_small_dit, tiny_preferences
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_faults import error_line, files

import bench.search
import checkpoints
import common
import data.preferences
import model
import sample
import train_base
import train_reward
from data.toy import ToyBase, save_toy_base
from data.world import TextConfig, TextEncoder
from grpo import Candidates, sample_rollout
from lora import add_lora
from reward import DRM
from rivals.credit import terminal_advantages
from sd3.mmdit import save_sd3
from sde import Sampler

# the toy's shapes (32x32 digits, the toy's text encoder) in a DiT a tenth of the tiny preset's
SMALL = model.DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=32, depth=4, heads=1,
                        context_dim=64, pooled_dim=64, pos_embed_max_size=8, qk_norm=True)
PREFERENCES = ["--cfg_scales=1", "--step_counts=1", "--seeds_per_setting=2",
               "--pairs_per_prompt=1", "--test_prompts=1"]


@pytest.fixture(autouse=True)
def one_thread():
    """These runs are small: on busy cores one thread runs them several times faster than two (no
    op waits for a second thread that is not scheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_base(tmp_path):
    """A toy base file of SMALL -> its path."""
    path = tmp_path / "small_base.safetensors"
    torch.manual_seed(0)
    save_toy_base(str(path), model.build_dit(SMALL), TextEncoder(TextConfig()), step=0)
    return path


def tiny_reward(tmp_path, small_base, *more):
    """train_reward.py's flags for steps of 8 pairs (tmp_path/prefs) on the small base."""
    if not (tmp_path / "prefs").exists():
        tiny_preferences(tmp_path / "prefs")
    return [f"--prefs={tmp_path / 'prefs'}", f"--base={small_base}", "--batch_size=8",
            "--eval_noise_draws=1", "--eval_sigmas=0,0.5", "--warmup=1", *more]


@pytest.fixture
def small_train_base(monkeypatch):
    """train_base.py on SMALL, its sample grids blank (they take seconds and are not tested here)
    -> its flags for a few steps of 4 images."""
    monkeypatch.setitem(model.PRESETS, "tiny", SMALL)
    monkeypatch.setattr(train_base, "generate",
                        lambda _dit, _base, prompts, **_: torch.zeros(len(prompts), 1, 32, 32))
    return ["--batch_size=4", "--eval_per_prompt=1", "--warmup=1"]


def run_script(module, args):
    return common.run_main(module.main, module.Config, args)


def work_began(*_args, **_kwargs):
    raise AssertionError("the script began its work before it tried its outputs")


def rows(path):
    return [json.loads(row) for row in path.read_text().splitlines()]

# -----------------------------------------------------------------------------
# 1. Every output place is tried before any work


UNWRITABLE = [
    ("sample", "--out=FILE/grid.png", "cannot be written (File exists"),
    ("sample", "--out=/proc/nanodrm/grid.png", "cannot be written"),
    ("sample", "--out=TMP/grid.psd", "PIL cannot write grey images as PSD"),
    ("sample", "--out=TMP/grid.xbm", "PIL cannot write grey images as XBM"),
    ("sample", "--out=READONLY/grid.png", "cannot be written (Permission denied"),
    ("train_reward", "--export=FILE/drm.safetensors", "cannot be written (File exists"),
    ("train_base", "--export=FILE/base.safetensors", "cannot be written (File exists"),
    ("train_base", "--export=/proc/nanodrm/base.safetensors", "cannot be written"),
    ("bench.search", "--out=FILE/search", "cannot be written (File exists"),
    ("data.preferences", "--out_dir=FILE/prefs", "cannot be written"),
]


@pytest.mark.parametrize("script, flag, says", UNWRITABLE,
                         ids=[f"{script} {flag}" for script, flag, _ in UNWRITABLE])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(script, flag, says, tmp_path,
                                                                      monkeypatch):
    if "READONLY" in flag:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "readonly").mkdir(mode=0o500)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    flag = (flag.replace("FILE", str(tmp_path / "file.txt"))
            .replace("READONLY", str(tmp_path / "readonly")).replace("TMP", str(tmp_path)))
    for module, loader in ((sample, "load_base"), (train_reward, "load_base"),
                           (train_base, "load_world"), (ToyBase, "load")):
        monkeypatch.setattr(module, loader, work_began)
    module = {"sample": sample, "train_reward": train_reward, "train_base": train_base,
              "bench.search": bench.search, "data.preferences": data.preferences}[script]
    run = [f"--out_dir={tmp_path / 'run'}"] if script in ("train_reward", "train_base") else []
    line = error_line(module, flag, *run)
    assert says in line and flag.partition("=")[2] in line, line
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("**/*.tmp-*"))

# -----------------------------------------------------------------------------
# 2. A full disk: one line naming the file, the previous one intact; any other OSError a traceback


def fail_at(call, error):
    """A save function that writes half a file at its call-th call into a file, then raises error
    (save.real: the function it stands for)."""
    calls = []

    def save(*args, **kwargs):
        target = next((a for a in args if isinstance(a, (str, io.BufferedWriter))), None)
        calls.append(target is not None)
        if target is None or sum(calls) < call:  # target None: into memory (check_writable's)
            return save.real(*args, **kwargs)
        if isinstance(target, str):
            with open(target, "wb") as f:
                f.write(b"half")
        else:
            target.write(b"half")
        raise error
    return save


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
FULL_DISK = {
    # safetensors' writer: its own error, the errno in its message
    "reward model": (checkpoints, "save_file", SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"), 2),
    "train state": (checkpoints.torch, "save", ENOSPC, 2),
    "sample grid": (Image.Image, "save", ENOSPC, 1),
    "preference image": (Image.Image, "save", ENOSPC, 3),
    "disk quota": (checkpoints, "save_file", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), 2),
    "an I/O error": (Image.Image, "save", OSError(errno.EIO, os.strerror(errno.EIO)), 1),
}


@pytest.mark.ex1_flow_matching  # each writes what the base samples or trains
@pytest.mark.parametrize("case", FULL_DISK)
def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_file(case, tmp_path, small_base,
                                                                  monkeypatch):
    owner, name, error, call = FULL_DISK[case]
    save = fail_at(call, error)
    save.real = getattr(owner, name)
    if case in ("reward model", "train state", "disk quota"):
        module, args = train_reward, tiny_reward(tmp_path, small_base, "--train_steps=2",
                                                 "--eval_every=1", f"--out_dir={tmp_path / 'run'}")
        written = tmp_path / "run" / ("train_state.pt" if case == "train state"
                                      else "model.safetensors")
    elif case == "preference image":
        module, args = data.preferences, [f"--base={small_base}", *PREFERENCES,
                                          f"--out_dir={tmp_path / 'prefs'}"]
        written = tmp_path / "prefs" / "images" / "00002.png"
    else:
        module, args = sample, [f"--base={small_base}", "--images=1", "--steps=1",
                                f"--out={tmp_path / 'grid.png'}"]
        written = tmp_path / "grid.png"
        written.write_bytes(b"the previous grid")
    monkeypatch.setattr(owner, name, save)
    if case == "an I/O error":  # a bug's, or the machine's: not the user's to put right
        with pytest.raises(OSError, match="Input/output error"):
            run_script(module, args)
    else:
        full = "the disk quota is used up" if case == "disk quota" else "the disk is full"
        assert f"error: {full} (writing {written}): free space" in error_line(module, *args)
    if module is train_reward:  # the file whose save failed holds step 1, whole
        saved = (checkpoints.load_training_state(str(written), "cpu") if written.suffix == ".pt"
                 else checkpoints.read_checkpoint(str(written))[1])
        assert saved["step"] == 1
    elif module is sample:
        assert written.read_bytes() == b"the previous grid"
    assert not list(tmp_path.glob("**/*.tmp-*"))

# -----------------------------------------------------------------------------
# 3. A preference folder is held like a run folder


@pytest.mark.parametrize("case", [  # the first samples the base's image pool
    pytest.param("used folder, then overwrite", marks=pytest.mark.ex1_flow_matching), "live run"])
def test_a_used_preference_folder_is_refused_unless_overwrite(case, tmp_path, small_base):
    out = tmp_path / "prefs"
    args = [f"--base={small_base}", *PREFERENCES, f"--out_dir={out}"]
    if case == "live run":
        out.mkdir()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                   "started": "earlier"}))
            assert (f"is in use by another run (pid {sleeper.pid}"
                    in error_line(data.preferences, *args))
        finally:
            sleeper.kill()
            sleeper.wait()
        assert os.listdir(out) == [".lock"]
        return
    run_script(data.preferences, args)
    first = {**files(out), **files(out / "images")}
    line = error_line(data.preferences, *args)
    assert "holds an earlier run (images, train.jsonl, test.jsonl, example_pool.png)" in line
    assert "start afresh there with --overwrite" in line and "--resume" not in line
    assert {**files(out), **files(out / "images")} == first
    (out / "images" / "99999.png").write_bytes(b"an image of an earlier, larger run")
    run_script(data.preferences, [*args, "--overwrite"])
    assert {**files(out), **files(out / "images")} == first  # the stale image is gone
    assert not (out / ".lock").exists()

def test_overwrite_leaves_a_data_set_no_run_wrote(tmp_path, small_base):
    """data.preferences --overwrite into a user's own data set (images/ and train.json, HPDv3's
    layout): refused, nothing removed (it removed images/, calling it an earlier run)."""
    out = tmp_path / "hpdv3"
    (out / "images").mkdir(parents=True)
    (out / "images" / "0.png").write_bytes(b"a user's image")
    (out / "train.json").write_text("[]")
    line = error_line(data.preferences, f"--base={small_base}", *PREFERENCES, f"--out_dir={out}",
                      "--overwrite")
    assert "which no run of ours wrote there" in line and "choose another --out_dir" in line
    assert (out / "images" / "0.png").read_bytes() == b"a user's image"


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_overwrite_never_removes_what_the_run_reads(tmp_path):
    """A second stage from the first stage's policy, in its folder: --base=OUT/model.safetensors
    --out_dir=OUT --overwrite is refused before anything is removed (it wiped the first stage,
    then failed: "checkpoint ... does not exist")."""
    import train_policy
    out = tmp_path / "stage"
    tiny = ["--trajectories=4", "--k=2", "--steps=2", "--eval_per_prompt=1", "--eval_steps=2",
            "--updates=1", "--eval_every=1", f"--out_dir={out}"]
    run_script(train_policy, tiny)
    before = files(out)
    line = error_line(train_policy, *tiny, f"--base={out / 'model.safetensors'}", "--overwrite")
    assert "--overwrite would remove" in line and "model.safetensors is read from it" in line
    assert files(out) == before

# -----------------------------------------------------------------------------
# 4. A diverged base is never saved; the advice works as written


@pytest.mark.ex1_flow_matching  # it trains the base
@pytest.mark.parametrize("case", ["after a good checkpoint", "a first run"])
def test_a_diverged_base_is_never_saved_and_the_advice_works(case, tmp_path, small_train_base):
    out = tmp_path / "run"
    tiny = [*small_train_base, "--eval_every=1", f"--out_dir={out}"]
    if case == "a first run":
        line = error_line(train_base, *tiny, "--train_steps=1", "--lr=1e30")
        assert "on a fixed batch is inf at step 1" in line, line
        assert "no checkpoint was saved" in line
        assert os.listdir(out) == []
        return
    run_script(train_base, [*tiny, "--train_steps=1"])
    good = files(out)
    # one update at 1e30 leaves finite weights (near 1e30) whose squared velocity is not
    line = error_line(train_base, *tiny, "--resume", "--train_steps=2", "--lr=1e30")
    assert "on a fixed batch is" in line and "the last good checkpoint (step 1)" in line, line
    assert files(out) == good
    run_script(train_base, [*tiny, "--resume", "--train_steps=2"])
    assert [row["step"] for row in rows(out / "metrics.jsonl")] == [1, 2]

# -----------------------------------------------------------------------------
# 5. A run stopped by SIGTERM and resumed logs the rows of an uninterrupted one


@pytest.mark.ex1_flow_matching  # both train on the flow-matching path
@pytest.mark.parametrize("script", ["train_base", "train_reward"])
def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(script, tmp_path, small_base,
                                                             monkeypatch, request):
    if script == "train_base":
        module, step_function = train_base, "flow_matching_loss"
        tiny = [*request.getfixturevalue("small_train_base"), "--train_steps=4", "--eval_every=4"]
    else:
        module, step_function = train_reward, "train_step"
        tiny = tiny_reward(tmp_path, small_base, "--train_steps=4", "--eval_every=4")
    run_script(module, [*tiny, f"--out_dir={tmp_path / 'straight'}"])
    real, calls = getattr(module, step_function), []

    def step_then_terminate(*args, **kwargs):  # SIGTERM from outside during the second step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, step_function, step_then_terminate)
    assert run_script(module, [*tiny, f"--out_dir={tmp_path / 'stopped'}"]) is None
    monkeypatch.setattr(module, step_function, real)
    run_script(module, [*tiny, f"--out_dir={tmp_path / 'stopped'}", "--resume"])
    straight, resumed = (load_file(tmp_path / run / "model.safetensors")
                         for run in ("straight", "stopped"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bitwise, on the CPU
    logged = {run: [{k: v for k, v in row.items() if k != "minutes"}
                    for row in rows(tmp_path / run / "metrics.jsonl")]
              for run in ("straight", "stopped")}
    assert [row["step"] for row in logged["straight"]] == [4]
    assert logged["stopped"] == logged["straight"]  # the loss averages steps 1-4, not 3-4

# -----------------------------------------------------------------------------
# 6. A library's check of bad input: a ValueError in code, one line at a script's edge


NOISE = torch.zeros(1, 1, 16, 16)  # an image of random_small_dit's (a 4x4 position grid)


def on_grid(dit):
    """The DiT on a 2-step grid, unconditioned."""
    return Sampler(dit, torch.linspace(1, 0, 3), None, None, 1.0)


# each check's call on bad input, given a random_small_dit (2 blocks)
LIBRARY = {
    "reward head": lambda dit: DRM(dit, 1, head="mlp"),
    "reward drop_last": lambda dit: DRM.from_dit(dit, drop_last=2),
    "sample k": lambda dit: sample.stepwise_sample(on_grid(dit), NOISE,
                                                   search=sample.Search(k=0)),
    "sample beam without a DRM": lambda dit: sample.stepwise_sample(on_grid(dit), NOISE,
                                                                    search=sample.Search(beam=2)),
    "grpo follow": lambda dit: sample_rollout(on_grid(dit), NOISE, candidates=Candidates(
        2, lambda x, sigma, rows: x.mean((1, 2, 3)), follow="worst")),
    "lora targets": lambda _dit: add_lora(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))),
    "sd3 layout": lambda dit: save_sd3(dit, "unused", layout="comfy"),
    "credit groups": lambda _dit: terminal_advantages(torch.zeros(5), 2),
    "model patches": lambda dit: dit.cropped_pos_embed(8, 8),
}


@pytest.mark.parametrize("case", [*LIBRARY, "train_reward.py --drop_last=9"])
def test_bad_input_to_the_library_is_a_value_error_and_one_line_at_a_scripts_edge(case, tmp_path,
                                                                                  small_base):
    if case.startswith("train_reward.py"):  # the flags pass; the DRM of a 4-block base refuses
        line = error_line(train_reward, *tiny_reward(tmp_path, small_base, "--drop_last=9",
                                                     f"--out_dir={tmp_path / 'run'}"))
        assert "drop_last=9: keep at least one of the DiT's 4 blocks" in line
        return
    call = functools.partial(LIBRARY[case], random_small_dit())
    with pytest.raises(ValueError) as raised:  # what a caller in code catches, as before
        call()
    assert isinstance(raised.value, common.InputError)

    @dataclass
    class Config:
        pass
    with pytest.raises(SystemExit) as stopped:
        common.run_main(lambda _cfg: call(), Config, [])
    assert stopped.value.code == f"error: {raised.value}" and "\n" not in stopped.value.code
