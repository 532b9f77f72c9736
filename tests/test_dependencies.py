"""The dependencies say what the code uses: every third-party import of the package (dit_core,
ray_jobs, pipelines) is in pyproject's ``dependencies``, every one of the tests in those or the
``dev`` extra (what ``make test`` installs), every one of the benchmarks in those or ``bench``;
and nothing is declared that nothing uses, except the few used by name rather than by import,
each with its reason. Imports are read with ``ast``, so lazy imports inside functions count."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO

PACKAGE = ("dit_core", "ray_jobs", "pipelines")
IMPORT_TO_DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "pytorch_fid": "pytorch-fid"}
# Declared and used by name, not by import: (section, distribution) -> why.
USED_BY_NAME = {
    ("dependencies", "dvc"): "the `dvc` command runs the stages of dvc.yaml (`make run` is `dvc repro`)",
    ("dependencies", "dvc-s3"): "DVC's s3:// remotes and outputs",
    ("dependencies", "boto3"): "MLflow's s3:// artifact store imports it",
    ("dev", "pytest-timeout"): "the `timeout` of pyproject's pytest options and @pytest.mark.timeout",
    ("dev", "moto"): "the `moto_server` command (tests/conftest.py's S3 server)",
}


def distribution(requirement: str) -> str:
    """``"ray[data,train]>=2.40"`` -> ``"ray"``: the normalised distribution name."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"pyproject requirement {requirement!r} has no distribution name"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"dependencies": {distribution(r) for r in project["dependencies"]}}
    out |= {name: {distribution(r) for r in reqs} for name, reqs in project.get("optional-dependencies", {}).items()}
    return out


def third_party_imports(folder: str) -> dict[str, set[str]]:
    """Distribution name -> the files of ``folder`` that import it (absolute imports that are neither
    the standard library, nor this project's packages, nor a module beside the importing file)."""
    local = set(PACKAGE) | {"tests", "benchmarks"}
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        siblings = {p.stem for p in path.parent.glob("*.py")}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top in siblings or top == "__future__":
                    continue
                dist = IMPORT_TO_DISTRIBUTION.get(top, re.sub(r"[-_.]+", "-", top).lower())
                found.setdefault(dist, set()).add(str(path.relative_to(REPO)))
    return found


def merged(*maps: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in maps:
        for k, v in m.items():
            out.setdefault(k, set()).update(v)
    return out


def test_the_import_reader_sees_what_the_code_imports() -> None:
    package = merged(*(third_party_imports(p) for p in PACKAGE))
    assert {"torch", "numpy", "ray", "mlflow", "pillow", "pyyaml", "pandas", "safetensors"} <= set(package)
    assert "ray_jobs/mlflow_model.py" in package["pandas"]          # a module-level import
    assert "dit_core/metrics.py" in package["pytorch-fid"]           # an import inside a function
    assert "os" not in package and "dit-core" not in package


def test_every_import_is_declared_where_its_code_is_installed() -> None:
    deps = declared()
    assert "dev" in deps and "bench" in deps, "pyproject declares the dev (tests) and bench (benchmarks) extras"
    package = merged(*(third_party_imports(p) for p in PACKAGE))
    missing = {d: sorted(f)[:3] for d, f in package.items() if d not in deps["dependencies"]}
    assert not missing, f"the package imports {missing} (distribution: files); add them to pyproject's dependencies"
    tests = third_party_imports("tests")
    missing = {d: sorted(f)[:3] for d, f in tests.items() if d not in deps["dependencies"] | deps["dev"]}
    assert not missing, f"the tests import {missing}; add them to pyproject's dev extra (what `make test` installs)"
    bench = third_party_imports("benchmarks")
    missing = {d: sorted(f)[:3] for d, f in bench.items() if d not in deps["dependencies"] | deps["dev"] | deps["bench"]}
    assert not missing, f"the benchmarks import {missing}; add them to pyproject's bench extra"


def test_nothing_is_declared_that_nothing_uses() -> None:
    deps = declared()
    package = merged(*(third_party_imports(p) for p in PACKAGE))
    users = {"dependencies": package, "dev": third_party_imports("tests"), "bench": third_party_imports("benchmarks")}
    for section, names in deps.items():
        assert section in users, f"pyproject's extra {section!r} is not one this test knows (dev, bench)"
        unused = sorted(n for n in names if n not in users[section] and (section, n) not in USED_BY_NAME)
        assert not unused, (f"pyproject's {section} declare {unused}, which no {section} code imports; remove them, "
                            "or (used by name) add them to USED_BY_NAME with the reason")
    stale = sorted(k for k in USED_BY_NAME if k[1] not in deps.get(k[0], set()))
    assert not stale, f"USED_BY_NAME lists {stale}, which pyproject no longer declares"


def test_the_lock_pins_every_declared_distribution() -> None:
    """constraints.txt (the lock ``make install`` uses) pins each declared distribution."""
    pinned = {distribution(line.split("==")[0]) for line in (REPO / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.lstrip().startswith("#")}
    unpinned = sorted(set().union(*declared().values()) - pinned)
    assert not unpinned, f"constraints.txt pins no version of {unpinned}; regenerate it (its header says how)"
    makefile = (REPO / "Makefile").read_text()
    assert '-e ".[dev]"' in makefile, "make install installs the dev extra: the tests' imports"
