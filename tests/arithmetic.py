"""Other processors' arithmetic, tried on one machine: the tests marked `rounding` (every test that
compares with conftest.within) run under each arithmetic variant, and each comparison's worst error
is printed against its tolerance.

    python tests/arithmetic.py                      # every variant (about 25 minutes on 2 cores)
    python tests/arithmetic.py -k loss_pieces       # some tests (pytest's -k)
    python tests/arithmetic.py --variants=native,1-thread

The rounding of a sum depends on the vector width and the order the kernels use. On one x86 CPU:
ATen's CPU kernels are picked by ATEN_CPU_CAPABILITY (default: no vectors; avx2; avx512, where the
CPU has it), MKL's GEMMs by MKL_ENABLE_INSTRUCTIONS (AVX2 on an AVX-512 CPU) and MKL_CBWR=COMPATIBLE
(one code path on every CPU), and a reduction splits over the threads (1 or 2). A tolerance holds
on another processor when it holds under all of these. The table's `margin` is the tolerance over
the worst error seen; the project asks for at least 10 (tests/mutations.py measures the other side:
the error of a bug). Exits 1 if a test fails or a margin is below 10.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "1-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "2-threads": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
}
MARGIN = 10


def run_variant(name, pytest_args, log):
    """The rounding tests under one variant -> pytest's exit code; their errors appended to log.
    Each variant compiles into an Inductor cache of its own, as another machine would: the cache
    is keyed without ATen's CPU capability, and kernels written under AVX-512 served all-NaN
    velocities under ATEN_CPU_CAPABILITY=avx2."""
    cache = os.path.join(os.path.dirname(log), f"inductor-{name}")
    env = {**os.environ, **VARIANTS[name], "NANODRM_ROUNDING_LOG": log,
           "TORCHINDUCTOR_CACHE_DIR": cache}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "rounding",
               "tests", *pytest_args]
    print(f"# {name}: {' '.join(f'{k}={v}' for k, v in VARIANTS[name].items()) or '(as is)'}",
          flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()
    print(summary[-1] if summary else result.stderr[-2000:])
    return result.returncode


def worst(records):
    """{(test, what): (worst error, its variant, tolerance)} over the variants."""
    table = {}
    for r in records:
        key, error = (r["test"], r["what"]), r["error"]
        error = math.inf if math.isnan(error) else error  # a NaN is the worst error of all
        if key not in table or error > table[key][0]:
            table[key] = (error, r["variant"], r["tolerance"])
    return table


def main(argv):
    names = list(VARIANTS)
    if argv and argv[0].startswith("--variants="):
        names = argv.pop(0).split("=", 1)[1].split(",")
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            sys.exit(f"error: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    records, failed = [], []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            log = os.path.join(folder, f"{name}.jsonl")
            if run_variant(name, argv, log) != 0:
                failed.append(name)
            if os.path.exists(log):
                records += [{**json.loads(line), "variant": name} for line in open(log)]
    table = worst(records)
    print("\n| test | what | worst error | under | tolerance | margin |\n|---|---|---|---|---|---|")
    thin = []
    for (test, what), (error, variant, tolerance) in sorted(table.items()):
        margin = tolerance / error if error > 0 else float("inf")
        print(f"| {test} | {what} | {error:.3g} | {variant} | {tolerance:.3g} | {margin:.3g} |")
        if margin < MARGIN:
            thin.append(f"{test} {what}")
    if failed:
        print(f"failed under: {', '.join(failed)}")
    if thin:
        print(f"margin below {MARGIN}: " + "; ".join(thin))
    return 1 if failed or thin else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
