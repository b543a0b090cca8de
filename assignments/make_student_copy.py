"""Write a student copy of the repository: the exercises' solutions replaced by NotImplementedError
and a hint.

    python assignments/make_student_copy.py --out=../nanodrm-student # every exercise blanked
    python assignments/make_student_copy.py --out=../hw3 --exercises=ex3_sde_step,ex4_grpo

The reference solutions live in the real code between two marker lines,

    # BEGIN SOLUTION ex3_sde_step: the hint the student sees
    ...
    # END SOLUTION

and each region becomes `raise NotImplementedError("ex3_sde_step: the hint ...")` at the same
indentation. Every test that needs an exercise's code carries its pytest mark, so the students grade
themselves with `python -m pytest -q tests -k ex3_sde_step`, and the rest of the suite keeps passing
around the blanks.
"""
import argparse
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = ("ex1_flow_matching", "ex2_drm", "ex3_sde_step", "ex4_grpo", "ex5_beam_search")
BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION (\w+): (.*)$")
END = re.compile(r"^\s*# END SOLUTION$")
SKIP = {".git", "out", "__pycache__", ".pytest_cache", ".ruff_cache"}


def blank(text, exercises, path="<text>"):
    """The text with the solution regions of `exercises` replaced -> (new text, names of the regions
    blanked)."""
    lines, out, blanked, inside = text.splitlines(keepends=True), [], [], None
    for number, line in enumerate(lines, 1):
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ValueError(f"{path}:{number}: a BEGIN SOLUTION inside the region that starts "
                                 f"at line {inside[0]}")
            indent, name, hint = begin.groups()
            if name not in EXERCISES:
                raise ValueError(f"{path}:{number}: unknown exercise {name!r}; known: "
                                 f"{', '.join(EXERCISES)}")
            inside = (number, name in exercises)
            if inside[1]:
                blanked.append(name)
                out.append(f"{indent}raise NotImplementedError({(name + ': ' + hint)!r})\n")
            else:
                out.append(line)
        elif END.match(line):
            if not inside:
                raise ValueError(f"{path}:{number}: END SOLUTION without a BEGIN")
            if not inside[1]:
                out.append(line)
            inside = None
        elif not (inside and inside[1]):
            out.append(line)
    if inside:
        raise ValueError(f"{path}:{inside[0]}: BEGIN SOLUTION is never closed by an END SOLUTION")
    return "".join(out), blanked


def make_student_copy(out, exercises=EXERCISES, root=ROOT):
    """Copy root to out (no .git, outputs or caches) with the exercises blanked -> {exercise:
    regions blanked}."""
    if os.path.exists(out):
        raise FileExistsError(f"--out={out} exists; pick a new folder (nothing is overwritten)")
    shutil.copytree(root, out, ignore=lambda folder, names: [n for n in names if n in SKIP])
    counts = {name: 0 for name in exercises}
    for name in sorted(os.listdir(out)):
        if name.endswith(".py"):
            path = os.path.join(out, name)
            with open(path) as f:
                text, blanked = blank(f.read(), exercises, name)
            with open(path, "w") as f:
                f.write(text)
            for exercise in blanked:
                counts[exercise] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new folder for the student copy")
    parser.add_argument("--exercises", default=",".join(EXERCISES),
                        help="comma-separated; default: all")
    args = parser.parse_args(argv)
    exercises = [e for e in args.exercises.split(",") if e]
    unknown = [e for e in exercises if e not in EXERCISES]
    if unknown:
        sys.exit(f"error: --exercises: unknown {', '.join(unknown)}; choose from "
                 f"{', '.join(EXERCISES)}")
    try:
        counts = make_student_copy(args.out, exercises)
    except (FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    for exercise, n in counts.items():
        print(f"{exercise}: {n} region(s) blanked; grade with: python -m pytest -q tests -k "
              f"{exercise}")
    print(f"wrote the student copy to {args.out}")


if __name__ == "__main__":
    main()
