"""Faults a user meets: each ends in one line (or a clean stop), loses no finished work and
mislabels no run.

Most run a script's main in this process through run_main, as the command line does: an expected
fault ends in SystemExit with one 'error: ...' line; anything else would escape as its own
exception, with its traceback.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_preferences
from safetensors.torch import save_file

import sample
import train_base
import train_ops
import train_policy
import train_reward
import checkpoints
from checkpoints import read_checkpoint
from common import UserError, run_main

TRAINING = [pytest.mark.ex1_flow_matching, pytest.mark.ex2_drm, pytest.mark.ex3_sde_step,
            pytest.mark.ex4_grpo]
TINY_POLICY = ["--trajectories=4", "--k=2", "--steps=2", "--eval_per_prompt=1", "--eval_steps=2"]


def error_line(module, *args):
    """run_main(module.main) on these flags -> the one line it ends with (a failure if it ends any
    other way)."""
    with pytest.raises(SystemExit) as stopped:
        run_main(module.main, module.Config, list(args))
    message = stopped.value.code
    assert isinstance(message,
                      str) and message.startswith("error: ") and "\n" not in message, message
    return message


def files(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)
            if (folder / name).is_file()}

# -----------------------------------------------------------------------------
# 1. A diverged run saves nothing; its last good checkpoint stays; the advice works as written


@pytest.mark.parametrize("case",
                         [pytest.param("policy", marks=TRAINING),
                          pytest.param("reward", marks=pytest.mark.ex2_drm)])
def test_a_diverged_update_is_never_saved_and_the_advice_works(case, tmp_path, capsys):
    out = tmp_path / "run"
    if case == "policy":
        module, tiny = train_policy, [*TINY_POLICY, "--eval_every=1", "--minibatches=1",
                                      f"--out_dir={out}"]
        # a good first checkpoint
        run_main(module.main, module.Config, [*tiny, "--updates=1"])
    else:
        tiny_preferences(tmp_path / "prefs")
        module = train_reward
        tiny = [f"--prefs={tmp_path / 'prefs'}", "--batch_size=8", "--eval_every=1",
                "--eval_noise_draws=1", "--warmup=1", f"--out_dir={out}"]
        run_main(module.main, module.Config, [*tiny, "--train_steps=1"])
    good = files(out)
    # the learning rate of 1e30 writes weights near 1e30: the evaluation after that update is NaN
    diverging = ["--lr=1e30", "--updates=3"] if case == "policy" else ["--lr=1e30",
        "--head_lr=1e30", "--train_steps=3"]
    line = error_line(module, *tiny, "--resume", *diverging)
    assert "not finite" in line or "gave {" in line, line
    assert "the last good checkpoint (step 1)" in line and "--resume" in line, line
    after = files(out)
    for name in ("model.safetensors", "train_state.pt"):
        # the good one, untouched
        assert after[name] == good[name], name
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    # no NaN row was logged
    assert all(r["step"] <= 1 for r in rows)
    # as the message says: a lower --lr and --resume continue from the last good checkpoint
    capsys.readouterr()
    run_main(module.main, module.Config,
             [*tiny, "--resume", "--updates=2" if case == "policy" else "--train_steps=2"])
    # the default --lr is the run's: nothing changed
    assert "resume: --lr" not in capsys.readouterr().out
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2


@pytest.mark.parametrize("args", [pytest.param(["train_policy.py", *TINY_POLICY, "--lr=1e30",
                                                "--minibatches=1", "--updates=3", "--eval_every=5"],
                                               marks=TRAINING)])
def test_a_diverged_first_run_says_nothing_was_saved(args, tmp_path):
    result = subprocess.run([sys.executable, *args, f"--out_dir={tmp_path}"], capture_output=True,
                            text=True)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("no checkpoint was saved; start again with a lower --lr" in last_line
            and "--overwrite" in last_line)
    assert (not (tmp_path / "model.safetensors").exists()
            and not (tmp_path / "train_state.pt").exists())

# -----------------------------------------------------------------------------
# 2. One run per out_dir


def test_an_empty_lock_left_by_a_failed_start_does_not_hold_the_folder(tmp_path, monkeypatch):
    """A start that fails while writing its lock (a full disk) leaves none; an empty lock older
    than 10 s (left by an earlier version) is taken over, a fresh one (a start writing it now) is
    respected. Every run there was refused as "in use by another run (pid None on None)"."""
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"

    def full_disk(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", full_disk)  # the lock made, its contents not written
        with pytest.raises(UserError, match="No space left on device"):
            checkpoints.RunDir(str(out)).__enter__()
    assert not lock.exists()
    lock.write_text("")
    with pytest.raises(UserError, match="is in use by another run"):
        checkpoints.RunDir(str(out)).__enter__()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with checkpoints.RunDir(str(out)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.parametrize("module", [train_policy, train_reward, train_base],
                         ids=["policy", "reward", "base"])
def test_a_second_live_run_and_a_fresh_run_into_a_used_folder_are_refused(module, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                               "started": "earlier"}))
        line = error_line(module, f"--out_dir={out}")
        assert f"is in use by another run (pid {sleeper.pid}" in line
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / "train_state.pt").write_bytes(b"a finished run")
    # the lock's process is gone: the lock is stale, the folder is used
    line = error_line(module, f"--out_dir={out}")
    assert ("holds an earlier run (train_state.pt): continue it with --resume, start afresh there "
            "with --overwrite" in line)
    assert ((out / "train_state.pt").read_bytes() == b"a finished run"
            and not (out / ".lock").exists())


@pytest.mark.parametrize("module", [train_policy, train_reward, train_base],
                         ids=["policy", "reward", "base"])
def test_resume_into_an_empty_place_makes_no_folder(module, tmp_path):
    out = tmp_path / "never" / "run"
    assert "train_state.pt does not exist (no run has saved there)" in error_line(module,
        f"--out_dir={out}", "--resume")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("tiny",
                         [pytest.param([*TINY_POLICY, "--updates=1", "--eval_every=1"],
                                       marks=TRAINING)])
def test_overwrite_starts_afresh_and_leftovers_are_cleaned(tiny, tmp_path):
    out = tmp_path / "run"
    run_main(train_policy.main, train_policy.Config, [*tiny, f"--out_dir={out}"])
    first = files(out)
    # a write killed mid-way
    (out / "model.safetensors.tmp-killed").write_bytes(b"half a checkpoint")
    (out / "samples_00099.png").write_bytes(b"an old grid")
    run_main(train_policy.main, train_policy.Config, [*tiny, f"--out_dir={out}", "--overwrite"])
    again = files(out)
    assert not [name for name in again if ".tmp-" in name] and "samples_00099.png" not in again
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [0,
        1]  # not [0, 1, 0, 1]
    # the same run, done again
    assert again["model.safetensors"] == first["model.safetensors"]

# -----------------------------------------------------------------------------
# 3. A resume continues the experiment it was


@pytest.mark.parametrize("tiny",
                         [pytest.param([*TINY_POLICY, "--updates=1", "--eval_every=1"],
                                       marks=TRAINING)])
def test_resume_refuses_a_changed_experiment_and_applies_a_new_learning_rate(tiny, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    run_main(train_policy.main, train_policy.Config, [*tiny, f"--out_dir={out}"])
    line = error_line(train_policy, *tiny, f"--out_dir={out}", "--resume", "--credit=sparse",
                      "--k=4", "--updates=2")
    assert "--credit=sparse (the run has stepwise)" in line and "--k=4 (the run has 2)" in line
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [0,
                                                                                                 1]
    # a new learning rate applies: the resumed update differs from one at the saved rate, and it is
    # logged
    results = {}
    for lr in ("3e-05", "0.0003"):
        run = tmp_path / f"lr{lr}"
        run.mkdir()
        for name in ("train_state.pt", "metrics.jsonl"):
            (run / name).write_bytes((out / name).read_bytes())
        capsys.readouterr()
        run_main(train_policy.main, train_policy.Config,
                 [*tiny, f"--out_dir={run}", "--resume", "--updates=2", f"--lr={lr}"])
        printed = capsys.readouterr().out
        assert ("resume: --lr 3e-05 -> 0.0003" in printed) == (lr == "0.0003")
        results[lr] = torch.load(run / "train_state.pt", weights_only=False)
        assert results[lr]["optimizer"]["param_groups"][0]["lr"] == float(lr)
    moved = [(results["3e-05"]["policy"][k] - results["0.0003"]["policy"][k]).abs().max()
             for k in results["3e-05"]["policy"]]
    assert max(moved) > 0


@pytest.mark.ex2_drm
def test_reward_resume_refuses_another_init(tmp_path):
    tiny_preferences(tmp_path / "prefs")
    tiny = [f"--prefs={tmp_path / 'prefs'}", "--batch_size=8", "--eval_every=1",
            "--eval_noise_draws=1", "--warmup=1", "--train_steps=1",
            f"--out_dir={tmp_path / 'run'}"]
    run_main(train_reward.main, train_reward.Config, tiny)
    line = error_line(train_reward, *tiny, "--resume", "--init=scratch", "--train_steps=2")
    assert "--init=scratch (the run has pretrained)" in line


def test_a_saved_config_from_another_version_is_named(tmp_path):
    from common import check_resumed_config
    with pytest.raises(UserError, match="flags this version does not know \\(temperature\\)"):
        check_resumed_config({"temperature": 2.0}, train_policy.Config(), train_policy.MAY_CHANGE)
    # a flag added since: at its default, fine
    check_resumed_config({}, train_policy.Config(), train_policy.MAY_CHANGE)
    with pytest.raises(UserError, match="--uncond_grad=False \\(the run has True\\)"):
        check_resumed_config({}, train_policy.Config(uncond_grad=False), train_policy.MAY_CHANGE)

# -----------------------------------------------------------------------------
# 4-5. Bad numbers, devices, folders, files: one line each, before any work


BAD_SETTINGS = [
    (sample, ["--cfg_scale=nan"], "--cfg_scale=nan: must be a finite number"),
    (sample, ["--cfg_scale=inf"], "--cfg_scale=inf: must be a finite number"),
    (sample, ["--shift=0"], "--shift=0.0: must be in (0, inf)"),
    (sample, ["--shift=-2"], "--shift=-2.0: must be in (0, inf)"),
    (train_policy, ["--eval_cfg_scale=nan"], "--eval_cfg_scale=nan: must be a finite number"),
    (train_policy, ["--shift=0"], "--shift=0.0: must be in (0, inf)"),
    (train_base, ["--batch_size=0"], "--batch_size=0: must be in [1, inf)"),
    (sample, ["--device=cuda"], "--device=cuda: this machine has 0 CUDA GPU(s)"),
    (sample, ["--device=gpu"], "--device=gpu: not a device name; use auto, cpu, cuda or cuda:N"),
    (sample, ["--out=TMP"], "give an image file name, e.g. samples.png"),
    (sample, ["--out=TMP/samples"], "give an image file name, e.g. samples.png"),
    (train_policy, ["--out_dir=TMP/a_file"], "is a file; give a folder"),
    (train_policy, ["--out_dir=/proc/nanodrm"], "--out_dir=/proc/nanodrm cannot be written"),
]


@pytest.mark.parametrize("module, args, says", BAD_SETTINGS,
                         ids=[f"{m.__name__} {' '.join(a)}" for m, a, _ in BAD_SETTINGS])
def test_bad_settings_end_in_one_line_before_any_work(module, args, says, tmp_path):
    if args == ["--device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    if module is not sample and not any(a.startswith("--out_dir") for a in args):
        args.append(f"--out_dir={tmp_path / 'run'}")
    assert says in error_line(module, *args)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


@pytest.mark.parametrize("case", ["other size", "not an image", "a folder"])
def test_bad_preference_images_are_named(case, tmp_path):
    from PIL import Image
    tiny_preferences(tmp_path / "prefs")
    image = tmp_path / "prefs" / "images" / "3.png"
    if case == "other size":
        Image.new("L", (28, 28)).save(image)
        says = "3.png is 28x28 pixels, the others 32x32"
    elif case == "not an image":
        image.write_text("these are not pixels")
        says = "3.png: not an image PIL can read"
    else:
        image.unlink()
        image.mkdir()
        says = "3.png is a folder, not an image"
    test = (tmp_path / "prefs" / "test.jsonl").read_text()
    (tmp_path / "prefs" / "test.jsonl").write_text(test.replace('"images/', '"images/')
                                                   .replace("0.png", "3.png", 1))
    line = error_line(train_reward, f"--prefs={tmp_path / 'prefs'}", "--train_steps=1",
                      f"--out_dir={tmp_path / 'run'}")
    assert says in line


def test_preference_images_of_the_wrong_size_for_the_model_are_named(tmp_path):
    from PIL import Image
    tiny_preferences(tmp_path / "prefs")
    for i in range(8):
        Image.new("L", (28, 28)).save(tmp_path / "prefs" / "images" / f"{i}.png")
    line = error_line(train_reward, f"--prefs={tmp_path / 'prefs'}", "--train_steps=1",
                      f"--out_dir={tmp_path / 'run'}")
    assert "the preference images are 28x28 pixels, the model's 32x32" in line


@pytest.mark.parametrize("case, says", [
    ("prompts not UTF-8", "prompts.txt is not UTF-8 text"),
    ("damaged header", "is not a readable safetensors file (Error while deserializing header"),
    ("meta not JSON", "its metadata 'meta' (the config and step) is not JSON"),
    ("unknown config field", "its DiTConfig has fields this version does not know (rope)"),
])
def test_bad_files_are_named(case, says, tmp_path):
    tensors, meta = read_checkpoint("data/base.safetensors")
    path = tmp_path / "base.safetensors"
    if case == "prompts not UTF-8":
        (tmp_path / "prompts.txt").write_bytes("a thick 7 slanted right\n".encode("utf-16"))
        line = error_line(train_policy, f"--prompts={tmp_path / 'prompts.txt'}",
                          f"--out_dir={tmp_path / 'run'}")
        assert f"--prompts={tmp_path / 'prompts.txt'} is not UTF-8" in line
    else:
        if case == "unknown config field":
            meta["dit_config"]["rope"] = True
        save_file(tensors, path,
                  metadata={"meta": "{not json" if case == "meta not JSON" else json.dumps(meta)})
        if case == "damaged header":
            data = bytearray(path.read_bytes())
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            header["dit.pos_embed"]["dtype"] = "F33"
            text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
            data[8:8 + n] = text[:n] if len(text) <= n else pytest.fail("header grew")
            path.write_bytes(bytes(data))
        line = error_line(sample, f"--base={path}", "--images=1", "--steps=1",
                          f"--out={tmp_path / 'x.png'}")
    assert says in line and str(tmp_path) in line


@pytest.mark.parametrize("tiny",
                         [pytest.param([*TINY_POLICY, "--updates=2", "--eval_every=1"],
                                       marks=TRAINING)])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save_until_the_disk_fills(obj, file, *args, **kwargs):
        saves.append(file)
        if len(saves) == 2:
            # the second train state: half of it reaches the disk, then the disk is full
            file.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)
    monkeypatch.setattr(checkpoints.torch, "save", save_until_the_disk_fills)
    line = error_line(train_policy, *tiny, f"--out_dir={out}")
    assert f"the disk is full (writing {out / 'train_state.pt'}): free space" in line
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 1 and not [name for name in os.listdir(out) if ".tmp-" in name]


@pytest.mark.parametrize("tiny",
                         [pytest.param([*TINY_POLICY, "--updates=2", "--eval_every=1"],
                                       marks=TRAINING)])
def test_a_stop_during_the_first_evaluation_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    real = train_ops.evaluate_policy

    def evaluate_then_interrupt(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the held-out samples are drawn
        return real(*args, **kwargs)
    monkeypatch.setattr(train_ops, "evaluate_policy", evaluate_then_interrupt)
    assert run_main(train_policy.main, train_policy.Config,
                    [*tiny, f"--out_dir={tmp_path / 'run'}"]) is None
    assert "stopped: nothing saved" in capsys.readouterr().out
    assert os.listdir(tmp_path / "run") == []


# a run of train_policy.py killed (SIGKILL) at a chosen moment of update 2's evaluation, the
# moment reached by wrapping the function that does it; then resumed
KILLED = """
import os, signal, sys
import checkpoints, images, train_ops, train_policy
from common import run_main
moment = sys.argv[1]

def kill_after(function):
    def killed(*args, **kwargs):
        result = function(*args, **kwargs)
        if kwargs.get("update") == 2 or (args and args[-1] == 2):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return killed

if moment == "after the checkpoint":
    train_ops.save_run = kill_after(train_ops.save_run)
elif moment == "during the row":
    log = checkpoints.RunDir.log
    def half(self, record):
        if record["step"] == 2:
            with open(self.file("metrics.jsonl"), "a") as f:
                f.write('{"step": 2, "gold": ')
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        log(self, record)
    checkpoints.RunDir.log = half
else:  # during the grid: its temporary file written, not yet renamed
    write = images.atomic_write  # the grid's writer (images.py)
    def torn(path, how):
        if path.endswith("samples_00002.png"):
            how(path + ".tmp-torn")
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, how)
    images.atomic_write = torn
run_main(train_policy.main, train_policy.Config, sys.argv[2:])
"""


@pytest.mark.parametrize("where", [pytest.param("policy", marks=TRAINING),
                                   pytest.param("optimizer", marks=TRAINING)])
def test_a_train_state_holding_nan_is_refused_at_load(where, tmp_path):
    """A train state whose weights or AdamW moments hold NaN (a damaged or diverged save): --resume
    refuses it in one line naming the tensor (it loaded, then diverged at once, and the advice
    pointed back to it)."""
    out = tmp_path / "run"
    run_main(train_policy.main, train_policy.Config,
             [*TINY_POLICY, "--updates=1", "--eval_every=1", f"--out_dir={out}"])
    state = torch.load(out / "train_state.pt", weights_only=False)
    if where == "policy":
        next(iter(state["policy"].values()))[0] = float("nan")
    else:
        next(iter(state["optimizer"]["state"].values()))["exp_avg_sq"][0] = float("inf")
    torch.save(state, out / "train_state.pt")
    line = error_line(train_policy, *TINY_POLICY, "--updates=2", "--eval_every=1",
                      f"--out_dir={out}", "--resume")
    assert "holds NaN or inf" in line and (where in line) and "start afresh" in line, line


KILL_ARGS = [*TINY_POLICY, "--updates=2", "--eval_every=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The rows of one uninterrupted run of KILL_ARGS, shared by the kills below."""
    out = tmp_path_factory.mktemp("straight")
    straight = subprocess.run([sys.executable, "train_policy.py", *KILL_ARGS, f"--out_dir={out}",
                               "--overwrite"], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("moment", [pytest.param(m, marks=TRAINING) for m in (
    "after the checkpoint", "during the row", "during the grid")])
def test_a_kill_at_any_moment_loses_no_row_or_grid(moment, tmp_path, uninterrupted):
    """SIGKILL (the OOM killer, a node lost) after the last update's checkpoint, halfway through
    its metrics row, or halfway through its grid: --resume ends with every row and grid of an
    uninterrupted run, the rows' figures the same (killed between a checkpoint and its row, a
    resume ended with steps [0, 1, 3] and no samples_00002.png; after the last update's
    checkpoint, the final row was lost for good)."""
    args, out = KILL_ARGS, tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED, moment, *args, f"--out_dir={out}"],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "train_policy.py", *args, f"--out_dir={out}",
                              "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-2000:]
    keys = ("step", "gold", "drm", "nfe", "drm_calls")
    expected = [{k: r[k] for k in keys} for r in uninterrupted]
    assert [{k: r[k] for k in keys} for r in map(json.loads, open(out / "metrics.jsonl"))] == \
        expected
    assert sorted(p.name for p in out.glob("samples_*.png")) == [f"samples_{s:05d}.png"
                                                                 for s in range(3)]
    assert not list(out.glob("*.tmp-*"))


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
def test_sigterm_during_the_first_evaluation_is_a_clean_stop(tmp_path):
    """A real SIGTERM from outside while the first evaluation runs (40 samples of 10 steps: a few
    seconds)."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train_policy.py", *TINY_POLICY,
                                "--eval_per_prompt=4", "--eval_steps=10",
                                f"--out_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # the models are loaded; the first evaluation begins
        if line.startswith("policy:"):
            break
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped: nothing saved" in stdout and os.listdir(out) == []


# -----------------------------------------------------------------------------
# 6. Only expected errors become one line; a bug keeps its traceback


def test_a_bug_keeps_its_traceback():
    from dataclasses import dataclass

    @dataclass
    class Config:
        n: int = 1

    def buggy(cfg):
        a, b = [cfg.n]  # noqa: F841 (a fork's bug: a wrong unpacking)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        run_main(buggy, Config, [])
    with pytest.raises(SystemExit, match="error: flag --n=x: expected a int"):
        run_main(buggy, Config, ["--n=x"])

# -----------------------------------------------------------------------------
# 7. Leftovers of a killed run: metrics rows after its last checkpoint


@pytest.mark.parametrize("tiny", [pytest.param([*TINY_POLICY, "--eval_every=1"], marks=TRAINING)])
def test_resume_after_a_kill_logs_each_update_once(tiny, tmp_path):
    out = tmp_path / "run"
    run_main(train_policy.main, train_policy.Config, [*tiny, "--updates=1", f"--out_dir={out}"])
    # a run killed after logging update 2 and before saving it: its row is there, its checkpoint is
    # not
    with open(out / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"step": 2, "gold": -1.0}) + "\n")
    run_main(train_policy.main, train_policy.Config,
             [*tiny, "--updates=2", "--resume", f"--out_dir={out}"])
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["gold"] != -1.0


@pytest.mark.parametrize("replaced", [pytest.param("--prefs", marks=pytest.mark.ex2_drm),
                                      pytest.param("--prompts", marks=TRAINING)])
def test_resume_over_a_replaced_input_is_refused(replaced, tmp_path):
    """--resume compares what the inputs hold, not only their names: pairs regenerated under
    --prefs, or another prompt file at --prompts, are refused naming the flag (the run resumed on
    other data: its train reward went 1.6 -> 0.06 mid-run)."""
    out = tmp_path / "run"
    if replaced == "--prefs":
        tiny_preferences(tmp_path / "prefs")
        module, args = train_reward, [f"--prefs={tmp_path / 'prefs'}", "--batch_size=8",
                                      "--eval_every=1", "--eval_noise_draws=1", "--eval_sigmas=0",
                                      "--warmup=1", f"--out_dir={out}"]
        run_main(module.main, module.Config, [*args, "--train_steps=1"])
        lines = (tmp_path / "prefs" / "train.jsonl").read_text().splitlines()
        (tmp_path / "prefs" / "train.jsonl").write_text("\n".join(lines[::-1]) + "\n")
        more = "--train_steps=2"
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a thick 7 slanted right\na thin 1 upright\n")
        module, args = train_policy, [*TINY_POLICY, "--eval_every=1", f"--prompts={prompts}",
                                      f"--out_dir={out}"]
        run_main(module.main, module.Config, [*args, "--updates=1"])
        prompts.write_text("a thin 1 upright\na thick 3 slanted left\n")
        more = "--updates=2"
    line = error_line(module, *args, more, "--resume")
    assert f"--resume: {replaced}=" in line and "is not what the run was trained on" in line, line
