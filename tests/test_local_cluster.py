"""``python -m ray_jobs.local_cluster CMD``: CMD's stages join one local Ray cluster, which stops
with CMD whatever its exit status; with ``RAY_ADDRESS`` set, CMD runs as is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.fixtures_data import REPO

# A "stage": joins the cluster of RAY_ADDRESS, runs a task there, asks the State API (the
# dashboard's) for the nodes, and says which cluster it was.
STAGE = """
import json, os, ray, ray.util.state
ray.init()
node = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote())
print(json.dumps({"env": os.environ["RAY_ADDRESS"], "gcs": ray.get_runtime_context().gcs_address, "node": node,
                  "state_api_nodes": len(ray.util.state.list_nodes())}), flush=True)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _reports(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.timeout(180)
def test_stages_share_one_cluster_that_stops_with_the_command(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    # two stages in a row, then the command fails: its exit status comes back
    cmd = f"{sys.executable} {script} && {sys.executable} {script} && exit 3"
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.local_cluster", "sh", "-c", cmd], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 3, proc.stderr[-3000:]
    first, second = _reports(proc.stdout)
    assert first["env"] == first["gcs"] == second["gcs"], (first, second)   # both joined the one cluster
    assert first["node"] == second["node"]
    assert first["state_api_nodes"] == 1     # the State API answers: the cluster runs the dashboard
    host, port = first["gcs"].rsplit(":", 1)
    with pytest.raises(OSError):             # and the cluster is gone with the command
        socket.create_connection((host, int(port)), timeout=5).close()


def test_a_set_ray_address_is_used_as_is(tmp_path):
    env = {**_env(), "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.local_cluster", "--", sys.executable, "-c",
                           "import os, sys; print(os.environ['RAY_ADDRESS']); sys.exit(5)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5 and proc.stdout.strip() == "127.0.0.1:1", proc.stderr
    assert "local Ray cluster" not in proc.stderr


def test_without_a_command_it_says_how_to_call_it():
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.local_cluster"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "dvc repro" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.local_cluster", "no-such-command-7731", "repro"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 127 and "'no-such-command-7731' not found" in proc.stderr, proc.stderr
    assert "local Ray cluster" not in proc.stderr     # refused before a cluster was started
