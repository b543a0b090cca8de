"""Checkpoints and run folders: safetensors files with their config and step, written atomically;
a run's --out_dir held by one run; resume checks; graceful stops; non-finite guards; image grids.

A checkpoint is written to a temporary file and renamed, so an interrupt never leaves half a file; a
run never saves a diverged model (non-finite values stop it first), its folder belongs to one run,
and a resume continues the experiment it was (flags that would change it are refused).
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common import UserError, any_rank, is_main_process

# -----------------------------------------------------------------------------
# A run never lost


class NonFiniteError(UserError):
    pass


def check_finite(value, step, what, advice):
    """Stop when a loss, gradient norm or evaluation is NaN / inf: nothing after the last checkpoint
    is saved.

    value: a tensor or a dict of numbers (an evaluation); advice: what to do next (RunDir.advice()).
    Under torchrun every rank stops when any rank sees it (a rank left waiting in an all-reduce
    would hang).
    """
    if isinstance(value, dict):
        bad = {k: v for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)}
        if any_rank(bad):
            raise NonFiniteError(f"the {what} at step {step} gave {bad}: the weights diverged and "
                                 f"were not saved; {advice}")
    elif any_rank(not torch.isfinite(value).all()):
        raise NonFiniteError(f"the {what} is "
                             f"{value.item() if value.numel() == 1 else 'not finite'} at step "
                             f"{step} (on this or another rank): nothing from it was saved; "
                             f"{advice}")


def check_weights(module, step, advice):
    """Before a save: every weight finite (an update that overflowed writes inf or NaN); else
    nothing is saved."""
    bad = [name for name, p in module.named_parameters()
           # FSDP: this rank's shard
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    if any_rank(bad):
        raise NonFiniteError(f"weights are not finite after step {step} "
                             f"({', '.join(bad[:3]) or 'on another rank'}): they were not saved; "
                             f"{advice}")


class RunDir:
    """The run's --out_dir, held by one process: `with RunDir(out_dir, resume, overwrite,
    outputs):`.

    Before any work it refuses a second live run (a lock file naming the other process), a fresh run
    into a folder a run has used (its `outputs` are there) unless overwrite, and a path that is a
    file or not writable. It removes the temporary files a killed atomic write left behind; with
    overwrite, the earlier run's outputs. Under torchrun rank 0 alone holds it (the other ranks
    write nothing).
    """
    LOCK = ".lock"

    def __init__(self, out_dir, resume=False, overwrite=False,
                 outputs=("metrics.jsonl", "train_state.pt")):
        self.path, self.resume, self.overwrite, self.outputs = out_dir, resume, overwrite, outputs
        self.main = is_main_process()
        # the step of the last checkpoint this process wrote (or resumed from)
        self.last_saved = None

    def __enter__(self):
        if not self.main:
            return self
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--out_dir={self.path} is a file; give a folder")
        if self.resume and not os.path.isdir(self.path):  # refused before any folder is made
            raise UserError(f"--resume: {os.path.join(self.path, 'train_state.pt')} does not exist "
                            "(no run has saved there)")
        try:
            os.makedirs(self.path, exist_ok=True)
            self._take_lock()
        except OSError as e:
            raise UserError(f"--out_dir={self.path} cannot be written ({e.strerror or e}); choose "
                            "another folder") from None
        try:
            self._check_fresh()
            for name in os.listdir(self.path):
                if ".tmp-" in name:
                    # atomic_write's leftovers: a write that was killed before its rename
                    os.remove(os.path.join(self.path, name))
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take_lock(self):
        lock = os.path.join(self.path, self.LOCK)
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(lock) as f:
                        other = json.load(f)
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == socket.gethostname() and not _alive(other.get("pid")):
                    os.remove(lock)  # its process is gone (killed): a stale lock
                    continue
                raise UserError(f"--out_dir={self.path} is in use by another run (pid "
                                f"{other.get('pid')} on {other.get('host')}, started "
                                f"{other.get('started')}); wait for it, or choose another "
                                f"--out_dir (if that run is gone, delete {lock})") from None
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            return
        raise UserError(f"cannot take the lock {lock}: another run is starting there")

    def _check_fresh(self):
        used = [name for name in self.outputs if os.path.exists(os.path.join(self.path, name))]
        if self.resume or not used:
            return
        if not self.overwrite:
            raise UserError(f"--out_dir={self.path} holds an earlier run ({', '.join(used)}): "
                            "continue it with --resume, start afresh there with --overwrite, or "
                            "choose another --out_dir")
        for name in os.listdir(self.path):
            if name in self.outputs or name.startswith("samples_"):
                path = os.path.join(self.path, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"--overwrite: removed the earlier run's files from {self.path}")

    def __exit__(self, *exc):
        lock = os.path.join(self.path, self.LOCK)
        if self.main and os.path.exists(lock):
            with contextlib.suppress(OSError, ValueError):
                with open(lock) as f:
                    if json.load(f).get("pid") == os.getpid():
                        os.remove(lock)
        return False

    def file(self, name):
        return os.path.join(self.path, name)

    def advice(self):
        """What a user does after a divergence: back to the last good checkpoint, or afresh."""
        if self.last_saved is not None:
            return (f"the last good checkpoint (step {self.last_saved}) is in {self.path}: "
                    "continue from it with a lower --lr (or --grad_clip) and --resume")
        return ("no checkpoint was saved; start again with a lower --lr (or --grad_clip) and "
                "--overwrite")

    def trim_metrics(self, step):
        """On resume: drop the metrics rows a killed run wrote after its last checkpoint (they are
        written again)."""
        path = self.file("metrics.jsonl")
        if not self.main or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            atomic_write(path, lambda tmp: open(tmp, "w").writelines(kept))
            print(f"resume: removed {len(lines) - len(kept)} metrics rows written after step "
                  f"{step}")


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_resumed_config(saved, cfg, may_change):
    """A resumed run continues the experiment it was: flags outside may_change that differ from the
    saved config are refused, naming them; changes to may_change (learning rate, length, evaluation
    cadence, memory knobs) apply
    -> {flag: (saved, now)}, printed. A field this version does not know is refused; one the saved
    run did not
    know yet must be at its default."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise CheckpointError("--resume: the saved run has flags this version does not know "
                              f"({', '.join(unknown)}): it was written by another version of "
                              "nanoDRM; resume it with that version")
    defaults = type(cfg)()
    changed, refused = {}, []
    for name in fields:
        before, now = saved.get(name, getattr(defaults, name)), getattr(cfg, name)
        if before == now or name in ("resume", "overwrite", "out_dir"):  # a run folder may move
            continue
        if name in may_change:
            changed[name] = (before, now)
        else:
            refused.append(f"--{name}={now} (the run has {before})")
    if refused:
        raise UserError(f"--resume would change what the experiment is: {'; '.join(refused)}. "
                        "Resume with the saved flags, or start a new run in another --out_dir (may "
                        f"change on resume: {', '.join('--' + n for n in sorted(may_change))})")
    for name, (before, now) in changed.items():
        if is_main_process():
            print(f"resume: --{name} {before} -> {now}")
    return changed


class GracefulStop:
    """Inside `with GracefulStop() as stop:`, Ctrl-C and SIGTERM only set `stop` (truthy) so the
    loop can finish its step, save and leave; a resumed run then continues exactly."""

    def __enter__(self):
        self.signals = []
        self.previous = {s: signal.signal(s, self._request)
                         for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request(self, signum, frame):
        if self.signals and signum == signal.SIGINT:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signals.append(signum)
        print("\nstop requested: saving after this step (Ctrl-C again: stop at once, unsaved)",
              file=sys.stderr)

    def __bool__(self):
        return bool(self.signals)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


# -----------------------------------------------------------------------------
# Checkpoints: safetensors with the config and step in the metadata


class CheckpointError(UserError):
    pass


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path (atomic on POSIX): a reader sees the old
    file or the new one, never half of one. A write that fails (a full disk) leaves the old file as
    it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            kept = "the previous file is intact" if os.path.exists(path) else "nothing was written"
            raise UserError(f"cannot write {path} ({e.strerror or e}); {kept}") from None
        raise


def save_checkpoint(path, modules, meta, dtype=None):
    """modules: {'dit': module, ...} -> one safetensors file with keys 'dit.<param>'; meta:
    JSON-able dict.

    dtype=torch.float16 halves the file for shipping; loading casts back to the module's float32.
    """
    def stored(v):  # dtype for floating-point tensors only (integer buffers keep theirs)
        kept = dtype if dtype and v.is_floating_point() else v.dtype
        return v.detach().to(kept).contiguous().cpu()
    tensors = {f"{prefix}.{k}": stored(v)
               for prefix, module in modules.items() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(meta)}))


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, known from the header alone: enough to read it later."""
    path: str
    name: str
    dtype: str   # safetensors' name: F32, BF16, ...
    shape: tuple


def read_safetensors_header(path):
    """-> ({name: TensorEntry}, metadata dict), reading only the file's header (safetensors' own
    reader checks it: a truncated or damaged file is an error here, before any tensor is read)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} "
                              f"{'is a folder' if os.path.isdir(path) else 'does not exist'}")
    try:
        with safe_open(path, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            entries = {name: TensorEntry(path, name, s.get_dtype(), tuple(s.get_shape())) for name,
                       s in slices.items()}
            return entries, f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); the file is "
                              "damaged, truncated or of another format") from None


def read_tensor(entry):
    """The tensor an entry names. safetensors maps the file (copy-on-write) and does not copy it:
    measured on an SD3.5-medium file, our earlier reader (each tensor's bytes read into fresh
    memory) peaked at 1.04x the file in the process's own memory, this at 0.03x, the rest being page
    cache the system can reclaim (bench/load_sd3.py)."""
    with safe_open(entry.path, framework="pt") as f:
        return f.get_tensor(entry.name)


def read_checkpoint(path, kind=None, how_to_make=""):
    """-> (tensors dict, meta dict) of a file written by save_checkpoint, whose meta says `kind`
    (when given). Clear errors for a missing, broken or other kind of file."""
    entries, metadata = read_safetensors_header(path)
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its metadata 'meta' (the config and step) is not JSON; the "
                              "file is damaged") from None
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (kind={meta.get('kind')!r}); "
                              f"{how_to_make}")
    return {name: read_tensor(entry) for name, entry in entries.items()}, meta


def config_from_meta(config_class, values, path):
    """A config dataclass from a checkpoint's saved dict (JSON lists back to tuples); a field this
    version does not know is a clear error."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: its saved {config_class.__name__} is {values!r}, not a "
                              "dict of settings")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: its {config_class.__name__} has fields this version does "
                              f"not know ({', '.join(unknown)}): it was written by another version "
                              "of nanoDRM")
    tuples = {name for name,
              f in fields.items() if f.default_factory is tuple or isinstance(f.default, tuple)}
    return config_class(**{k: tuple(v) if k in tuples else v for k, v in values.items()})


def check_keys(expected, found, path, what, also_unexpected=()):
    """expected, found: {name: shape}. Raise one CheckpointError naming the file and the first few
    missing, unexpected and misshapen keys (with how many of each), or return quietly."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted([*also_unexpected, *(set(found) - set(expected))])
    misshapen = sorted(k for k in set(found) & set(expected)
                       if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or misshapen:
        def few(keys):
            return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        raise CheckpointError(f"{path} does not fit {what}: missing {few(missing)}, unexpected "
                              f"{few(unexpected)}, wrong shape {few(misshapen)}")


def load_module(module, tensors, prefix, path):
    """Load tensors['<prefix>.*'] into module strictly; the error names missing, unexpected and
    misshapen keys."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    check_keys({k: v.shape for k, v in module.state_dict().items()},
               {k: v.shape for k, v in state.items()}, path, f"the '{prefix}' model")
    module.load_state_dict(state)
    return module


def load_training_state(path, device):
    """The dict save_training_state wrote, for --resume; a clear error when there is none."""
    if not os.path.exists(path):
        raise UserError(f"--resume: {path} does not exist (no run has saved there)")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, overwritten, not a torch file: whatever torch.load trips on
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"--resume: {path} cannot be read ({type(e).__name__}: {reason}); "
                              "the file is damaged: resume from a copy of it or start afresh with "
                              "--overwrite") from None
    if not isinstance(state, dict) or not {"step", "config"} <= set(state):
        raise CheckpointError(f"--resume: {path} is not a train state of nanoDRM (no step and "
                              "config in it)")
    return state


def check_state_fits(path, name, module, saved, trained_only=False):
    """A train state of a run with other settings (preset, LoRA, depth cut) gets a plain error, not
    a traceback. trained_only: the state holds the module's trainable tensors alone (a LoRA run's
    adapters)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    if trained_only:
        trainable = {k for k, p in module.named_parameters() if p.requires_grad}
        expected = {k: v for k, v in expected.items() if k in trainable}
    check_keys(expected, {k: v.shape for k, v in saved.items()},
               path, f"this run's {name}; resume with the flags it was written with (saved in it "
                     "under 'config') or use a new --out_dir")


def resume_training_state(path, device, config, may_change, **stateful):
    """Load path (train_state.pt), check the run's flags against it (check_resumed_config), restore
    each named module / optimizer from state[name] and torch's RNG; -> the state."""
    state = load_training_state(path, device)
    check_resumed_config(state["config"], config, may_change)
    for name, obj in stateful.items():
        if isinstance(obj, torch.nn.Module):
            check_state_fits(path, name, obj, state[name])
        obj.load_state_dict(state[name])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {path} at step {state['step']}")
    return state


def save_training_state(path, state):
    """Optimizer, EMA, RNG and step for --resume, via torch.save, written atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# -----------------------------------------------------------------------------
# Images


def save_grid(images, path, nrow):
    """images (N, C, H, W) in [-1, 1], C = 1 or 3 -> one PNG, nrow images a row; small images
    upscaled 2x for viewing."""
    n, c, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + 2), nrow * (w + 2)), -1.0)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = r * (h + 2) + 1, col * (w + 2) + 1
        grid[:, top:top + h, left:left + w] = img
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).squeeze(2)
    image = Image.fromarray(pixels.numpy())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    (image.resize((image.width * 2, image.height * 2), Image.NEAREST) if h < 256
     else image).save(path)

