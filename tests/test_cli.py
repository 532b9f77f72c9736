"""The `dit` command ([project.scripts]): a subcommand per stage and job whose --help shows the
settings' defaults from their dataclass, and `dit generate` writing a grid from a registered model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.fixtures_registry import IMAGE_SIZE, NAME, register_tiny_model

DIT = str(Path(sys.executable).with_name("dit"))


def dit(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DIT, *args], cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)


def test_every_stage_and_job_has_a_subcommand_with_its_defaults():
    from dit_core import settings
    from ray_jobs.sample import SampleConfig
    from ray_jobs.train import TrainConfig

    top = dit("--help")
    assert top.returncode == 0
    for name in ("prepare", "train", "sample", "evaluate", "generate", "export"):
        assert f"  {name} " in top.stdout
    train = dit("train", "--help")
    assert train.returncode == 0 and "--latents" in train.stdout
    assert f"lr (float): {settings.defaults(TrainConfig)['lr']}" in train.stdout
    sample = dit("sample", "--help")
    assert sample.returncode == 0 and f"(default: {settings.defaults(SampleConfig)['num_steps']})" in sample.stdout
    generate = dit("generate", "--help")
    assert generate.returncode == 0 and f"else (default: {SampleConfig.num_steps})" in " ".join(generate.stdout.split())
    for name in ("prepare", "evaluate", "export"):
        assert dit(name, "--help").returncode == 0, name
    assert dit("nonsense").returncode == 2


@pytest.mark.timeout(300)
def test_generate_writes_a_grid_from_the_registered_model(tmp_path):
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        register_tiny_model(tmp_path)
    out = tmp_path / "grid.png"
    proc = dit("generate", "--model", f"models:/{NAME}@champion", "--labels", "3,seven", "--seeds", "0,1", "--out", str(out),
               cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = np.asarray(Image.open(out).convert("RGB"))
    side = 4 * (2 * (IMAGE_SIZE + 1) + 1)   # 2 x 2 images, 1-pixel gaps, zoom 4
    assert grid.shape == (side, side, 3) and grid.std() > 5
    bad = dit("generate", "--model", f"models:/{NAME}@champion", "--labels", "eleven", cwd=tmp_path, env=env, timeout=240)
    assert bad.returncode == 2 and "'eleven' is not a class name" in bad.stderr
