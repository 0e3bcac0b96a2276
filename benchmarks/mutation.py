"""Mutation testing with mutmut, one module of the package at a time; prints the score per module.

mutmut plants one small change (a "mutant": ``>=`` for ``>``, ``1`` for ``2``, a dropped argument,
...) into a copy of the code and runs the tests that reach the changed function; a mutant the tests
do not notice "survives". The score of a module is ``killed / (all - equivalent - inactive)``: the
equivalent mutants (changes no test can notice because the behaviour is the same) and the inactive
ones (code that runs once at import, e.g. a decorator building its wrapper, which mutmut cannot
switch to a mutant afterwards) are the reviewed entries of ``benchmarks/mutation_equivalent.txt``
(one ``<mutant id>  <reason>`` a line; the reason of an inactive one starts with ``[import time]``).

mutmut imports the package by the module names the code is written under (``monai_dualssl.*``),
while this repository keeps it in ``bundle/scripts``; each module is therefore staged in
``mutants/<module>/`` (ignored by git) as ``monai_dualssl/`` (a copy of ``bundle/scripts``), the
tests and the bundle configs (in ``bundle/configs`` for the tests and beside the package, as in the
bundle), with a generated ``setup.cfg`` holding that module's ``[mutmut]`` settings, and mutmut runs
there. mutmut does not mutate decorated functions, so in the staged copy a decorator defined in the
mutated file (the losses' ``@_float32``) is applied after the function instead (same behaviour). A
generated ``conftest.py`` beside the staged tests runs them fastest first (by the durations mutmut
recorded): mutmut stops at the first failing test, so a mutant a quick test kills costs that test only.
Slow (every mutant runs the tests that reach it): not part of CI.

    pip install -e ".[mutation]"
    python benchmarks/mutation.py losses metrics inference evaluation preflight   # fresh runs, then the report
    python benchmarks/mutation.py losses --retest               # re-run only the last run's survivors
    python benchmarks/mutation.py --report --show               # last results, with each survivor's diff

Modules: see ``MODULES`` (one file of the package each). ``--max-children`` (default 1) is the number
of mutants tested at once.
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bundle" / "scripts"
PACKAGE = "monai_dualssl"
STAGES = REPO / "mutants"
EQUIVALENT = Path(__file__).resolve().with_name("mutation_equivalent.txt")

# module -> the file mutated and the tests that judge it (those that exist)
MODULES = {
    "losses": {"file": "losses.py", "tests": ["tests/test_losses.py", "tests/test_gradients.py", "tests/test_amp.py"]},
    "metrics": {"file": "metrics.py", "tests": ["tests/test_evaluation.py"]},
    # SoftmaxOutput is compiled by TorchScript (jit_optimize), which cannot compile mutmut's trampolines: left unmutated
    "inference": {"file": "inference.py", "tests": ["tests/test_evaluation.py"], "unmutated": ["SoftmaxOutput"]},
    "evaluation": {"file": "evaluation.py", "tests": ["tests/test_evaluation.py"]},
    # check_inputs is tested directly (test_data.py) and, with raise_failed_inputs, through inference.json's runs
    "preflight": {"file": "preflight.py", "tests": ["tests/test_data.py", "tests/test_inference.py"]},
    # the trainer: its unit tests and the training tests. test_reliability.py's in-process train.yaml runs reach
    # every trainer function and would add a minute to each surviving mutant; the trainer's resume and NaN
    # behaviour they check is pinned by the fast tests of test_engines.py. (A test running the code in a subprocess
    # only judges the functions it also calls itself: mutmut maps tests to functions by the calls it sees.)
    "engines": {"file": "engines.py", "tests": ["tests/test_engines.py", "tests/test_training.py"]},
    # the handlers: their unit tests, the training tests and the resume / checkpoint / NaN runs of test_reliability.py
    "handlers": {"file": "handlers.py", "tests": ["tests/test_handlers.py", "tests/test_training.py", "tests/test_reliability.py"]},
}

KILLED = {1, 3, 24, -24, 152, 255, 36, -9, -11}  # test failure, pytest error, timeout, crash
STATUS = {0: "survived", 33: "no tests", 5: "no tests", 34: "skipped", None: "not checked"}


def stage_dir(module: str) -> Path:
    return STAGES / module


def sync(src: Path, dst: Path, keep: set[str] = frozenset()) -> None:
    """Copy the tree ``src`` to ``dst``, rewriting only files whose content differs (so mutmut's
    modification times stay meaningful) and removing files that are gone; the top-level files named in
    ``keep`` are left to the caller."""
    dst.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in src.iterdir() if p.name != "__pycache__"}
    for stale in {p.name for p in dst.iterdir()} - names:
        target = dst / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in names - set(keep):
        s, d = src / name, dst / name
        if s.is_dir():
            sync(s, d)
        elif not d.is_file() or not filecmp.cmp(s, d, shallow=False):
            shutil.copy2(s, d)


def lift_decorators(source: str) -> str:
    """``source`` with every decorator that is a plain name defined in the file (``@_float32``) moved from
    its function to a rebinding after it: ``Class.f = deco(Class.f)`` after the class, ``f = deco(f)``
    after a top-level function. The behaviour is the same, but mutmut 3 skips decorated functions
    entirely (their mutants would not exist), so without this the decorated methods of the losses
    would not be mutation-tested at all."""
    tree = ast.parse(source)
    local = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    def liftable(fn) -> bool:
        decorators = getattr(fn, "decorator_list", None)
        return bool(decorators) and all(isinstance(d, ast.Name) and d.id in local for d in decorators)

    removed, added = set(), {}
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for fn in members:
            if not (isinstance(fn, ast.FunctionDef) and liftable(fn)):
                continue
            name = f"{node.name}.{fn.name}" if isinstance(node, ast.ClassDef) else fn.name
            wrapped = name
            for d in reversed(fn.decorator_list):
                removed.update(range(d.lineno, d.end_lineno + 1))
                wrapped = f"{d.id}({wrapped})"
            added.setdefault(node.end_lineno, []).append(f"{name} = {wrapped}\n")
    out = []
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        if number not in removed:
            out.append(line)
        if number in added:
            out += ["\n", *added[number]]
    return "".join(out)


# the staged conftest.py: the tests in the order of mutmut's recorded durations (new tests first), those
# marked ``last`` still last; run by pytest beside tests/conftest.py, whose own ordering it keeps
FAST_FIRST = '''"""Generated by benchmarks/mutation.py: the tests fastest first, by the durations mutmut recorded."""

import json
from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    stats = Path(__file__).with_name("mutmut-stats.json")
    durations = json.loads(stats.read_text()).get("duration_by_test", {}) if stats.is_file() else {}
    items.sort(key=lambda item: (item.get_closest_marker("last") is not None, durations.get(item.nodeid, 0.0)))
'''


def unmutated(source: str, classes) -> str:
    """``source`` with mutmut's ``# pragma: no mutate block`` on the lines defining ``classes``: mutmut
    neither mutates nor wraps them (TorchScript cannot compile a wrapped ``forward``)."""
    out = []
    for line in source.splitlines(keepends=True):
        if any(re.match(rf"class {re.escape(name)}\b.*:$", line.rstrip()) for name in classes):
            line = line.rstrip() + "  # pragma: no mutate block\n"
        out.append(line)
    return "".join(out)


def prepare(module: str, fresh: bool) -> Path:
    """Stage ``module``: the package as ``monai_dualssl/``, the tests, the configs and ``setup.cfg``."""
    spec, stage = MODULES[module], stage_dir(module)
    if fresh and stage.exists():
        shutil.rmtree(stage)
    sync(SOURCE, stage / PACKAGE, keep={spec["file"]})
    source = unmutated((SOURCE / spec["file"]).read_text(), spec.get("unmutated", ()))
    mutated, lifted = stage / PACKAGE / spec["file"], lift_decorators(source)
    if not mutated.is_file() or mutated.read_text() != lifted:
        mutated.write_text(lifted)
    sync(REPO / "tests", stage / "tests")
    sync(REPO / "bundle" / "configs", stage / "bundle" / "configs")  # where the tests find them
    sync(REPO / "bundle" / "configs", stage / "configs")  # beside the package, where the package finds them
    conftest = stage / "conftest.py"
    if not conftest.is_file() or conftest.read_text() != FAST_FIRST:
        conftest.write_text(FAST_FIRST)
    lines = [
        "[mutmut]",
        f"source_paths = {PACKAGE}",
        f"only_mutate = {PACKAGE}/{spec['file']}",
        "also_copy =",
        "    bundle/configs",
        "    configs",
        "    conftest.py",
        "pytest_add_cli_args_test_selection =",
        *[f"    {t}" for t in spec["tests"] if (REPO / t).is_file()],
        "pytest_add_cli_args =",
        "    -p",
        "    no:cacheprovider",
        "",
    ]
    (stage / "setup.cfg").write_text("\n".join(lines))
    return stage


def key_prefix(module: str) -> str:
    return f"{PACKAGE}.{Path(MODULES[module]['file']).stem}."


def results(module: str) -> dict[str, int | None]:
    """``{mutant id: mutmut exit code}`` of the last run of ``module`` (empty before the first)."""
    meta = stage_dir(module) / "mutants" / PACKAGE / (MODULES[module]["file"] + ".meta")
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


INACTIVE = "[import time]"


def equivalent() -> dict[str, str]:
    """The reviewed equivalent mutants: ``{id: reason}``."""
    if not EQUIVALENT.is_file():
        return {}
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, reason = line.strip().partition(" ")
            out[key] = reason.strip()
    return out


def run(module: str, retest: bool, max_children: int) -> None:
    stage = prepare(module, fresh=not retest)
    names = []
    if retest:
        names = [k for k, v in results(module).items() if v not in KILLED and k not in equivalent()]
        if not names:
            print(f"{module}: no survivor to re-test")
            return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    la = REPO.parent / "shared" / "data" / "la2018"
    if "LA2018_DIR" not in env and la.is_dir():
        env["LA2018_DIR"] = str(la)  # the staged conftest looks for the real data beside the stage otherwise
    mutmut = Path(sys.executable).with_name("mutmut")
    command = [str(mutmut) if mutmut.is_file() else "mutmut", "run", "--max-children", str(max_children), *names]
    print(f"== {module}: {' '.join(command[1:4])} ... in {stage.relative_to(REPO)}", flush=True)
    subprocess.run(command, cwd=stage, env=env, check=True)


def diff(module: str, key: str) -> str:
    """The changed lines of mutant ``key`` (as ``mutmut show`` prints them)."""
    from mutmut.configuration import reset_config
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(stage_dir(module))  # mutmut reads its setup.cfg and mutants/ from the working directory
    try:
        reset_config()
        text = get_diff_for_mutant(key, path=f"{PACKAGE}/{MODULES[module]['file']}")
    finally:
        os.chdir(cwd)
    lines = text.splitlines()
    return "\n".join(line for line in lines if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))


def report(modules: list[str], show: bool) -> list[dict]:
    """Print killed / survived / equivalent and the score per module, and the survivors' ids."""
    reviewed = equivalent()
    rows = []
    for module in modules:
        codes = results(module)
        if not codes:
            print(f"{module}: no results (run it first)")
            continue
        eq = sorted(k for k, v in codes.items() if k in reviewed and v not in KILLED)
        inactive = [k for k in eq if reviewed[k].startswith(INACTIVE)]
        stale = sorted(k for k, v in codes.items() if k in reviewed and v in KILLED)
        killed = sorted(k for k, v in codes.items() if v in KILLED)
        left = sorted(k for k, v in codes.items() if v not in KILLED and k not in reviewed)
        considered = len(codes) - len(eq)
        score = 100.0 * len(killed) / considered if considered else 100.0
        rows.append({"module": module, "mutants": len(codes), "killed": len(killed), "survived": len(left),
                     "equivalent": len(eq) - len(inactive), "inactive": len(inactive), "score": score})
        for k in left:
            status = STATUS.get(codes[k], f"exit code {codes[k]}")
            print(f"  survivor {k} ({status})")
            if show:
                print("    " + diff(module, k).replace("\n", "\n    "))
        for k in stale:
            print(f"  listed as equivalent but killed (remove it from {EQUIVALENT.name}): {k}")
    listed = {k for k in reviewed if any(k.startswith(key_prefix(m)) for m in modules)}
    seen = {k for m in modules for k in results(m)}
    for k in sorted(listed - seen):
        print(f"  listed as equivalent but no such mutant (re-review after a code change): {k}")
    print()
    print(f"{'module':<12} {'mutants':>8} {'killed':>8} {'survived':>9} {'equivalent':>11} {'inactive':>9} {'score':>8}")
    for r in rows:
        print(f"{r['module']:<12} {r['mutants']:>8} {r['killed']:>8} {r['survived']:>9} {r['equivalent']:>11} "
              f"{r['inactive']:>9} {r['score']:>7.1f}%")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to run, some of {', '.join(MODULES)}")
    parser.add_argument("--retest", action="store_true", help="re-run only the survivors of the last run")
    parser.add_argument("--report", action="store_true", help="print the last results without running")
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; expected some of {', '.join(MODULES)}")
    modules = args.modules or [m for m in MODULES if results(m)]
    if not args.report:
        for module in args.modules:
            run(module, args.retest, args.max_children)
    report(modules, args.show)


if __name__ == "__main__":
    main()
