"""Proof of recovery, the parts that must fail loudly instead of guessing: a registry error is not
"no alias holder", an architecture the weights do not record is not guessed, and settings that
cannot run (a fraction of a GPU per NCCL rank, zero images) are refused before any work starts."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

import pytest
import torch

from dit_core.models import DiT, DiTConfig, config_from_state_dict, load_checkpoint
from ray_jobs import tracking
from ray_jobs.model_source import load_bundle
from ray_jobs.sample import SampleConfig
from ray_jobs.train import TrainConfig
from tests.conftest import free_port

NAME = "reliability-model"


# --------------------------------------------------------------------------------------------
# The champion alias moves only on what the registry really says
# --------------------------------------------------------------------------------------------

def registry_with_versions(count: int) -> Any:
    """``count`` versions of ``NAME``, each scored FID 10 with the same feature network."""
    from mlflow import MlflowClient

    tracking.configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    for i in range(count):
        version = client.create_model_version(NAME, source=f"/nowhere/model-{i}").version
        tracking.tag_version(NAME, str(version), {tracking.FID_TAG: "10", tracking.FID_FEATURES_TAG: "inception"})
    return client


def test_absent_alias_means_no_holder_and_the_alias_moves(mlflow_sqlite):
    client = registry_with_versions(1)
    assert tracking.alias_holder(NAME, "champion") is None
    out = tracking.promote_if_better(NAME, "1", 10.0, "inception")
    assert out["moved"] and out["previous"] is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_an_unreadable_holder_raises_and_the_alias_stays(mlflow_sqlite):
    """A damaged registry: the alias row points at version 1, whose row is gone (SQL registries keep
    no foreign key from aliases to versions). MLflow raises RESOURCE_DOES_NOT_EXIST on reading the
    holder; that is not "no holder", and moving the alias would hide the damage."""
    from mlflow.exceptions import MlflowException

    client = registry_with_versions(2)
    client.set_registered_model_alias(NAME, "champion", "1")
    db = mlflow_sqlite[len("sqlite:///"):]
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM model_versions WHERE name = ? AND version = 1", (NAME,))
    con.close()
    with pytest.raises(MlflowException, match="holds alias 'champion'.*not moved.*version=1.* not found") as err:
        tracking.promote_if_better(NAME, "2", 1.0, "inception")  # a far better FID: only the error stops it
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert client.get_registered_model(NAME).aliases == {"champion": 1}


def test_an_unreachable_registry_is_an_error_named_as_the_read(mlflow_sqlite, monkeypatch):
    """A registry server that refuses connections: the read's error comes back, naming the alias
    (before, it was swallowed and the write that followed failed in its place)."""
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracking.configure_tracking(dead, dead)
    try:
        with pytest.raises(MlflowException, match="holds alias 'champion'.*not moved.*Connection refused"):
            tracking.promote_if_better(NAME, "2", 1.0, "inception")
    finally:
        tracking.configure_tracking(mlflow_sqlite, mlflow_sqlite)  # MLflow keeps the URI process-wide


# --------------------------------------------------------------------------------------------
# The number of attention heads is never guessed
# --------------------------------------------------------------------------------------------

CUSTOM = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=128, depth=1, num_heads=4, num_classes=3)


def random_dit(config: DiTConfig) -> DiT:
    """Random (not adaLN-Zero) weights, so that the attention's head split changes the output."""
    g = torch.Generator().manual_seed(0)
    model = DiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def outputs(model: DiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        return model.eval()(x, torch.tensor([10, 800]), torch.tensor([0, 2]))


def test_heads_of_a_custom_width_are_refused_not_guessed(tmp_path):
    model = random_dit(CUSTOM)
    with pytest.raises(ValueError, match=r"width \(hidden_size\) 128.*model_config.*num_heads"):
        config_from_state_dict(model.state_dict())
    assert config_from_state_dict(model.state_dict(), num_heads=4) == replace(CUSTOM, class_dropout_prob=0.1)

    bare = tmp_path / "custom.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match=r"custom\.pt.*width \(hidden_size\) 128"):
        load_checkpoint(bare)
    torch.testing.assert_close(outputs(load_checkpoint(bare, num_heads=4)), outputs(model))
    torch.testing.assert_close(outputs(load_checkpoint(bare, DiT(CUSTOM))), outputs(model))
    assert not torch.allclose(outputs(load_checkpoint(bare, num_heads=2)), outputs(model)), "heads matter"

    with pytest.raises(ValueError, match=r"bare state dict.*width \(hidden_size\) 128.*model_config"):
        load_bundle(str(bare))
    bundle = load_bundle(str(bare), num_heads=4)
    assert bundle.config.num_heads == 4
    torch.testing.assert_close(outputs(bundle.build_model()), outputs(model))


def test_checkpoints_with_their_config_and_preset_widths_load_as_before(tmp_path):
    model = random_dit(CUSTOM)
    ours = tmp_path / "ours.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "model_config": CUSTOM.to_dict()}, ours)
    assert load_checkpoint(ours).config == CUSTOM
    torch.testing.assert_close(outputs(load_checkpoint(ours)), outputs(model))
    assert load_bundle(str(ours)).config == CUSTOM

    for width, heads in ((384, 6), (768, 12), (1024, 16), (1152, 16)):  # the paper's presets
        preset = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=width, depth=1, num_heads=heads, num_classes=3)
        assert config_from_state_dict(DiT(preset).state_dict()).num_heads == heads


# --------------------------------------------------------------------------------------------
# Settings that cannot run are refused before any work
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [0.5, 0.25, 1.5, 0, -1])
def test_fractional_gpus_per_worker_are_refused(gpus):
    with pytest.raises(ValueError, match=rf"train\.gpus_per_worker={gpus}.*NCCL.*use 1"):
        TrainConfig(latents="unused", gpus_per_worker=gpus).validate()
    with pytest.raises(ValueError, match="gpus_per_worker"):
        TrainConfig(latents="unused", gpus_per_worker=gpus, use_gpu=True).validate()


def test_whole_gpus_per_worker_and_cpu_training_are_accepted():
    for gpus in (1, 1.0, 2):
        TrainConfig(latents="unused", gpus_per_worker=gpus).validate()
    TrainConfig(latents="unused", gpus_per_worker=0.5, use_gpu=False).validate()  # no GPU is asked for


def test_zero_images_are_refused_before_sampling(tmp_path):
    from ray_jobs.sample import run

    with pytest.raises(ValueError, match="num_images=0 must be at least 1"):
        SampleConfig(model="unused", output=str(tmp_path), num_images=0)
    with pytest.raises(ValueError, match="num_images=0 must be at least 1"):  # before the model is even looked for
        run(SampleConfig(model=str(tmp_path / "no-such-model"), output=str(tmp_path / "out"), num_images=0))
    assert not (tmp_path / "out").exists()
