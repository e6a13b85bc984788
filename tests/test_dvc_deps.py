"""dvc.yaml's code deps match the code: each stage lists every project file its command imports.

The closure of a stage is walked with ``ast`` from its module (``python -m stages.<name>``): every ``import`` and
``from ... import`` anywhere in a file (function-level imports run too) that names a project module adds that
module's file. ``__init__.py`` files are not followed: ``ddpm/__init__.py`` re-exports the API for users, and a
stage that imports ``ddpm.app.config`` computes nothing with what the package's ``__init__`` imports.
``ddpm/app/tracking/`` is exempt, as dvc.yaml documents: it only mirrors results to MLflow.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ddpm", "stages")
EXEMPT = {f.relative_to(ROOT).as_posix() for f in (ROOT / "ddpm/app/tracking").glob("*.py")}
READS = {"ddpm/nn/kernels.py": {"ddpm/nn/kernels.c"}}  # code a module reads at run time (C it compiles)


def module_file(name: str) -> str | None:
    """'ddpm.app.config' -> 'ddpm/app/config.py' when it is a project module (a package -> None: not followed)."""
    path = Path(*name.split("."))
    if name.split(".")[0] in PACKAGES and (ROOT / path.with_suffix(".py")).is_file():
        return path.with_suffix(".py").as_posix()
    return None


def imports_of(rel: str) -> set[str]:
    """Project files imported by ``rel`` (a path relative to the repository root)."""
    package = rel.rsplit("/", 1)[0].replace("/", ".")
    out = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from . import x
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from ddpm import fid`: a submodule
        else:
            continue
        out |= {f for n in names if (f := module_file(n))}
    return out


def closure(module: str) -> set[str]:
    start = module_file(module)
    assert start, f"{module} is no project module"
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(imports_of(f) - seen)
    return seen | {r for f in seen for r in READS.get(f, ())}


def stages() -> dict[str, dict]:
    """Stage name -> its definition (``foreach``/``matrix`` stages: the ``do`` body or the stage itself)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: st.get("do", st) for name, st in dvc["stages"].items()}


def stage_module(stage: dict) -> str:
    m = re.search(r"python3?\s+-m\s+([\w.]+)", stage["cmd"])
    assert m, f"cannot find the module of {stage['cmd']!r}"
    return m.group(1)


def stage_closure(name: str, stage: dict) -> set[str]:
    """Project files a stage's command imports; `python -m stages.item` runs `stages.<name>` (by runpy)."""
    module = stage_module(stage)
    files = closure(module)
    if module == "stages.item":
        files |= closure(f"stages.{name}")
    return files


def code_deps(stage: dict) -> set[str]:
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]
    return {d for d in deps if d.endswith((".py", ".c"))}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_list_its_import_closure(name):
    stage = stages()[name]
    needed = stage_closure(name, stage) - EXEMPT
    listed = code_deps(stage)
    assert not needed - listed, f"dvc.yaml stage {name!r}: add to deps: {', '.join(sorted(needed - listed))}"
    assert not listed - needed - EXEMPT, (f"dvc.yaml stage {name!r}: deps not imported by the stage (an edit would "
                                          f"rerun it for nothing): {', '.join(sorted(listed - needed))}")


def test_closure_walker_sees_lazy_relative_and_submodule_imports():
    assert "ddpm/diffusion/samplers.py" in imports_of("ddpm/training/distributed.py")  # a function-level relative import
    assert "ddpm/training/distributed.py" in imports_of("stages/sample.py")  # `from ddpm import distributed as dist`
    assert "ddpm/app/names.py" in imports_of("ddpm/app/config.py")
    assert not any(f.endswith("__init__.py") for f in closure("stages.report"))


def test_report_code_is_not_a_training_dependency():
    """An edit to the report's code reruns the report, never a training or sampling stage."""
    report_only = {"ddpm/app/report/build.py", "ddpm/app/report/figures.py", "ddpm/app/results.py", "ddpm/app/report/templates.py"}
    report = stages()["report"]
    report_outs = {o if isinstance(o, str) else next(iter(o)) for key in ("outs", "metrics", "plots")
                   for o in report.get(key, [])}
    for name, stage in stages().items():
        downstream = any(str(d) in report_outs for d in stage.get("deps", []))  # e.g. track, after the report
        if name != "report" and not downstream:
            assert not stage_closure(name, stage) & report_only, name
