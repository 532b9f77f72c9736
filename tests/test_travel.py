"""Issue 24, point 4: names that follow the data. A model trained on an image folder named
`flowers` is registered as `dit-flowers`, beside (never in) the digits' registry entry. The rest of
issue 24 (the model as a DVC output, push and pull, experiments in temporary copies and queues,
the diffusers export) reads the default pipeline's one end-to-end run: tests/test_dvc_stages.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fixtures_data import REPO, run, stage_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# small enough for two shared cores: the name is under test here, not the quality
TINY = {
    "train_autoencoder": {"steps": 5, "batch_size": 8},
    "train": {"steps": 10, "batch_size": 16, "log_every": 5, "checkpoint_every": 10, "warmup_steps": 2,
              "model": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 4, "class_embed_init_std": 1.0}},
}


def registry(folder: Path):
    from mlflow import MlflowClient

    db = f"sqlite:///{folder / 'mlflow.db'}"
    return MlflowClient(tracking_uri=db, registry_uri=db)


def _flowers(folder: Path, per_class: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate(("rose", "tulip")):
        (folder / colour).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] += 180
            Image.fromarray(pixels).save(folder / colour / f"{i}.png")


def test_a_model_of_a_folder_named_flowers_is_registered_as_dit_flowers(tmp_path):
    """prepare records the data set's name; the train stage registers under dit-<name>."""
    _flowers(tmp_path / "images" / "flowers")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["prepare"].update({"source": "imagefolder", "path": str(tmp_path / "images" / "flowers"), "val_fraction": 0.2})
    params["train"]["storage_path"] = str(tmp_path / "ckpt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DVC_ROOT": str(tmp_path)})
    env.pop("MLFLOW_REGISTRY_URI", None)
    p = ["--params", str(tmp_path / "params.yaml")]
    run(["python", "-m", "pipelines.prepare", "--out", str(tmp_path / "prepared"), *p], REPO, env)
    assert json.loads((tmp_path / "prepared/manifest.json").read_text())["dataset"] == "flowers"
    run(["python", "-m", "pipelines.train_autoencoder", "--prepared", str(tmp_path / "prepared"), "--out",
         str(tmp_path / "autoencoder"), "--metrics", str(tmp_path / "autoencoder.json"), *p], REPO, env)
    run(["python", "-m", "pipelines.encode", "--prepared", str(tmp_path / "prepared"), "--autoencoder",
         str(tmp_path / "autoencoder"), "--out", str(tmp_path / "latents"), *p], REPO, env)
    run(["python", "-m", "pipelines.train", "--latents", str(tmp_path / "latents"), "--out", str(tmp_path / "dit"),
         "--metrics", str(tmp_path / "train.json"), *p], REPO, env)
    trained = json.loads((tmp_path / "dit/trained.json").read_text())
    assert trained["registered_model"] == "dit-flowers" and trained["name"].startswith("dit-flowers-")
    client = registry(tmp_path)
    assert [str(v.version) for v in client.search_model_versions("name = 'dit-flowers'")] == [trained["version"]]
    assert client.search_model_versions("name = 'dit-digits'") == []
