"""One contract between the stages (``dit_core/contract.py``), read from the imports with ``ast``:
no other module of the package spells one of its names as a string constant of its own, and no
job or stage module imports another job's or stage's module (for a name or a helper): a stage
imports its own job, the contract, and the shared modules (storage, model_source, ...) only."""

from __future__ import annotations

import ast
from pathlib import Path

from dit_core import contract
from tests.conftest import REPO

PACKAGE = ("dit_core", "ray_jobs", "pipelines")
CONTRACT = "dit_core/contract.py"
JOBS = {"ray_jobs.encode", "ray_jobs.sample", "ray_jobs.train", "ray_jobs.features"}
STAGES = {f"pipelines.{p.stem}" for p in (REPO / "pipelines").glob("*.py")} - {"pipelines.__init__", "pipelines.common", "pipelines.cli"}
# The job a stage runs: the one job module it may import.
OWN_JOB = {"pipelines.encode": "ray_jobs.encode", "pipelines.sample": "ray_jobs.sample",
           "pipelines.train": "ray_jobs.train", "pipelines.evaluate": "ray_jobs.features"}


def contract_names() -> dict[str, str]:
    return {k: v for k, v in vars(contract).items() if k.isupper() and isinstance(v, str)}


def string_constants(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(name, value, line) of every assignment of a string literal to a name, tuples unpacked."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            pairs = []
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += zip(target.elts, node.value.elts)
                else:
                    pairs.append((target, node.value))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs = [(node.target, node.value)]
        else:
            continue
        for target, value in pairs:
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.append((target.id, value.value, node.lineno))
    return found


def redefinitions(source: str, path: str, names: dict[str, str]) -> list[str]:
    """Where ``source`` defines a contract name, or a constant (an upper-case name) holding a
    contract value, as a string literal of its own."""
    values = {v: k for k, v in names.items()}
    out = []
    for name, value, line in string_constants(ast.parse(source, path)):
        if name in names or (name.isupper() and value in values):
            out.append(f"{path}:{line}: {name} = {value!r} (use dit_core.contract.{name if name in names else values[value]})")
    return out


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported_modules(source: str, path: str, package: str) -> set[str]:
    """The package's modules ``source`` imports (``from . import storage`` included), lazy ones too."""
    out = set()
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGE}


def forbidden_imports(module: str, imports: set[str]) -> list[str]:
    """The job or stage modules ``module`` (a job or a stage) may not import."""
    allowed = {module, OWN_JOB.get(module, "")}
    return sorted(m for m in imports if m in (JOBS | STAGES) - allowed)


def package_files() -> list[Path]:
    return sorted(p for folder in PACKAGE for p in (REPO / folder).rglob("*.py"))


def test_no_module_defines_a_contract_name_but_the_contract() -> None:
    names = contract_names()
    assert {"SAMPLE_CONFIG_FILE", "MODEL_CONFIG_FILE", "CLASSIFIER_CONFIG_FILE", "LATENT_STATS_FILE"} <= set(names)
    assert len(set(names.values())) == len(names), "two contract names share a value"
    found = [line for path in package_files() if path.relative_to(REPO).as_posix() != CONTRACT
             for line in redefinitions(path.read_text(), str(path.relative_to(REPO)), names)]
    assert found == [], "\n".join(found)


def test_the_check_sees_a_redefinition() -> None:
    names = contract_names()
    planted = 'STATS = "stats.json"\nCONFIG_FILE, OTHER = "dit.json", "x"\nCLASSIFIER_CONFIG_FILE: str = "c.json"\nok = "stats.json"\n'
    assert [line.split(":")[1] for line in redefinitions(planted, "planted.py", names)] == ["1", "2", "3"]


def test_no_job_or_stage_imports_another() -> None:
    found = []
    for path in package_files():
        module = module_name(path)
        if module in JOBS or module in STAGES:
            package = module.rsplit(".", 1)[0]
            bad = forbidden_imports(module, imported_modules(path.read_text(), str(path), package))
            found += [f"{path.relative_to(REPO)} imports {m}" for m in bad]
    assert JOBS <= {module_name(p) for p in package_files()} and "pipelines.evaluate" in STAGES
    assert found == [], "\n".join(found)


def test_the_check_sees_a_job_imported_by_another() -> None:
    planted = "from ray_jobs.sample import baseline_output\nfrom .features import feature_pass\nfrom . import storage\n"
    assert forbidden_imports("ray_jobs.encode", imported_modules(planted, "planted.py", "ray_jobs")) == [
        "ray_jobs.features", "ray_jobs.sample"]
    lazy = "def f():\n    from ray_jobs.sample import load_autoencoder_for\n    from ray_jobs.features import feature_pass\n"
    assert forbidden_imports("pipelines.evaluate", imported_modules(lazy, "planted.py", "pipelines")) == ["ray_jobs.sample"]
    assert forbidden_imports("pipelines.sample", imported_modules("import pipelines.train\n", "planted.py", "pipelines")) == [
        "pipelines.train"]
