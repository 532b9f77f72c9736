"""dvc.yaml's dependencies are complete: every project module a stage runs (its command's module and
everything that module imports, at the top or inside a function, transitively) is a dependency of
that stage, as a file or inside a folder dependency. Changing any code a stage runs re-runs it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.fixtures_data import REPO

PACKAGES = ("dit_core", "ray_jobs", "pipelines")


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every project module ``path`` imports anywhere (lazy imports in functions too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def closure(module: str) -> set[Path]:
    """The files of ``module`` and of every project module it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        parents = name.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]  # importing a.b runs a/__init__.py
        todo += imported_modules(path, name)
    return set(seen.values())


def has_code(path: Path) -> bool:
    """False for an ``__init__.py`` that holds nothing but a docstring."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_runs(stage):
    spec = STAGES[stage]
    module = re.search(r"python -m (\S+)", spec["cmd"]).group(1)
    deps = [REPO / d for d in spec["deps"]]
    needed = {p for p in closure(module) if has_code(p)}
    assert REPO / "pipelines/common.py" in needed or stage == "prepare"  # the analysis sees imports
    missing = sorted(str(p.relative_to(REPO)) for p in needed
                     if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not depend on them"


def test_the_analysis_follows_lazy_and_relative_imports():
    """ray_jobs/sample.py imports dit_core.autoencoders inside a function and .model_source
    relatively: both must be found, or the check above could pass on an incomplete dvc.yaml."""
    files = {str(p.relative_to(REPO)) for p in closure("ray_jobs.sample")}
    assert {"dit_core/autoencoders.py", "ray_jobs/model_source.py", "ray_jobs/storage.py", "ray_jobs/runtime.py"} <= files
