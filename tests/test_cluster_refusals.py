"""Refusals before any work starts, each naming the setting and what to use instead: a local path
for data that crosses hosts, a tracking URI other hosts cannot reach, a remote cluster without a
shared store. (The same checks on a real two-host cluster: tests/test_two_hosts.py.)"""

from __future__ import annotations

import pytest
import yaml

from ray_jobs import runtime
from tests.fixtures_data import REPO

NOWHERE = "http://127.0.0.1:9"  # a dashboard address nothing answers: a refusal must come before any connection


def params_file(tmp_path, **sections) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_local_paths_are_refused_across_hosts(monkeypatch):
    monkeypatch.delenv(runtime.SHARED_FS_ENV, raising=False)
    with pytest.raises(ValueError, match=r"train.storage_path='checkpoints' is a local path, but the Ray cluster has 2 hosts .*s3://"):
        runtime.require_shared({"train.latents": "s3://b/latents", "train.storage_path": "checkpoints"}, 2, "the Ray cluster")
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='sqlite:///x/mlflow.db' is a file on this host.*mlflow server"):
        runtime.require_shared({"train.latents": "s3://b/l"}, 2, "the Ray cluster", "sqlite:///x/mlflow.db")
    for uri in ("file:///tmp/mlruns", "mlruns"):
        with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
            runtime.require_shared({}, 3, "the Ray cluster", uri)
    # one host (several raylets on one machine), a shared filesystem, or S3 and a server: accepted
    runtime.require_shared({"train.latents": "data/latents"}, 1, "the Ray cluster", "sqlite:///x")
    runtime.require_shared({"train.latents": "s3://b/l"}, 2, "the Ray cluster", "http://10.0.0.1:5000")
    monkeypatch.setenv(runtime.SHARED_FS_ENV, "1")
    runtime.require_shared({"train.latents": "data/latents"}, 2, "the Ray cluster", "sqlite:///x")


def test_remote_stage_without_a_store_is_refused(tmp_path, monkeypatch):
    from pipelines import train

    monkeypatch.setenv("RAY_ADDRESS", NOWHERE)
    with pytest.raises(ValueError, match=r"store.root is null, but stage train runs as a Ray job on the remote cluster at http://127.0.0.1:9.*-S store.root=s3://"):
        train.main(["--latents", "data/latents", "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "dit"),
                    "--params", params_file(tmp_path)])


def test_remote_stage_with_a_local_tracking_file_is_refused(tmp_path, monkeypatch):
    from pipelines import train

    monkeypatch.setenv("RAY_ADDRESS", NOWHERE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(runtime.SHARED_FS_ENV, raising=False)
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='sqlite:///.*' is a file on this host, but stage train runs as a Ray job"):
        train.main(["--latents", "s3://bucket/latents", "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "dit"),
                    "--params", params_file(tmp_path, store={"root": "s3://bucket/dit"})])


def test_remote_stage_with_a_local_input_is_refused(tmp_path, monkeypatch):
    """An input given as a local folder that holds no pointer to the store (an earlier stage that ran
    without store.root) cannot be read by the cluster."""
    from pipelines import encode

    monkeypatch.setenv("RAY_ADDRESS", NOWHERE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    (tmp_path / "prepared").mkdir()
    with pytest.raises(ValueError, match=rf"encode --prepared='{tmp_path}/prepared' is a local path, but stage encode runs as a Ray job"):
        encode.main(["--prepared", str(tmp_path / "prepared"), "--autoencoder", "s3://bucket/dit/models/autoencoder",
                     "--out", "data/latents", "--params", params_file(tmp_path, store={"root": "s3://bucket/dit"})])


def test_remote_prepare_of_a_local_folder_is_refused(tmp_path, monkeypatch):
    from pipelines import prepare

    monkeypatch.setenv("RAY_ADDRESS", NOWHERE)
    params = params_file(tmp_path, store={"root": "s3://bucket/dit"}, prepare={"source": "imagefolder", "path": str(tmp_path / "images")})
    with pytest.raises(ValueError, match=r"prepare.path='.*/images' is a local path, but stage prepare runs as a Ray job"):
        prepare.main(["--out", str(tmp_path / "prepared"), "--params", params])
    assert not (tmp_path / "prepared").exists()


def test_pointers_are_followed(tmp_path):
    """A stage output kept in the store leaves a pointer here; the next stage reads the URI it names."""
    from dit_core.contract import LOCATION_FILE
    from pipelines.common import in_store, locate

    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / LOCATION_FILE).write_text('{"uri": "s3://b/dit/data/latents"}')
    assert locate(str(tmp_path / "latents")) == "s3://b/dit/data/latents"
    assert locate(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    assert in_store("data/latents", "s3://b/dit") == "s3://b/dit/data/latents"
    assert in_store("s3://other/x", "s3://b/dit") == "s3://other/x" and in_store("data/x", None) == "data/x"


def test_outputs_inside_a_jobs_temporary_working_dir_are_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the job in a temporary copy of the project that Ray
    deletes: checkpoints, samples or a tracking file written there would be lost."""
    work = tmp_path / "ray_pkg"
    work.mkdir()
    monkeypatch.chdir(work)
    runtime.require_persistent({"train.storage_path": "checkpoints"}, f"sqlite:///{work}/mlflow.db")  # not in a job: fine
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    with pytest.raises(ValueError, match=r"train.storage_path='checkpoints' is inside this Ray job's temporary copy of the working dir"):
        runtime.require_persistent({"train.storage_path": "checkpoints"})
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI is 'sqlite:///.*ray_pkg/mlflow.db', inside this Ray job's temporary"):
        runtime.require_persistent({}, f"sqlite:///{work}/mlflow.db")
    runtime.require_persistent({"train.storage_path": "s3://b/ckpt", "sample output": str(tmp_path / "kept")},
                               "http://10.0.0.1:5000")
