"""Bad flags and values of every `dit` subcommand (issue 25, point 5): one line on stderr that
names the flag (or the --set item) and what it may be, exit status 2, no traceback, before any
work. `dit generate` reads tiny .pt checkpoints of ours: an eps model and a flow model.

The issue's cases run as `python -m pipelines.cli ...`, one process each; the other cases run in
one process that calls the same ``main`` once per command line (as `python -m` does: its exit
status, its stderr, a traceback if anything escapes), so that the module takes seconds, not minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_core.models import DiTConfig
from tests.conftest import REPO
from tests.fixtures_registry import CLASS_NAMES, TINY10, random_dit

FLOW = DiTConfig(**{**TINY10.to_dict(), "learn_sigma": False})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Two checkpoints in our layout: ``eps`` (the paper's objective) and ``flow``."""
    root = tmp_path_factory.mktemp("cli-errors")
    out = {}
    for name, config, diffusion in (("eps", TINY10, {}), ("flow", FLOW, {"objective": "flow", "learn_sigma": False})):
        path = root / f"{name}.pt"
        torch.save({"ema": random_dit(config).state_dict(), "model_config": config.to_dict(), "diffusion": diffusion,
                    "latents": {"class_names": CLASS_NAMES, "num_classes": 10}}, path)
        out[name] = str(path)
    out["out"] = str(root / "never-written")
    out["params"] = str(root / "params.yaml")
    Path(out["params"]).write_text("sample:\n  sampler: foo\n")
    out["garbage"] = str(root / "garbage.pt")
    Path(out["garbage"]).write_bytes(b"not a checkpoint")
    return out


ENV = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

# `python -m pipelines.cli` for each command line in argv[1] (JSON), in this one process: exit status and stderr
MANY = """
import contextlib, io, json, sys, traceback
from pipelines.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code or 0, err.getvalue()])
print(json.dumps(results))
"""


def dit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)


def dit_many(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", MANY, json.dumps(argvs)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, code, "", err) for argv, (code, err) in zip(argvs, json.loads(proc.stdout.splitlines()[-1]))]


def assert_refused(proc: subprocess.CompletedProcess, *says: str) -> None:
    """Exit 2, one line on stderr that says each of ``says``, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in says:
        assert text in lines[0], lines[0]


GENERATE = [   # flags after `dit generate --model <eps model> --labels 3 --out <a path never written>`
    (["--seeds", "1.5"], ["argument --seeds: '1.5' is not a seed"]),
    (["--labels", "3,10"], ["--labels 3,10: 10 is out of range: the model has 10 classes (0..9)"]),
    (["--labels", "3,eleven"], ["--labels 3,eleven: 'eleven' is not a class name of this model ('zero', ", "nor a class id 0..9"]),
    (["--num-steps", "0"], ["--num-steps 0: must be at least 1"]),
    (["--num-steps", "many"], ["--num-steps many: (str) is not a valid int"]),
    (["--guidance-scale", "-1"], ["--guidance-scale -1: must be >= 0"]),
    (["--sampler", "lms"], ["--sampler lms: is unknown; choose one of ("]),
    (["--sampler", "euler"], ["--sampler euler: does not fit this model: it was trained with objective 'eps', "
                              "whose samplers are ('ddpm', 'ddim', 'dpm-solver++'); choose one of them"]),
    (["--model", "/no/such/model.pt"], ["--model /no/such/model.pt: model '/no/such/model.pt' not found: expected an MLflow URI"]),
    (["--model", "{garbage}"], ["--model ", "garbage.pt is not a readable PyTorch checkpoint"]),
    (["--device", "gpu0"], ["argument --device: 'gpu0' is not a torch device"]),
    (["--out", "/proc/no-such/grid.png"], ["--out /proc/no-such/grid.png: cannot write to /proc/no-such"]),
]

COMMANDS = [   # every other subcommand; {out}: a path never written
    (["prepare", "--out", "{out}", "--set", "image_size=abc"], "--set image_size=abc: (str) is not a valid int"),
    (["prepare", "--out", "{out}", "--set", "no_such_key=1"], "--set no_such_key=1: expected KEY=VALUE with KEY one of ["),
    (["train-autoencoder", "--prepared", "{out}", "--out", "{out}", "--set", "warn_saturation_ratio=3"],
     "--set warn_saturation_ratio=3: train_autoencoder.warn_saturation_ratio=3.0 is not a share"),
    (["encode", "--prepared", "{out}", "--autoencoder", "{out}", "--out", "{out}", "--set", "batch_size=0"],
     "--set batch_size=0: encode.batch_size=0 must be a positive integer"),
    (["train", "--latents", "{out}", "--set", "steps=0"], "--set steps=0: train.steps=0 must be a positive integer"),
    (["train", "--latents", "{out}", "--params", "{out}.yaml"], "never-written.yaml not found: run from the project root or pass --params"),
    (["sample", "--model", "m", "--out", "{out}", "--num-images", "0"], "--num-images 0: num_images=0 must be at least 1"),
    (["sample", "--model", "m", "--out", "{out}", "--set", "guidance_scale=-2"], "--set guidance_scale=-2: must be >= 0"),
    (["sample", "--model", "m", "--out", "{out}", "--params", "{params}"], ["sample.sampler in /", "params.yaml: 'foo' is unknown; choose one of ("]),
    (["train-classifier", "--prepared", "{out}", "--out", "{out}", "--set", "lr=fast"], "--set lr=fast: (str) is not a valid float"),
    (["evaluate", "--samples", "{out}", "--prepared", "{out}", "--classifier", "{out}", "--metrics", "{out}", "--set",
      "features=pixels"], "evaluate.features='pixels'; choose one of"),
    (["export", "--model", "/no/such/dir", "{out}"], "dit export: error: --model /no/such/dir: model '/no/such/dir' not found"),
    (["export", "/no/such.pt", "{out}", "--num-heads", "x"], "argument --num-heads: invalid int value: 'x'"),
    (["import", "/no/such/dir", "{out}"], "no diffusers DiT transformer at /no/such/dir"),
    (["nonsense"], "dit: error: argument command: invalid choice: 'nonsense'"),
]


def _argv(models: dict[str, str], argv: list[str]) -> list[str]:
    return [a.replace("{out}", models["out"]).replace("{params}", models["params"]) for a in argv]


def _generate_argv(models: dict[str, str], flags: list[str]) -> list[str]:
    return ["generate", "--model", models["eps"], "--labels", "3", "--out", models["out"],
            *[f.replace("{garbage}", models["garbage"]) for f in flags]]


@pytest.fixture(scope="module")
def refused(models) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every command line of GENERATE and COMMANDS, run once in one process, by its argv."""
    argvs = [_generate_argv(models, flags) for flags, _ in GENERATE]
    argvs += [_argv(models, argv) for argv, _ in COMMANDS]
    return {tuple(p.args): p for p in dit_many(argvs)}


@pytest.mark.parametrize("flags, says", [
    (["--seeds", "-1"], ["argument --seeds: '-1' is not a seed: give an integer in [0, 2**63 - 1]"]),
    (["--zoom", "0"], ["argument --zoom: '0' is not a whole number of at least 1"]),
])
def test_generate_refuses_the_issues_values_in_its_own_process(models, flags, says):
    proc = dit(*_generate_argv(models, flags))
    assert_refused(proc, "dit generate: error: ", *says)
    assert not Path(models["out"]).exists()


def test_generate_names_the_sampler_flag_for_a_flow_model(models):
    proc = dit("generate", "--model", models["flow"], "--labels", "3", "--sampler", "ddim", "--out", models["out"])
    assert_refused(proc, "dit generate: error: --sampler ddim: does not fit this model: it was trained with objective "
                         "'flow', whose samplers are ('euler', 'heun', 'dpm-solver++')")
    assert "sample.sampler" not in proc.stderr


@pytest.mark.parametrize("flags, says", GENERATE, ids=[" ".join(f) for f, _ in GENERATE])
def test_generate_names_the_flag_of_a_bad_value(models, refused, flags, says):
    assert_refused(refused[tuple(_generate_argv(models, flags))], "dit generate: error: ", *says)
    assert not Path(models["out"]).exists()


@pytest.mark.parametrize("argv, says", COMMANDS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in COMMANDS])
def test_every_subcommand_names_a_bad_value(models, refused, argv, says):
    assert_refused(refused[tuple(_argv(models, argv))], *([says] if isinstance(says, str) else says))
    assert not Path(models["out"]).exists()
