"""The Ray cluster launcher config is one `ray up` accepts, ships this checkout, installs it from the
lock and fails loudly when the install fails, and gives every node the tracking server."""

from __future__ import annotations

import json
import os

import yaml

from tests.fixtures_data import REPO

CONFIG = REPO / "configs/aws-gpu-cluster.yaml"


def test_launcher_config_is_valid_for_ray_up():
    import jsonschema
    import ray

    schema = json.loads(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler/ray-schema.json")).read())
    jsonschema.validate(yaml.safe_load(CONFIG.read_text()), schema)


def test_launcher_installs_the_locked_project_and_fails_loudly():
    cfg = yaml.safe_load(CONFIG.read_text())
    mounts = cfg["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local == ".")
    setup = cfg["setup_commands"]
    assert not any("|| true" in c or "; true" in c for c in setup), setup
    assert any(f"-c {project}/constraints.txt" in c and f"-e {project}" in c for c in setup), setup
    assert (REPO / "constraints.txt").is_file()  # what the mount ships
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert "MLFLOW_TRACKING_URI=http" in start and "dit-venv/bin/ray start" in start, start
