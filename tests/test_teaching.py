"""The teaching promises: the README a front page, the paper's path (its size, short functions with
few positional parameters, no dead code, sampling free of the RL file), 100 columns everywhere, no
import cycle, the student copy, the sweep."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from assignments.make_student_copy import EXERCISES, blank, make_student_copy
from bench.sweep import flatten, parse_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the paper's method in its order (DiT and flow matching, the DRM and its training, the SDE step,
# step-wise GRPO and its training, step-wise sampling), without a rival
READING_PATH = ("model.py", "reward.py", "train_reward.py", "sde.py", "grpo.py", "train_policy.py",
                "sample.py")
BUDGET = 1400
README_BYTES = 15_000


def lines_of_code(path):
    """Lines that are neither blank nor only a comment (docstrings count: they are read)."""
    with open(path) as f:
        return sum(1 for line in f if line.strip() and not line.strip().startswith("#"))


def test_reading_path_fits_its_budget_and_the_readme_table_is_near():
    """The budget holds; the README's table is within 10% (and 15 lines) of each file's count, so a
    small edit does not break it but a stale table does."""
    counts = {name: lines_of_code(os.path.join(ROOT, name)) for name in READING_PATH}
    assert sum(counts.values()) <= BUDGET, (f"the reading path has {sum(counts.values())} lines of "
                                            f"code, budget {BUDGET}")
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Read the code"):]
    section = section[:section.index("\n## ", 1)]
    rows = dict(re.findall(r"^\| \d\. `(\w+\.py)` \| (\d+) \|", section, re.M))
    assert list(rows) == list(READING_PATH), "the README's reading order"
    for name, count in counts.items():
        assert abs(int(rows[name]) - count) <= max(15, count // 10), ("update the README's 'Read "
                                                                      f"the code' row of {name}")
    total = re.search(r"^\| \| \*\*(\d+)\*\* \|", section, re.M)
    assert total and abs(int(total.group(1)) - sum(counts.values())) <= max(15,
        sum(counts.values()) // 10)


def project_files(suffix=".py"):
    """Every file of the project with this suffix (not .git, not run outputs)."""
    return sorted(os.path.relpath(os.path.join(folder, f), ROOT)
                  for folder, _, names in os.walk(ROOT) for f in names if f.endswith(suffix)
                  and not {".git", "out"} & set(folder[len(ROOT):].split(os.sep)))


def ruff(*args):
    binary = shutil.which("ruff") or pytest.fail("ruff is missing: pip install -r "
                                                 "requirements-dev.txt")
    return subprocess.run([binary, "check", "--no-cache", "--line-length", "100", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_reading_path_has_no_unused_code():
    # unused imports, names, arguments; commented-out code
    result = ruff("--select", "F401,F811,F841,F842,ARG,ERA001", *READING_PATH)
    assert result.returncode == 0, result.stdout


def test_every_project_file_is_within_100_columns():
    result = ruff("--select", "E501", *project_files())
    assert result.returncode == 0, result.stdout
    too_wide = [f"{path}:{n}" for path in project_files(".md") if not path.startswith("docs" +
                os.sep + "figures") for n, line in enumerate(open(os.path.join(ROOT, path)), 1)
                if len(line.rstrip("\n")) > 100 and not line.lstrip().startswith("|")
                and "](" not in line and "http" not in line]
    assert not too_wide, f"prose over 100 columns (tables and links may be wider): {too_wide}"


def test_readme_is_a_front_page():
    """At most 15 KB; the two set-up commands (the main job, the tests) come first; no issue numbers
    in user docs; every docs/ page is linked from it."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.encode()) <= README_BYTES, (f"README.md is {len(readme.encode())} bytes; "
                                                  f"move detail to docs/ (at most {README_BYTES})")
    first_block = readme[readme.index("```"):readme.index("```", readme.index("```") + 3)]
    assert "python train_policy.py" in first_block and "pytest" in first_block, first_block
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_line = [line for line in first_block.splitlines() if "pytest" in line][0]
    assert test_line.split("&&")[-1].strip() in ci, "the README's test command is .ci/run's"
    for page in os.listdir(os.path.join(ROOT, "docs")):
        if page.endswith(".md"):
            assert f"docs/{page}" in readme, f"README.md does not link docs/{page}"
    for path in ["README.md"] + [os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT,
                                                                                   "docs"))
                                 if p.endswith(".md")]:
        text = open(os.path.join(ROOT, path)).read()
        assert not re.search(r"\b[Ii]ssues? #?\d+|the issue's", text), f"{path} cites an issue"


def test_every_relative_link_of_the_docs_resolves():
    for path in project_files(".md"):
        text = open(os.path.join(ROOT, path)).read()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if not target.startswith(("http:", "https:")):
                resolved = os.path.join(ROOT, os.path.dirname(path), target)
                assert os.path.exists(resolved), f"{path} links {target}, which does not exist"


def documented_commands():
    """(file, script, [flags]) of every `python SCRIPT ...` or `torchrun ... SCRIPT ...` command in
    the project's docs and docstrings (backslash continuations joined, quoted values blanked)."""
    command = re.compile(r"(?:\bpython (?:-m )?|\btorchrun (?:--\S+ )*)([\w./]+)(.*)")
    for path in project_files(".md") + project_files(".py"):
        if path.startswith("tests" + os.sep):
            continue
        for line in open(os.path.join(ROOT, path)).read().replace("\\\n", " ").splitlines():
            for match in command.finditer(line):
                script, rest = match.groups()
                rest = re.sub(r'"[^"]*"|\'[^\']*\'', '""', re.split(r"\s#|&&|[|`);]", rest)[0])
                yield path, script, re.findall(r"(?<!\S)--(\w+)", rest)


def test_every_documented_command_takes_its_flags():
    """A renamed flag is renamed in the docs too: each command's flags are its script's Config."""
    import dataclasses
    import importlib
    wrong, checked = [], 0
    for path, script, flags in documented_commands():
        name = script[:-3].replace("/", ".") if script.endswith(".py") else script
        if not os.path.exists(os.path.join(ROOT, name.replace(".", os.sep) + ".py")):
            continue  # another program's command (pip, huggingface-cli, ...)
        config = getattr(importlib.import_module(name), "Config", None)
        if not dataclasses.is_dataclass(config):
            continue  # a script without a Config (its own parser)
        from common import flag_fields
        fields = {field.name for _, field in flag_fields(config())}
        wrong += [f"{path}: {script} --{flag}" for flag in flags if flag not in fields]
        checked += 1
    assert checked > 50 and not wrong, wrong


def test_reading_path_functions_take_at_most_six_positional_parameters():
    """More are keyword-only: a call then names what it passes."""
    for name in READING_PATH:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
            if isinstance(node, ast.FunctionDef):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args
                              if a.arg not in ("self", "cls")]
                assert len(positional) <= 6, (f"{name}: {node.name} takes {len(positional)} "
                                              "positional parameters; make the rest keyword-only")


def test_reading_path_functions_take_at_most_eight_parameters():
    """What travels together is one small dataclass that names it (sde.Sampler, sde.Draws,
    grpo.Candidates, grpo.PPO, sample.Search), as nanoGPT's GPTConfig: no function of the path
    takes more than 8 parameters in all, keyword-only included."""
    for name in READING_PATH:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
            if isinstance(node, ast.FunctionDef):
                every = [a.arg for a in node.args.posonlyargs + node.args.args
                         + node.args.kwonlyargs if a.arg not in ("self", "cls")]
                assert len(every) <= 8, f"{name}: {node.name} takes {len(every)} parameters"


def test_a_rollout_is_built_by_keyword():
    for path in project_files():
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "Rollout"):
                assert not node.args, f"{path}:{node.lineno}: Rollout(...) by keyword"


# each script's own Config (a group of flags declared elsewhere counts one)
CONFIG_SIZES = {"train_policy.py": 30, "train_reward.py": 30, "sample.py": 20}


def test_each_scripts_config_holds_the_papers_flags_and_groups_the_rest():
    """At most 30 fields in train_policy.py's and train_reward.py's Config, 20 in sample.py's; the
    rivals' flags a group declared in rivals/, given by their own names."""
    import dataclasses
    import importlib

    from common import flag_fields
    for script, most in CONFIG_SIZES.items():
        config = importlib.import_module(script[:-3]).Config
        fields = dataclasses.fields(config)
        assert len(fields) <= most, f"{script}'s Config has {len(fields)} fields, at most {most}"
        groups = {f.name: f for f in fields if f.metadata.get("group")}
        assert type(getattr(config(), "rival")).__module__.startswith("rivals."), script
        assert set(groups) >= {"pretrained", "rival"}, script
        names = [field.name for _, field in flag_fields(config())]
        assert len(names) == len(set(names)), f"{script}: a flag named twice"


def test_flags_are_parsed_once_by_the_flag_parser():
    """A list flag is a tuple (of numbers, or of names), parsed and range-checked with the rest:
    no function below a script's main splits a flag's string (cfg.<flag>.split(",")) or parses
    numbers out of it."""
    for path in project_files():
        if path.startswith("tests" + os.sep):
            continue
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        below_main = [node for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
                      and function.name != "main" for node in ast.walk(function)]
        for node in below_main:
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                    and node.func.attr in ("split", "partition")
                    and isinstance(node.func.value, ast.Attribute)
                    and isinstance(node.func.value.value, (ast.Name, ast.Attribute))
                    and "cfg" in ast.unparse(node.func.value.value)):
                raise AssertionError(f"{path}:{node.lineno}: {ast.unparse(node)} re-parses a "
                                     "flag: declare it a tuple flag (common.flag)")
        assert "parse_numbers" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def test_rivals_come_in_through_one_door():
    """rivals/ imports no script and no operations file; no operations file imports rivals/; each
    script imports one rivals module (its door) and calls the paper's functions by name."""
    edges = project_imports()
    scripts = {"train_policy", "train_reward", "sample"}
    operations = {"train_ops", "reward_ops", "evaluation", "checkpoints", "common", "base"}
    for module, found in edges.items():
        targets = {target for target, _ in found}
        if module.startswith("rivals."):
            assert not targets & (scripts | {"train_ops", "reward_ops"}), (module, targets)
        if module in operations:
            assert not [t for t in targets if t.startswith("rivals")], (module, targets)
        if not module.startswith(("bench", "tests", "assignments")) and module not in scripts:
            assert not targets & scripts, f"{module} imports a script: {targets & scripts}"
        if module in scripts:
            doors = {t for t in targets if t.startswith("rivals.")}
            assert len(doors) == 1, (module, doors)
    calls = {"train_policy.py": ("grpo.sample_rollout(", "grpo.stepwise_advantages(",
                                 "grpo.grpo_loss("),
             "sample.py": ("stepwise_sample(", "best_of_n("),
             "train_reward.py": ("bradley_terry_loss(",)}
    for script, names in calls.items():
        code = open(os.path.join(ROOT, script)).read()
        assert all(name in code for name in names), script


def test_reading_path_functions_are_short():
    """No function of the reading path is longer than 60 lines, but the two training scripts' main
    (80)."""
    for name in READING_PATH:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
            if isinstance(node, ast.FunctionDef):
                limit = 80 if (name, node.name) in {("train_reward.py", "main"),
                                                    ("train_policy.py", "main")} else 60
                assert node.end_lineno - node.lineno + 1 <= limit, (f"{name}: {node.name} is "
                                                                    f"longer than {limit} lines")


def project_imports():
    """{module: [(imported project module, inside a function?)]} for every .py file of the project
    but the tests, read with ast."""
    files = [path for path in project_files() if not path.startswith("tests" + os.sep)]
    modules = {path[:-3].replace(os.sep, "."): path for path in files}
    edges = {}
    for module, path in modules.items():
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        functions = [node for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        found = []
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                if name in modules and name != module:
                    found.append((name, id(node) in inside))
        edges[module] = found
    return edges


def test_the_project_imports_run_one_way_without_a_cycle():
    edges = project_imports()
    assert edges["common"] == [], (f"common.py imports {edges['common']}: it must import no "
                                   "project module")
    lazy = {(module, target) for module, found in edges.items() for target, inner in found if inner}
    # the deliberate lazy imports: a world is imported when it is loaded (base.load_base), and the
    # SD3 key layouts only when a file holds the DRM repository's (reward.read_drm, the export)
    assert lazy == {("base", "data.toy"), ("base", "sd3.pipeline"), ("reward", "sd3.mmdit"),
                    ("reward_ops", "sd3.mmdit")}, f"imports inside functions: {sorted(lazy)}"
    graph = {module: {target for target, _ in found} for module, found in edges.items()}
    # sampling needs no RL; reading pairs needs no generation; the paper's files no operations
    assert not {"grpo", "train_ops"} & graph["sample"], graph["sample"]
    assert not {"data.preferences", "sample"} & graph["data.pairs"], graph["data.pairs"]
    for module, found in graph.items():  # the library never imports its benchmarks
        if not module.startswith("bench"):
            assert not [t for t in found if t.startswith("bench")], f"{module} imports {found}"
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", ("an import cycle: "
                                                 f"{' -> '.join(path + [module, target])}")
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    # the walk saw the project
    assert {"model", "grpo", "sample", "sde", "base", "sd3.pipeline", "data.world"} <= set(graph)


# -----------------------------------------------------------------------------
# Assignments


def test_blank_replaces_only_the_chosen_regions_and_keeps_indentation():
    text = ("def f(x):\n    # BEGIN SOLUTION ex3_sde_step: mind sigma = 1\n    y = x + 1\n    "
            "return y\n    # END SOLUTION\n\ndef g():\n    # BEGIN SOLUTION ex4_grpo: clip it\n    "
            "return 2\n    # END SOLUTION\n")
    student, blanked = blank(text, ["ex3_sde_step"])
    assert blanked == ["ex3_sde_step"]
    assert student == ("def f(x):\n    raise NotImplementedError('ex3_sde_step: mind sigma = "
                       "1')\n\ndef g():\n    # BEGIN SOLUTION ex4_grpo: clip it\n    return 2\n    "
                       "# END SOLUTION\n")
    namespace = {}
    exec(student, namespace)
    with pytest.raises(NotImplementedError, match="mind sigma"):
        namespace["f"](1)
    assert namespace["g"]() == 2
    assert blank(text, [])[0] == text


@pytest.mark.parametrize("text, problem", [
    ("# BEGIN SOLUTION ex1_flow_matching: a\nx = 1\n", "never closed"),
    ("x = 1\n# END SOLUTION\n", "without a BEGIN"),
    ("# BEGIN SOLUTION ex9_nothing: a\n# END SOLUTION\n", "unknown exercise"),
    ("# BEGIN SOLUTION ex2_drm: a\n# BEGIN SOLUTION ex2_drm: b\n# END SOLUTION\n", "inside the "
     # ids without exercise names: -k grades by them
     "region"),], ids=["unclosed", "end without begin", "unknown exercise", "nested"])
def test_malformed_markers_name_the_line(text, problem):
    with pytest.raises(ValueError, match=problem):
        blank(text, EXERCISES, "f.py")


def test_every_exercise_has_regions_a_page_and_graded_tests():
    code = "".join(open(os.path.join(ROOT, name)).read() for name in READING_PATH)
    pages = os.listdir(os.path.join(ROOT, "assignments"))
    tests = "".join(open(os.path.join(ROOT, "tests", name)).read()
                    for name in os.listdir(os.path.join(ROOT, "tests")) if name.endswith(".py"))
    for exercise in EXERCISES:
        assert f"# BEGIN SOLUTION {exercise}:" in code
        assert any(page.startswith(exercise) and page.endswith(".md") for page in pages), exercise
        assert tests.count(f"pytest.mark.{exercise}") >= 2, f"{exercise}: no tests grade it"


def failing_tests(folder):
    """Run the suite in folder (all but this file) -> the node ids that failed or errored (read from
    JUnit XML: parametrised ids may hold spaces, which pytest's one-line summary does not
    delimit)."""
    import xml.etree.ElementTree as ET
    report = os.path.join(folder, "report.xml")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"--junitxml={report}", "tests", "--deselect",
                             "tests/test_teaching.py"], cwd=folder,
                             capture_output=True, text=True)
    assert os.path.exists(report), result.stdout[-3000:] + result.stderr[-3000:]
    return {case.get("classname").replace(".", "/") + ".py::" + case.get("name")
            for case in ET.parse(report).iter("testcase") if case.find("failure") is not None
            or case.find("error") is not None}


def test_reference_copy_is_this_repository(tmp_path):
    """With no exercise blanked the writer copies the code unchanged: the reference copy is this
    repository, whose full suite (the graded tests included) is what CI runs."""
    out = tmp_path / "reference"
    assert make_student_copy(str(out), exercises=()) == {}
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            assert (out / name).read_text() == open(os.path.join(ROOT, name)).read(), name


def test_student_copy_fails_exactly_the_graded_tests(tmp_path):
    """Blank every exercise: the failures are exactly the tests `-k exN_...` selects, and every
    other test passes."""
    out = str(tmp_path / "student")
    counts = make_student_copy(out)
    assert all(n >= 1 for n in counts.values()), counts
    student_code = "".join(open(os.path.join(out, name)).read() for name in READING_PATH)
    assert "BEGIN SOLUTION" not in student_code and "stepwise_advantages" in student_code
    graded = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                             "no:cacheprovider", "-k", " or ".join(EXERCISES), "tests",
                             "--deselect", "tests/test_teaching.py"],
                            cwd=ROOT, capture_output=True, text=True).stdout
    graded = {line.strip() for line in graded.splitlines() if "::" in line}
    failed = failing_tests(out)
    assert failed == graded, (f"fail but are not graded: {sorted(failed - graded)}; graded but "
                              f"pass: {sorted(graded - failed)}")

# -----------------------------------------------------------------------------
# The sweep helper, on a stand-in script whose metric is a known function of its flags and seed


FAKE_SCRIPT = """
import json, os, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
os.makedirs(flags["out_dir"], exist_ok=True)
with open(os.path.join(flags["out_dir"], "metrics.jsonl"), "w") as f:
    for step in (0, 5, 10):
        value = float(flags["width"]) * step / 10 + int(flags["seed"])
        f.write(json.dumps({"step": step, "test": {"0.5": {"acc": value}}}) + "\\n")
"""


def test_sweep_tables_the_mean_and_spread_over_seeds(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_SCRIPT)
    out = tmp_path / "sweep"
    command = [sys.executable, os.path.join(ROOT, "bench", "sweep.py"), f"--script={script}",
               "--grid=width=1,3", "--seeds=0,1", "--metric=test.0.5.acc", f"--out_dir={out}"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # final values: width + seed -> width=1: 1, 2 (mean 1.5, sample std 0.7071); width=3: 3, 4
    table = (out / "results.md").read_text()
    assert "| width=1 | 1.5000 ± 0.7071 | 1.0000, 2.0000 |" in table
    assert "| width=3 | 3.5000 ± 0.7071 | 3.0000, 4.0000 |" in table
    assert (out / "results.png").stat().st_size > 1000
    # a second call runs nothing again (every run left its `done`) and gives the same table
    again = subprocess.run(command, capture_output=True, text=True)
    assert "$ " not in again.stdout and (out / "results.md").read_text() == table
    bad = subprocess.run(command[:-2] + ["--metric=nope", f"--out_dir={out}"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and "test.0.5.acc" in bad.stderr


def test_sweep_parses_grids_and_flattens_metrics():
    assert parse_grid("credit=stepwise,sparse;k=2,4") == [("credit", ["stepwise", "sparse"]),
                                                          ("k", ["2", "4"])]
    with pytest.raises(ValueError, match="flag=value1"):
        parse_grid("credit")
    assert flatten({"gold": 1, "test": {"0.5": {"gold_accuracy": 0.7}}}) == {"gold": 1,
        "test.0.5.gold_accuracy": 0.7}


@pytest.mark.parametrize("script, args, says", [
    ("import sys\n", ["--grid=width=1", "--seeds=0"], "metrics.jsonl does not exist"),
    ("raise SystemExit(3)\n", ["--grid=width=1", "--seeds=0"], "failed; its command is above"),
    ("", ["--grid=width=1", "--seeds=zero"], "--seeds=zero: whole numbers"),
    ("", ["--grid=width", "--seeds=0"], "is not flag=value1,value2"),
], ids=["no metrics", "run fails", "bad seeds", "bad grid"])
def test_sweep_bad_input_gives_one_clear_line(script, args, says, tmp_path):
    (tmp_path / "fake.py").write_text(script)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sweep.py"),
                             f"--script={tmp_path / 'fake.py'}", *args,
                             f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (result.stderr.strip().splitlines()[-1].startswith("error:")
            and says in result.stderr), result.stderr
