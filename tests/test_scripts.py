"""The entry scripts as a user meets them: tiny runs, resume, and one clear line on bad input."""
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import tiny_preferences, within
from safetensors.torch import load_file, save_file

import train_base
from checkpoints import CheckpointError, read_checkpoint
from common import run_main, with_flags
from data.toy import load_toy_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_base_config(out_dir, **overrides):
    settings = dict(out_dir=str(out_dir), train_steps=4, batch_size=4, eval_every=2,
                    eval_per_prompt=1, warmup=2)
    return train_base.Config(**{**settings, **overrides})


@pytest.mark.ex1_flow_matching
def test_train_base_stopped_and_resumed_equals_one_uninterrupted_run(tmp_path, monkeypatch):
    train_base.main(tiny_base_config(tmp_path / "straight"))

    # stop the second run with a real SIGINT during its third step (step index 2)
    calls = []
    original_loss = train_base.flow_matching_loss
    def loss_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original_loss(*args, **kwargs)
    monkeypatch.setattr(train_base, "flow_matching_loss", loss_then_interrupt)
    assert train_base.main(tiny_base_config(tmp_path / "stopped")) is None
    monkeypatch.setattr(train_base, "flow_matching_loss", original_loss)
    assert torch.load(tmp_path / "stopped" / "train_state.pt", weights_only=False)["step"] == 3
    train_base.main(tiny_base_config(tmp_path / "stopped", resume=True))

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bitwise, on CPU
    assert (tmp_path / "straight" / "samples_000004.png").exists()
    # no half-written files
    assert not [f for f in os.listdir(tmp_path / "stopped") if ".tmp-" in f]


@pytest.mark.ex1_flow_matching
def test_export_writes_a_loadable_float16_copy(tmp_path):
    export = tmp_path / "shipped.safetensors"
    ema = train_base.main(tiny_base_config(tmp_path / "run", train_steps=2, export=str(export)))
    tensors, meta = read_checkpoint(str(export))
    assert meta["kind"] == "base" and tensors["dit.x_embedder.proj.weight"].dtype == torch.float16
    dit, _, _ = load_toy_base(str(export))
    # exactly the trained weights rounded to float16 (a property, not a tolerance: float16's own
    # rounding, up to 2.4e-4 here, is too near any tolerance a wrong tensor would exceed)
    assert torch.equal(dit.x_embedder.proj.weight, ema["dit"].x_embedder.proj.weight.half().float())
    assert dit.x_embedder.proj.weight.dtype == torch.float32


def test_checkpoint_with_a_missing_key_names_it(tmp_path):
    tensors, meta = read_checkpoint("data/base.safetensors")
    metadata = {"meta": json.dumps(meta)}
    del tensors["dit.final_layer.linear.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata=metadata)
    with pytest.raises(CheckpointError, match="missing 1 \\(final_layer.linear.weight\\)"):
        load_toy_base(str(broken))
    truncated = tmp_path / "truncated.safetensors"
    whole = open("data/base.safetensors", "rb").read()
    truncated.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CheckpointError,
                       match="truncated.safetensors is not a readable safetensors file "
                             ".*incomplete metadata"):
        load_toy_base(str(truncated))
    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_text("these are not weights")
    with pytest.raises(CheckpointError,
                       match="notes.safetensors is not a readable safetensors file"):
        load_toy_base(str(not_safetensors))


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, says", [
    (["sample.py", "--promt=a 7"], "unknown flag --promt"),
    (["sample.py", "--base=no/such/file.safetensors"], "no/such/file.safetensors does not exist"),
    (["sample.py", "--prompt=a purple 7"], "unknown word(s) ['purple']"),
    (["sample.py", "--steps=many"], "--steps=many: expected a int"),
    (["train_base.py", "--preset=huge"], "--preset=huge: choose one of"),
    (["train_base.py", "--resume", "--out_dir=no/such/run"], "train_state.pt does not exist"),
    (["train_policy.py", "--credit=dense"],
     "--credit=dense: choose one of stepwise, sparse, cosine"),
    (["train_policy.py", "--credit=sparse", "--trajectories=6", "--per_prompt=4"],
     "must be a multiple of --per_prompt=4"),
    (["train_policy.py", "--drm=data/base.safetensors"], "is not a drm checkpoint"),
    (["train_policy.py", "--follow=worst"], "--follow=worst: choose one of random, best"),
    (["train_policy.py", "--k=1"], "--k=1: must be in [2, inf)"),
    (["train_policy.py", "--noise_level=-0.5"],
     "--noise_level=-0.5: must be in (0, inf)"),
    (["sample.py", "--noise_level=-1", "--k=2"], "--noise_level=-1.0: must be in [0, inf)"),
    (["sample.py", "--search=beam"],
     "--search=beam: choose one of ode, sde, stepwise, best_of, smc, prune"),
    (["sample.py", "--search=smc", "--potential=sum"], "--potential=sum: choose one of diff, max"),
    (["sample.py", "--search=prune", "--keep=0"],
     "--keep=0.0: must be in (0, 1]"),
    (["sample.py", "--search=prune", "--prune_at=half"], "--prune_at=half: expected float values"),
    (["sample.py", "--eval", "--search=smc"], "--eval scores the ODE sampler"),
    (["sample.py", "--search=best_of", "--score=x0"],
     "--score is a flag of --search=stepwise|smc, which this run does not use"),
    (["sample.py", "--score=x0", "--k=3"], "--k is a flag of --search=stepwise, which this run"),
    (["sample.py", "--search=smc", "--score=lookahead"], "SMC scores its particles' x0"),
    (["sample.py", "--search=prune", "--score=lookahead"],
     "--score is a flag of --search=stepwise|smc"),
    (["train_reward.py", "--loss=hinge"], "--loss=hinge: choose one of bt, thurstone"),
    (["train_policy.py", "--drm_sigma=1"], "--drm_sigma=1.0: must be in [0, 1) (0: no re-noising)"),
    (["sample.py", "--drm_draws=0"], "--drm_draws=0: must be in [1, inf)"),
    (["train_reward.py", "--eval_sigmas=0,1.5"], "--eval_sigmas=0.0,1.5: must be in [0, 1]"),
    (["train_policy.py", "--rollout_batch=-1"],
     "--rollout_batch=-1: must be in [0, inf) (0: all at once)"),
    (["train_reward.py", "--head=mlp"],
     "--head=mlp: choose one of , conv, 2BConvGN, 7BConvGN, token"),
    (["train_reward.py", "--sigma_sampling=beta"],
     "--sigma_sampling=beta: choose one of grid, grid_uniform, logit_normal, uniform, zero"),
    (["train_policy.py", "--eval_prompts=no/such/prompts.txt"],
     "--eval_prompts=no/such/prompts.txt does not exist"),
    (["train_policy.py", "--credit=tree", "--split_steps=3,1"],
     "--split_steps=3,1: give increasing steps in [0, 9)"),
    (["train_policy.py", "--credit=tree", "--split_steps=0", "--sde_window=2:5"],
     "give increasing steps in [2, 5)"),
    (["train_policy.py", "--credit=tree", "--trajectories=12"],
     "--trajectories=12 must be a multiple of --branch^splits=16"),
    (["train_reward.py", "--steps=3"], "--steps is now --train_steps: --train_steps=3"),
    (["train_base.py", "--steps=3"], "--steps is now --train_steps: --train_steps=3"),
    (["sample.py", "--n=3"], "--n is now --images: --images=3"),
    (["train_policy.py", "--group_size=2"], "--group_size is now --per_prompt: --per_prompt=2"),
    (["train_policy.py", "--sde_window=random:9"],
     "--sde_window=random:9: n in [1, 5] for --steps=10"),
    (["train_policy.py", "--sde_window=slide:2:0"],
     "--sde_window=slide:2:0: n in [1, 8] for --steps=10, every >= 1"),
    (["train_policy.py", "--sde_window=slide:1:1", "--steps=2"],
     "--sde_window=slide:1:1: a slide window needs --steps >= 3"),
    (["train_policy.py", "--sde_window=slide:two"],
     "--sde_window=slide:two: give random:n or slide:n:every"),
    (["train_policy.py", "--credit=tree", "--sde_window=random:2"], "a tree splits at fixed steps"),
    (["train_policy.py", "--sde_window=9:10"],
     "--sde_window=9:10 trains no step: the last of --steps=10 is not trained"),
    (["train_policy.py", "--score=best"],
     "--score=best: choose one of noisy, x0, x0_proxy, lookahead"),
    (["train_policy.py", "--group_std=batch"], "--group_std=batch: choose one of group, global"),
    (["train_policy.py", "--split_noise=0"], "--split_noise=0.0: must be in (0, inf)"),
    (["train_policy.py", "--sde_window=5:2"],
     "--sde_window=5:2: give a:b, 0 <= a < b <= --steps=10"),
    (["train_policy.py", "--sde_window=two:five"],
     "--sde_window=two:five: give a:b, 0 <= a < b <= --steps=10"),
    (["train_policy.py", "--tree_norm=global"],
     "--tree_norm=global: choose one of depth, siblings"),
])
def test_bad_input_gives_one_clear_line(args, says, tmp_path):
    """In this process (a script's run_main, as its __main__ calls it): an exception other than
    the one-line exit would fail the test with its traceback."""
    if args[0].startswith("train_") and not any(a.startswith("--out_dir") for a in args):
        # not the default folder, which a README run may hold
        args = [*args, f"--out_dir={tmp_path / 'run'}"]
    script = importlib.import_module(args[0][:-3])
    with pytest.raises(SystemExit) as exit:
        run_main(script.main, script.Config, args[1:])
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code
    assert exit.value.code.startswith("error: ") and says in exit.value.code


@pytest.mark.parametrize("script", ["sample.py", "train_base.py", "train_reward.py",
                                    "train_policy.py"])
def test_a_bad_flag_ends_each_script_in_one_line_as_a_process(script, tmp_path):
    """The command line itself: exit status 1, one line, no traceback."""
    result = run_script(script, "--no_such_flag=1", f"--out_dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown flag --no_such_flag")


@pytest.mark.ex3_sde_step
def test_sample_cli_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = run_script("sample.py", "--prompt=a thick 7 slanted right", "--images=4", "--steps=4",
                        f"--out={out}")
    assert result.returncode == 0, result.stderr
    from PIL import Image
    assert Image.open(out).size == (4 * 34 * 2, 34 * 2)


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_train_policy_resumed_equals_one_uninterrupted_run(tmp_path):
    import train_policy
    tiny = dict(trajectories=4, k=2, steps=2, eval_every=1, eval_per_prompt=2, eval_steps=2)
    def config(**flags):
        return with_flags(train_policy.Config(), **tiny, **flags)
    train_policy.main(config(out_dir=str(tmp_path / "straight"), updates=2))
    train_policy.main(config(out_dir=str(tmp_path / "halves"), updates=1))
    train_policy.main(config(out_dir=str(tmp_path / "halves"), updates=2, resume=True))
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "halves" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    base = load_file("data/base.safetensors")
    assert not torch.equal(straight["dit.final_layer.linear.weight"],
                           base["dit.final_layer.linear.weight"].float())
    lines = [json.loads(line) for line in open(tmp_path / "halves" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert {"gold", "drm", "nfe", "drm_calls", "dit_equivalents", "time_s",
            "diversity"} <= lines[-1].keys()
    # per update: the rollout's 4 x 2 steps and the loss's 4 x 1 trained step (the last is not), x 2
    # (guidance)
    assert lines[-1]["nfe"] == 2 * (4 * 2 * 2 + 4 * 1 * 2)
    # per update: 4 trajectories x 1 trained step x k = 2
    assert lines[-1]["drm_calls"] == 2 * 4 * 1 * 2
    # per update: the loss's 4 x 1 trained step, guided, forward and backward
    assert lines[-1]["backward_passes"] == 2 * 4 * 1 * 2
    expected = (lines[-1]["nfe"] + lines[-1]["backward_cost"] * lines[-1]["backward_passes"]
                + lines[-1]["drm_cost"] * lines[-1]["drm_calls"])
    within(abs(lines[-1]["dit_equivalents"] - expected) / expected, 1e-12, "DiT-pass equivalents")


EVERY_TRAINING_EXERCISE = [pytest.mark.ex1_flow_matching, pytest.mark.ex2_drm,
                           pytest.mark.ex3_sde_step, pytest.mark.ex4_grpo]


@pytest.mark.ex1_flow_matching
@pytest.mark.ex2_drm
@pytest.mark.ex3_sde_step
@pytest.mark.ex4_grpo
def test_evaluation_guidance_is_its_own_flag(tmp_path):
    """The held-out samples follow --eval_cfg_scale alone: the rollouts' --cfg_scale does not move
    them. --also_eval_cfg_scale (NFT's and AWM's authors' guidance 1) evaluates the same policy
    again at its guidance, logged beside: the base's figures at each guidance in the first row."""
    import train_policy
    tiny = dict(updates=1, trajectories=4, k=2, steps=2, eval_every=1, eval_per_prompt=2,
                eval_steps=2)
    first = {}
    for name, cfg_scale, eval_cfg_scale, also in (("a", 4.0, 4.0, 0.0), ("b", 1.0, 4.0, 0.0),
                                                  ("c", 4.0, 1.0, 0.0), ("d", 4.0, 4.0, 1.0)):
        train_policy.main(with_flags(train_policy.Config(), out_dir=str(tmp_path / name),
                                     cfg_scale=cfg_scale, eval_cfg_scale=eval_cfg_scale,
                                     also_eval_cfg_scale=also, **tiny))
        first[name] = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
    assert first["a"]["gold"] == first["b"]["gold"] and first["a"]["drm"] == first["b"]["drm"]
    assert first["a"]["gold"] != first["c"]["gold"]
    assert first["d"]["gold"] == first["a"]["gold"] and "gold_cfg1" not in first["a"]
    assert first["d"]["gold_cfg1"] == first["c"]["gold"] and first["d"]["drm_cfg1"] == first["c"][
        "drm"]


@pytest.mark.parametrize("args, says", [
    pytest.param(["train_reward.py", "--lr=1e30", "--head_lr=1e30", "--train_steps=3",
                  "--batch_size=8", "--eval_every=5", "--warmup=1", "--prefs=PREFS"],
                 "error: the loss is", marks=pytest.mark.ex2_drm),
    pytest.param(["train_base.py", "--lr=1e30", "--train_steps=6", "--batch_size=4",
                  "--eval_every=3", "--eval_per_prompt=1", "--warmup=1"],
                 "error: the loss is", marks=pytest.mark.ex1_flow_matching),
    # the policy's loss is checked through its gradient: one check an AdamW step, not a piece
    pytest.param(["train_policy.py", "--lr=1e30", "--updates=3", "--trajectories=4", "--k=2",
                  "--steps=2", "--eval_per_prompt=2", "--eval_steps=2", "--eval_every=5"],
                 "error: the gradient norm is", marks=EVERY_TRAINING_EXERCISE),
])
def test_a_non_finite_loss_stops_the_run_and_saves_nothing_bad(args, says, tmp_path):
    tiny_preferences(tmp_path / "prefs")
    args = [a.replace("PREFS", str(tmp_path / "prefs")) for a in args]
    result = run_script(*args, f"--out_dir={tmp_path}")
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line.startswith(says) and "at step" in last_line
    assert not (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.tmp-*"))


def a_base_of_another_size(path):
    """A base checkpoint whose DiT makes 16x16 images (a 4x4 position grid), not the DRM's 32x32."""
    from data.toy import save_toy_base
    from data.world import TextConfig, TextEncoder
    from model import DiTConfig, build_dit
    dit = build_dit(DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=64, depth=2, heads=1,
                              context_dim=64, pooled_dim=64, pos_embed_max_size=4))
    save_toy_base(str(path), dit, TextEncoder(TextConfig()), step=0)


@pytest.mark.parametrize("case, says", [
    ("empty prompt file", "holds no prompt; write one prompt per line"),
    ("truncated checkpoint", "truncated.safetensors is not a readable safetensors file"),
    ("base of another size", "scores images of shape (1, 32, 32), the policy makes (1, 16, 16)"),
    pytest.param("damaged train state", "train_state.pt cannot be read",
                 marks=EVERY_TRAINING_EXERCISE),  # a run first
    pytest.param("train state of other settings",
                 "--resume would change what the experiment is: --lora_rank=4 (the run has "
                 "0)", marks=EVERY_TRAINING_EXERCISE),
])
def test_bad_files_end_in_one_line_and_leave_nothing_half_written(case, says, tmp_path):
    out = tmp_path / "run"
    tiny = ["--trajectories=4", "--k=2", "--steps=2", "--eval_every=1", "--eval_per_prompt=1",
            "--eval_steps=2", "--updates=2", f"--out_dir={out}"]
    if case == "empty prompt file":
        (tmp_path / "prompts.txt").write_text("\n  \n")
        args = [f"--prompts={tmp_path / 'prompts.txt'}"]
    elif case == "truncated checkpoint":
        whole = open("data/base.safetensors", "rb").read()
        (tmp_path / "truncated.safetensors").write_bytes(whole[:len(whole) // 3])
        args = [f"--base={tmp_path / 'truncated.safetensors'}"]
    elif case == "base of another size":
        a_base_of_another_size(tmp_path / "small.safetensors")
        args = [f"--base={tmp_path / 'small.safetensors'}"]
    else:  # a first update, then a resume that cannot use its state
        assert run_script("train_policy.py", *tiny, "--updates=1").returncode == 0
        if case == "damaged train state":
            state = (out / "train_state.pt").read_bytes()
            (out / "train_state.pt").write_bytes(state[:len(state) // 2])
            args = ["--resume"]
        else:
            args = ["--resume", "--lora_rank=4"]
    before = {f: (out / f).read_bytes() for f in os.listdir(out)} if out.exists() else {}
    result = run_script("train_policy.py", *tiny, *args)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line.startswith("error: ") and says in last_line, last_line
    after = {f: (out / f).read_bytes() for f in os.listdir(out)} if out.exists() else {}
    assert after == before  # nothing written, nothing half-written
