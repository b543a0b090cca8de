"""What every script shares: `--key=value` flags, one-line errors, the device choice, torchrun,
FLOPs.

Kept apart so that the scripts parse flags and report errors one way (their files: checkpoints.py).
It imports nothing of the project: every other file may import it (tests/test_teaching.py checks).
"""
import contextlib
import copy
import dataclasses
import errno
import math
import os
import re
import sys
import traceback

import torch
from torch.utils import flop_counter

# -----------------------------------------------------------------------------
# Flags


class UserError(Exception):
    """Something the user can put right (a flag, a file, a setting, a diverged run): run_main
    prints it as one line, as it does a full disk. Every other exception is a bug, and keeps its
    traceback."""


class FlagError(UserError):
    pass


class InputError(UserError, ValueError):
    """Bad input to a library function (an argument out of range, a model that cannot do what is
    asked): a ValueError to a caller in code, one line at a script's edge (run_main)."""


def parse_flags(config, argv):
    """Override flags of a Config instance (its own fields and its groups') from ['--key=value',
    ...]; type-checked, unknown keys rejected."""
    fields = {f.name: (owner, f) for owner, f in flag_fields(config)}
    for arg in argv:
        if not arg.startswith("--"):
            raise FlagError(f"argument {arg!r}: flags are written --key=value")
        key, eq, value = arg[2:].partition("=")
        renamed = getattr(config, "RENAMED", {})  # a Config's {old flag: its name now}
        if key in renamed:
            raise FlagError(f"--{key} is now --{renamed[key]}: --{renamed[key]}={value or '...'}")
        if key not in fields:
            raise FlagError(f"unknown flag --{key}; known flags: "
                            f"{', '.join('--' + k for k in fields)}")
        owner, field = fields[key]
        current = getattr(owner, key)
        if not eq:  # a bare --flag switches a boolean on
            if not isinstance(current, bool):
                raise FlagError(f"flag --{key} needs a value: --{key}=...")
            value = "true"
        setattr(owner, key, _convert(key, value, current, field))
    # (given_flags reads it)
    config._given_flags = frozenset(arg[2:].partition("=")[0] for arg in argv)
    return config


def group(flags):
    """A Config field holding a group of flags declared beside what uses them (a rival's, the
    hardware's): given on the command line by their own names, printed and checked with the rest;
    in code, cfg.<field>.<flag>."""
    return dataclasses.field(default_factory=flags, metadata={"group": True})


def flag_fields(config):
    """[(the object holding it, its dataclass field)] for every flag of a Config: its own fields,
    then its groups', in order."""
    found = []
    for field in dataclasses.fields(config):
        if field.metadata.get("group"):
            found += flag_fields(getattr(config, field.name))
        else:
            found.append((config, field))
    return found


def flag_values(config):
    """{flag: value} of every flag of a Config, its groups' included (what a run saves)."""
    return {field.name: getattr(owner, field.name) for owner, field in flag_fields(config)}


def with_flags(config, **values):
    """A copy of config with these flags (its own or its groups') set."""
    config = copy.deepcopy(config)
    owners = {field.name: owner for owner, field in flag_fields(config)}
    for name, value in values.items():
        setattr(owners[name], name, value)
    return config


def unless_given(config, **values):
    """config with `values` in place of the flags the command line left at their defaults (a
    recipe's settings)."""
    given = given_flags(config)
    return with_flags(config, **{k: v for k, v in values.items() if k not in given})


def given_flags(config):
    """The flags given on the command line (parse_flags), or, for a config built in code, those
    whose value differs from the default."""
    if hasattr(config, "_given_flags"):
        return config._given_flags
    default = flag_values(type(config)())
    return frozenset(name for name, value in flag_values(config).items() if value != default[name])


def _convert(key, value, current, field):
    try:
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):  # numbers: --split_steps=0,1,3,4
            kind, sep = field.metadata.get("of") or int, field.metadata.get("sep") or ","
            return tuple(kind(v) for v in value.split(sep)) if value else ()
        return value
    except ValueError:
        kind = (f"{(field.metadata.get('of') or int).__name__} values separated by "
                f"{field.metadata.get('sep') or ','!r}" if isinstance(current, tuple)
                else f"a {type(current).__name__}")
        raise FlagError(f"flag --{key}={value}: expected {kind}") from None


def run_main(main, config_class, argv=None):
    """Entry point of a script: parse flags, run main(cfg), turn a UserError into one line (exit
    status 1; under torchrun, rank 0's line alone)."""
    try:
        cfg = parse_flags(config_class(), sys.argv[1:] if argv is None else argv)
        return main(cfg)
    except UserError as e:
        fail(f"error: {e}")
    except OSError as e:  # a full disk is the user's to put right; any other OSError is a bug
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = "the disk is full" if e.errno == errno.ENOSPC else "the disk quota is used up"
        writing = f" (writing {e.filename})" if e.filename else ""
        fail(f"error: {full}{writing}: free space and run again (a training run: --resume "
             "continues from its last checkpoint)")
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run's loop could catch it
        fail("error: interrupted; nothing was saved after the last checkpoint")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            leave(sys.exc_info()[1])


def fail(message):
    """Exit with status 1 and `message`: printed once, by rank 0 under torchrun (every rank meets
    the same bad flag; each printing it said it N times)."""
    sys.exit(message if is_main_process() else 1)


def leave(exception):
    """A torchrun process's exit, now, with the status and message `exception` (or none) gives,
    without the interpreter's teardown: there a torch thread still joinable aborted ranks that had
    finished their work ("terminate called without an active exception", exit -6; seen in 2 of
    ~13 runs of the FSDP test on a loaded 2-core machine)."""
    status = 0
    if isinstance(exception, SystemExit):
        code = exception.code
        status = 0 if code is None else code if isinstance(code, int) else 1
        if isinstance(code, str):
            print(code, file=sys.stderr)
    elif exception is not None:
        traceback.print_exception(exception)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def flag(default, within=None, *, choices=None, zero=None, of=None, sep=",", used=None):
    """A Config field and what it may hold: `within` an interval such as "[0, 1)", "(0, inf)" or
    "[1, inf)" (a bracket includes its end, a parenthesis excludes it), or `choices` (values, or a
    dict whose keys are they); `zero`: what 0 means, where 0 is allowed and special. A tuple
    default is a list of numbers of type `of` (int unless said), written separated by `sep`, each
    checked against `within`. `used`: (a rule on the script's config, what it names), e.g.
    used_with("search", "smc") or (lambda cfg: cfg.k > 1, "--k > 1"): a flag given where its
    rule is false is refused. check_flags refuses anything else, and any float that is not
    finite."""
    return dataclasses.field(default=default, metadata={"within": within, "choices": choices,
                                                        "zero": zero, "of": of, "sep": sep,
                                                        "used": used})


def used_with(name, *values):
    """A flag's `used` rule: the flag `name` (a group's as "group.flag") holds one of values."""
    def rule(cfg):
        for part in name.split("."):
            cfg = getattr(cfg, part)
        return cfg in values
    return rule, f"--{name.split('.')[-1]}={'|'.join(values)}"


INTERVAL = re.compile(r"^([\[(])\s*(-inf|\S+?)\s*,\s*(inf|\S+?)\s*([\])])$")


def in_interval(value, within):
    """Whether value lies in the interval string `within` (flag's syntax)."""
    match = INTERVAL.match(within)
    if not match:
        raise ValueError(f"{within!r} is not an interval such as [0, 1) or (0, inf)")
    left, low, high, right = match.groups()
    low, high = float(low), float(high)
    above = value >= low if left == "[" else value > low
    below = value <= high if right == "]" else value < high
    return above and below


@dataclasses.dataclass
class DeviceFlags:
    """Where a script's passes run, and whether compiled: they change speed, never the numbers (a
    group of the scripts' Configs: --device=cuda --compile)."""
    device: str = "auto"
    compile: bool = False              # torch.compile the DiT's and DRM's blocks (model.py)


def check_flags(cfg):
    """Every flag of cfg against what its flag() declares (and every float finite), before any
    work: one line naming the first flag that is not, what it must be, and what 0 means where it
    may; then a group's own rule across its flags (its check()); then a flag given where what
    uses it is not chosen."""
    for owner, field in flag_fields(cfg):
        name, meta = field.name, field.metadata
        value = getattr(owner, name)
        for number in value if isinstance(value, tuple) else (value,):
            shown = shown_value(value, field)
            if isinstance(number, float) and not math.isfinite(number):
                raise FlagError(f"--{name}={shown}: must be a finite number")
            if meta.get("choices") is not None and number not in meta["choices"]:
                raise FlagError(f"--{name}={shown}: choose one of "
                                f"{', '.join(str(c) for c in meta['choices'])}")
            if meta.get("within") and not in_interval(number, meta["within"]):
                zero = f" (0: {meta['zero']})" if meta.get("zero") else ""
                raise FlagError(f"--{name}={shown}: must be in {meta['within']}{zero}")
    for flags in {id(owner): owner for owner, _ in flag_fields(cfg)}.values():
        if callable(getattr(type(flags), "check", None)):  # a group's rule (base.ModelFlags)
            flags.check()
    given = given_flags(cfg)
    for _, field in flag_fields(cfg):
        rule = field.metadata.get("used")
        if rule and field.name in given and not rule[0](cfg):
            raise FlagError(f"--{field.name} is a flag of {rule[1]}, which this run does not use: "
                            f"drop it, or add {rule[1]}")


def check_resumed_config(saved, cfg, may_change):
    """A resumed run continues the experiment it was: flags outside may_change that differ from the
    saved config are refused, naming them; changes to may_change (learning rate, length, evaluation
    cadence, memory knobs) apply
    -> {flag: (saved, now)}, printed. A field this version does not know is refused; one the saved
    run did not know yet must be at its default. Values compare as written (a list of numbers
    saved as "0,1,3" by an earlier version equals (0, 1, 3))."""
    fields = {f.name: (owner, f) for owner, f in flag_fields(cfg)}
    defaults = {f.name: (owner, f) for owner, f in flag_fields(type(cfg)())}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise UserError("--resume: the saved run has flags this version does not know "
                        f"({', '.join(unknown)}): it was written by another version of nanoDRM; "
                        "resume it with that version")
    changed, refused = {}, []
    for name, (owner, field) in fields.items():
        default = getattr(defaults[name][0], name)
        before = shown_value(saved.get(name, default), field)
        now = shown_value(getattr(owner, name), field)
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


def read_prompts(path, flag, default=None, check=None):
    """A prompt file's non-empty lines (check(prompts) may refuse them: the toy's vocabulary), or
    the default when no file is given."""
    if not path and default is not None:
        return default
    prompts = [line.strip() for line in read_text(path, flag).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{flag}{path} holds no prompt; write one prompt per line")
    if check is not None:
        check(prompts)  # an unknown word fails here, naming the prompt
    return prompts


def read_text(path, what):
    """A UTF-8 text file's contents, a byte-order mark at its start dropped (Windows editors write
    one; kept, it would be part of the first prompt); a clear error naming the file when it is
    missing or not UTF-8."""
    name = f"{what}{path}" if what.endswith("=") else f"{what} {path}"
    if not os.path.isfile(path):
        raise UserError(f"{name} {'is a folder' if os.path.isdir(path) else 'does not exist'}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                        "UTF-8") from None

def is_main_process():
    """Rank 0 under torchrun (its RANK variable, set before any process group exists), or a lone
    process."""
    return int(os.environ.get("RANK", "0")) == 0


def shown_value(value, field):
    """A flag's value as written on the command line (a list of numbers: 0,1,3)."""
    if isinstance(value, tuple):
        return (field.metadata.get("sep") or ",").join(map(str, value))
    return value


def print_config(cfg):
    """Every flag, its groups' included, as --key=value."""
    if is_main_process():
        print(" ".join(f"--{field.name}={shown_value(getattr(owner, field.name), field)}"
                       for owner, field in flag_fields(cfg)))

# -----------------------------------------------------------------------------
# Training-loop helpers


def warmup_cosine(step, steps, warmup, peak):
    """Learning rate: linear warm-up over `warmup` steps, then cosine decay from peak to peak /
    10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def in_chunks(fn, chunk, *tensors):
    """fn(*tensors) computed `chunk` rows at a time and concatenated (chunk 0: all at once).

    Micro-batching for no-grad passes (rollouts, DRM scoring): the same result with the activation
    memory of one chunk. Every tensor is split along its first (batch) dimension.
    """
    if chunk <= 0 or tensors[0].shape[0] <= chunk:
        return fn(*tensors)
    return torch.cat([fn(*parts) for parts in zip(*(t.split(chunk) for t in tensors))])


# -----------------------------------------------------------------------------
# Many processes: `torchrun --nproc_per_node=N script.py` sets RANK, WORLD_SIZE and
# LOCAL_RANK. Every rank draws the random numbers of the whole global batch from
# the same seeded generators and keeps its own rows, so N processes compute what
# one process computes on that batch (DDP averages the gradients); only rank 0
# prints and writes files.


@dataclasses.dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    @property
    def shard_id(self):
        """(rank, world): which slice of a global batch's random draws is this process's."""
        return self.rank, self.world

    def shard(self, n, what="batch"):
        """The slice of a global batch of n rows that this rank computes."""
        if n % self.world:
            raise UserError(f"{what} of {n} does not split over {self.world} processes: use a "
                            f"multiple of {self.world}")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, tensor):
        """Every rank's rows, concatenated in rank order: the global batch (for group
        statistics)."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)


def setup_device(requested="auto"):
    """-> (device, Ranks): one process as before, or under torchrun a process group (NCCL on GPUs,
    gloo on CPUs)."""
    if "RANK" not in os.environ:
        return pick_device(requested), Ranks()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = requested in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if rank != 0:  # one log, rank 0's; errors still reach stderr from every rank
        sys.stdout = open(os.devnull, "w")
    print(f"distributed: {world} processes ({'NCCL' if cuda else 'gloo'})")
    return pick_device(f"cuda:{local_rank}" if cuda else "cpu"), Ranks(rank, world)


def any_rank(flag):
    """True on every rank if true on any (under torchrun), so that all ranks leave the loop at the
    same step."""
    if not torch.distributed.is_initialized():
        return bool(flag)
    on_gpu = torch.distributed.get_backend() == "nccl"
    value = torch.tensor(float(bool(flag)), device="cuda" if on_gpu else "cpu")
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


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


# -----------------------------------------------------------------------------
# Device: decided once, with the reason printed


def pick_device(requested="auto"):
    if requested == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reason = "a CUDA GPU is present" if device == "cuda" else "no CUDA GPU found"
    else:
        device, reason = requested, "asked for by --device"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device={requested}: not a device name; use auto, cpu, cuda or "
                        "cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device={requested}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s) for torch {torch.__version__}; use --device=cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device={requested}: nanoDRM runs on cpu or cuda")
    precision = ("bf16 autocast, weights and optimizer in float32" if device.type == "cuda"
                 else "float32 (bf16 is ~30x slower on a CPU)")
    print(f"device: {device} ({reason}); compute in {precision}")
    return device


def check_fits(nbytes, what, device):
    """Refuse in one line, before allocating it, what cannot fit in memory at once: nbytes against
    the device's (a GPU's total memory, the machine's RAM; unknown elsewhere: not checked)."""
    device = torch.device(device)
    try:
        total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > total:
        raise UserError(f"{what} needs {nbytes / 2 ** 30:,.0f} GiB at once, more than the "
                        f"{total / 2 ** 30:,.0f} GiB of this {device.type}: make it smaller")


def frozen_dtype(device):
    """The dtype of frozen weights (a base model, the DRM while it scores): bf16 on a GPU, float32
    elsewhere (bf16 matmuls are ~30x slower on a CPU)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device):
    """The forward passes' precision: bf16 autocast on a GPU (half the activation memory, tensor
    cores), float32 elsewhere."""
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())

# -----------------------------------------------------------------------------
# FLOPs: the compute of a pass, counted rather than timed (a count is the same on any machine)


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows CUDA's attention kernels but not the CPU's flash kernel (which fake tensors
# on the CPU dispatch to as well): count it by the same formulas, or a pass's attention FLOPs go
# missing
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(run):
    """The FLOPs that run() performs, counted by torch's FlopCounterMode (matmuls, convolutions,
    attention)."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with counter:
        run()
    return counter.get_total_flops()

