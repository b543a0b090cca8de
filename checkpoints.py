"""Checkpoints and run folders: safetensors files with their config and step, written atomically;
a run's --out_dir held by one run; resume; graceful stops (the flags' resume check and the
non-finite guards are common.py's).

A checkpoint is written to a temporary file and renamed, so an interrupt never leaves half a file; a
run never saves a diverged model (non-finite values stop it first), its folder belongs to one run,
and a resume continues the experiment it was (flags that would change it are refused).
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
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

from common import UserError, check_resumed_config, is_main_process

# -----------------------------------------------------------------------------
# A run never lost


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
    MARK = ".run"  # left by a run that wrote outputs: they are a run's, --overwrite may remove them

    def __init__(self, out_dir, resume=False, overwrite=False,
                 outputs=("metrics.jsonl", "train_state.pt"), resumable=True, inputs=None):
        self.path, self.resume, self.overwrite, self.outputs = out_dir, resume, overwrite, outputs
        self.inputs = inputs or {}  # {flag: path} of the files the run reads
        self.resumable = resumable  # whether the script has --resume (its advice names it)
        self.main = is_main_process()
        # the step of the last checkpoint this process wrote (or resumed from)
        self.last_saved = None

    def __enter__(self):
        # what each input holds now: a resume over a replaced file is refused (check_inputs)
        self.fingerprints = {flag: fingerprint(path) for flag, path in self.inputs.items() if path}
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
        self.started = True  # from here on what the outputs hold is this run's
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
                if _stale(lock, other):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(lock)
                    continue
                raise UserError(f"--out_dir={self.path} is in use by another run (pid "
                                f"{other.get('pid')} on {other.get('host')}, started "
                                f"{other.get('started')}); wait for it, or choose another "
                                f"--out_dir (if that run is gone, delete {lock})") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(mine)
            except OSError:
                os.remove(lock)  # a full disk: leave no empty lock behind
                raise
            return
        raise UserError(f"cannot take the lock {lock}: another run is starting there")

    def _check_fresh(self):
        used = [name for name in self.outputs if os.path.exists(os.path.join(self.path, name))]
        if self.resume or not used:
            return
        if not self.overwrite:
            resume = "continue it with --resume, " if self.resumable else ""
            raise UserError(f"--out_dir={self.path} holds an earlier run ({', '.join(used)}): "
                            f"{resume}start afresh there with --overwrite, or choose another "
                            "--out_dir")
        ours = (os.path.exists(self.file(self.MARK))
                or {"metrics.jsonl", "train_state.pt"} & set(used))
        if not ours:  # e.g. a user's data set: images/ and train.json
            raise UserError(f"--out_dir={self.path} holds {', '.join(used)}, which no run of ours "
                            "wrote there (its folder has no .run mark): --overwrite removes only "
                            "what a run wrote; choose another --out_dir")
        removed = [os.path.join(self.path, name) for name in os.listdir(self.path)
                   if name in self.outputs or name.startswith("samples_")]
        for flag, given in self.inputs.items():  # before anything is removed
            read = os.path.realpath(given) if given else None
            hit = [p for p in removed if read and (read == os.path.realpath(p) or read.startswith(
                os.path.realpath(p) + os.sep))]
            if hit:
                raise UserError(f"--overwrite would remove {hit[0]}, and {flag}{given} is read "
                                "from it: copy it out of --out_dir first, or choose another "
                                "--out_dir")
        for path in removed:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"--overwrite: removed the earlier run's files from {self.path}")

    def __exit__(self, *exc):
        wrote = getattr(self, "started", False) and any(
            os.path.exists(self.file(name)) for name in self.outputs)
        if wrote and not os.path.exists(self.file(self.MARK)):
            with contextlib.suppress(OSError):
                write_text(self.file(self.MARK), json.dumps({"outputs": list(self.outputs)}))
        lock = os.path.join(self.path, self.LOCK)
        if self.main and os.path.exists(lock):
            with contextlib.suppress(OSError, ValueError):
                with open(lock) as f:
                    if json.load(f).get("pid") == os.getpid():
                        os.remove(lock)
        return False

    def file(self, name):
        return os.path.join(self.path, name)

    def check_inputs(self, saved):
        """On resume: every input the run was saved with holds what it held then (saved: the
        train state's "inputs", the fingerprints; older states have none)."""
        for flag, before in (saved or {}).items():
            now = self.fingerprints.get(flag)
            if now != before:
                path = self.inputs.get(flag) or "(none given now)"
                raise UserError(f"--resume: {flag}{path} is not what the run was trained on (it "
                                "was replaced or changed since): resume with the files it had, or "
                                "start a new run in another --out_dir")

    def advice(self):
        """What a user does after a divergence: back to the last good checkpoint, or afresh."""
        if self.last_saved is not None:
            return (f"the last good checkpoint (step {self.last_saved}) is in {self.path}: "
                    "continue from it with a lower --lr (or --grad_clip) and --resume")
        return ("no checkpoint was saved; start again with a lower --lr (or --grad_clip) and "
                "--overwrite")

    def log(self, record):
        """One metrics row, appended (rank 0). A run writes an evaluation's row (and its grid)
        before the checkpoint that follows it: a kill between them loses no row of a saved step,
        and a row past the last checkpoint is dropped on resume (trim_metrics) and written
        again."""
        if self.main:
            with open(self.file("metrics.jsonl"), "a") as log:
                log.write(json.dumps(record) + "\n")

    def trim_metrics(self, step):
        """On resume: drop the metrics rows a killed run wrote after its last checkpoint (they are
        written again), and a last row a kill cut short."""
        path = self.file("metrics.jsonl")
        if not self.main or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
        rows, cut = [], 0
        for line in lines:
            try:
                rows.append((line, json.loads(line)))
            except json.JSONDecodeError:  # a row half-written when the run was killed
                cut += 1
        kept = [line for line, row in rows if row.get("step", 0) <= step]
        if len(kept) < len(lines):
            write_text(path, "".join(kept))
            print(f"resume: removed {len(lines) - len(kept)} metrics rows written after step "
                  f"{step}" + (f" ({cut} cut short by a kill)" if cut else ""))


def fingerprint(path, edge=1 << 20):
    """A cheap digest of a file or a folder's files: each file's size and the SHA-256 of its first
    and last MiB (a replaced file of another content, or a folder with a file more, less or
    changed, gives another); "missing" when the path does not exist."""
    if not os.path.exists(path):
        return "missing"
    files = ([path] if os.path.isfile(path) else
             sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                    for name in names))
    digest = hashlib.sha256()
    for name in files:
        size = os.path.getsize(name)
        digest.update(f"{os.path.relpath(name, path)}:{size}:".encode())
        with open(name, "rb") as f:
            digest.update(f.read(edge))
            if size > 2 * edge:
                f.seek(-edge, os.SEEK_END)
                digest.update(f.read(edge))
            elif size > edge:
                digest.update(f.read())
    return digest.hexdigest()


def _stale(lock, other):
    """Whether a lock file (holding `other`, {} when empty or unreadable) is left by no live run:
    its process is gone, or it is empty and older than 10 s (a start that failed before writing
    it; a run writes its lock within milliseconds)."""
    if other:
        return other.get("host") == socket.gethostname() and not _alive(other.get("pid"))
    try:
        return time.time() - os.path.getmtime(lock) > 10
    except OSError:  # removed meanwhile
        return True


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
    it was and no temporary file, and raises an OSError naming path (run_main: one line for a full
    disk; any other is a bug's traceback)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):  # the writer may have removed it already
            os.unlink(tmp)
        error = as_os_error(e, path)
        if error is e:
            raise
        raise error from e


# how safetensors' (Rust) writer reports the system's error: "... (os error 28)"
OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def as_os_error(error, path):
    """A failed write's error as the OSError it is, naming path, so that run_main tells a full disk
    by its errno: torch's writer may raise a RuntimeError while it handles the OSError, safetensors
    gives the errno only in its message. Any other error as it is."""
    system = error.__context__ if isinstance(error, RuntimeError) else error
    if isinstance(system, OSError):
        system.filename = path  # not the temporary file's name, nor none (a write() names none)
        return system
    code = OS_ERROR_CODE.search(str(error)) if isinstance(error, SafetensorError) else None
    return OSError(int(code[1]), os.strerror(int(code[1])), path) if code else error


def write_text(path, text):
    """A text file's new contents, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:  # closed here: an error at the last flush is raised, not lost
            f.write(text)
    atomic_write(path, write)


def check_writable(path, flag, image=False):
    """Before any work: a file can be written at path (its folder exists or can be made, and a file
    can be made in it; image: PIL writes save_grid's grey and colour grids in its extension's
    format), else one line naming the flag. It leaves no file behind (a folder it made stays)."""
    name = f"{flag}{path}"
    if image:
        check_image_name(path, name)
    elif os.path.isdir(path):
        raise UserError(f"{name} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".tmp-").close()
    except OSError as e:
        raise UserError(f"{name} cannot be written ({e.strerror}: {e.filename}); choose another "
                        "place") from None


def check_image_name(path, name):
    """path names an image file whose format PIL can write grey and colour images in."""
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if os.path.isdir(path) or kind is None:
        raise UserError(f"{name}: give an image file name, e.g. samples.png")
    for mode, what in (("L", "grey"), ("RGB", "colour")):
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=kind)
        except (OSError, ValueError, KeyError):  # no save plugin, or none for this mode
            raise UserError(f"{name}: PIL cannot write {what} images as {kind}; give e.g. a .png "
                            "or .jpg") from None


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
    # one metadata key: safetensors stores them in a hash map, in no fixed order
    text = json.dumps({**meta, "sha256": digest(meta)})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": text}))


def digest(meta):
    """The SHA-256 of a checkpoint's meta (less its own "sha256"), written into it: a setting no
    tensor's shape checks (a text encoder's heads) edited afterwards no longer matches it."""
    return hashlib.sha256(json.dumps(meta).encode()).hexdigest()


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
    """The tensor an entry names, refused when it holds NaN or inf (every checkpoint's weights pass
    here: a damaged one would load and make black images). safetensors maps the file
    (copy-on-write) and does not copy it: measured on an SD3.5-medium file, our earlier reader (each
    tensor's bytes read into fresh memory) peaked at 1.04x the file in the process's own memory,
    this at 0.03x, the rest being page cache the system can reclaim (bench/load_sd3.py)."""
    with safe_open(entry.path, framework="pt") as f:
        tensor = f.get_tensor(entry.name)
    if not all_finite(tensor):
        raise CheckpointError(f"{entry.path}: tensor {entry.name} holds NaN or inf values: the "
                              "file's weights are damaged; use another checkpoint")
    return tensor


def all_finite(tensor):
    """Whether every element is finite. A sum is NaN or inf when any element is, and costs a
    twentieth of torch.isfinite on a CPU (10 ms a 64 MB bf16 tensor, against 190): only a sum that
    overflowed from finite elements needs the element-wise look."""
    if not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # float8 has no sum of its own
        tensor = tensor.float()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def read_checkpoint(path, kind=None, how_to_make=""):
    """-> (tensors dict, meta dict) of a file written by save_checkpoint, whose meta says `kind`
    (when given). Clear errors for a missing, broken or other kind of file."""
    entries, metadata = read_safetensors_header(path)
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its metadata 'meta' (the config and step) is not JSON; the "
                              "file is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata 'meta' is {meta!r}, expected a JSON object of "
                              "the config and step; the file is damaged")
    if "sha256" in meta and meta.pop("sha256") != digest(meta):
        raise CheckpointError(f"{path}: its metadata 'meta' was changed after the weights were "
                              "written (its SHA-256 no longer matches): the settings may not "
                              "describe the weights; use the file as it was written")
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
    for name, value in values.items():
        kind = fields[name].type
        if not fits(value, kind):
            raise CheckpointError(f"{path}: its {config_class.__name__} field {name} is {value!r}, "
                                  f"expected {EXPECTED[kind]}")
    return config_class(**{k: tuple(v) if fields[k].type is tuple else v
                           for k, v in values.items()})


# what a config field of each type holds in a checkpoint's JSON, for the error
EXPECTED = {int: "an int", float: "a finite number", bool: "true or false", str: "a string",
            tuple: "a list of numbers or strings"}


def fits(value, kind):
    """Whether a saved (JSON) value fits a config field of type `kind` (int, float, bool, str,
    tuple): a bool fits a bool field alone (Python counts it an int), an int a float field too, a
    tuple field takes a list of numbers or strings."""
    if kind is tuple:
        return isinstance(value, list) and all(fits(v, float) or fits(v, str) for v in value)
    if kind is float:
        return is_number(value)
    return type(value) is kind


def is_number(value):
    """A finite int or float (a JSON number), not a bool (which Python counts an int)."""
    return type(value) is int or type(value) is float and math.isfinite(value)


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


def load_training_state(path, device, config=None, may_change=()):
    """The dict save_training_state wrote, for --resume; a clear error when there is none. Given
    the run's config: its flags checked against the saved run's (check_resumed_config)."""
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
    bad = next((name for name, t in tensors_in(state) if t.is_floating_point()
                and not all_finite(t)), None)
    if bad is not None:  # a damaged or diverged save: resuming would only spread it
        raise CheckpointError(f"--resume: {path} holds NaN or inf ({bad}): it cannot be resumed; "
                              "start afresh in another --out_dir")
    if config is not None:
        check_resumed_config(state["config"], config, may_change)
    return state


def tensors_in(value, prefix=""):
    """(name, tensor) of every tensor in nested dicts and lists (a train state, an optimizer's)."""
    if torch.is_tensor(value):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors_in(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from tensors_in(item, f"{prefix}.{i}")


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
    state = load_training_state(path, device, config, may_change)
    for name, obj in stateful.items():
        if isinstance(obj, torch.nn.Module):
            check_state_fits(path, name, obj, state[name])
        obj.load_state_dict(state[name])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {path} at step {state['step']}")
    return state


def save_training_state(path, state):
    """Optimizer, EMA, RNG and step for --resume, via torch.save, written atomically. torch.save
    writes into a Python file: given a path, its own writer reports a full disk as a RuntimeError
    without the errno."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(path, write)
