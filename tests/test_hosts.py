"""The two-hosts fixture (tests/hosts.py): a Ray job submitted from the head host's side runs a
task on the worker host, which sees none of the head's local files and reaches S3 and MLflow only
over the network; the worker host can be killed and brought back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hosts import TwoHosts, netns_pids, two_hosts  # noqa: F401  (two_hosts: the fixture)

BIN = Path(sys.executable).parent

PROBE = r'''
import json, os, sys, tempfile

import ray

args = json.loads(sys.argv[1])
ray.init()


@ray.remote(num_cpus=1, resources={"worker_host": 0.01})
def probe(args):
    out = {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "data_listing": sorted(os.listdir(args["data_dir"])) if os.path.isdir(args["data_dir"]) else None,
        "data_marker_visible": os.path.exists(args["data_marker"]),
        "tmp_marker_visible": os.path.exists(args["tmp_marker"]),
        "mlflow_db_size": os.path.getsize(args["mlflow_db"]) if os.path.exists(args["mlflow_db"]) else None,
        "env": {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")},
    }
    if args["mode"] == "full":
        import boto3
        import mlflow

        boto3.client("s3").put_object(Bucket=args["bucket"], Key=args["key"], Body=json.dumps(out).encode())
        mlflow.set_experiment(args["experiment"])
        with mlflow.start_run(run_name="probe") as run:
            mlflow.log_param("node_ip", out["node_ip"])
            path = os.path.join(tempfile.mkdtemp(), "probe.txt")
            with open(path, "w") as f:
                f.write(args["token"])
            mlflow.log_artifact(path)
            out["run_id"] = run.info.run_id
            out["artifact_uri"] = run.info.artifact_uri
    return out


result = ray.get(probe.remote(args))
result["driver_ip"] = ray.util.get_node_ip_address()
print("PROBE-RESULT " + json.dumps(result), flush=True)
'''


def submit_probe(hosts: TwoHosts, workdir: Path, args: dict) -> dict:
    """`ray job submit` from the head host's side (the "laptop"), with the probe as working dir."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "probe.py").write_text(PROBE)
    sid = f"probe-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--submission-id", sid, "--working-dir", str(workdir),
         "--", "python", "probe.py", json.dumps(args)],
        env=hosts.driver_env(), capture_output=True, text=True, timeout=180,
    )
    status = hosts.job(sid)["status"]
    assert proc.returncode == 0 and status == "SUCCEEDED", f"{status}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lines = [ln for ln in hosts.job_logs(sid).splitlines() if ln.startswith("PROBE-RESULT ")]
    assert lines, proc.stdout[-4000:]
    return json.loads(lines[-1][len("PROBE-RESULT "):])


def probe_args(hosts: TwoHosts, mode: str, **extra) -> dict:
    root = hosts.project_root
    return {"mode": mode, "data_dir": str(root / "data"), "mlflow_db": str(root / "mlflow.db"),
            "data_marker": "", "tmp_marker": "", **extra}


@pytest.mark.timeout(300)
def test_job_on_worker_host_shares_only_s3_and_mlflow(two_hosts, tmp_path):
    hosts = two_hosts
    token = uuid.uuid4().hex[:12]
    tmp_marker = hosts.tmp / f"head-only-{token}"
    data_marker = hosts.project_root / "data" / f".hosts-marker-{token}"
    tmp_marker.write_text(token)
    data_marker.write_text(token)  # a uniquely named file beside whatever the project has there
    try:
        args = probe_args(hosts, "full", data_marker=str(data_marker), tmp_marker=str(tmp_marker),
                          bucket=hosts.bucket, key=f"probe/{token}.json", experiment=f"hosts-{token}", token=token)
        out = submit_probe(hosts, tmp_path / "job", args)
    finally:
        data_marker.unlink(missing_ok=True)
        tmp_marker.unlink(missing_ok=True)

    # Where things ran: the driver on the head host, the task on the worker host.
    assert out["driver_ip"] == hosts.host_ip
    assert out["node_ip"] == hosts.worker_ip
    assert out["node_id"] == hosts.worker_node_id
    # The worker host sees none of the head host's local files.
    assert out["data_listing"] == []
    assert not out["data_marker_visible"] and not out["tmp_marker_visible"]
    if (hosts.project_root / "mlflow.db").is_file():
        assert out["mlflow_db_size"] == 0
    assert out["env"] == {"AWS_ENDPOINT_URL": hosts.s3_endpoint, "MLFLOW_TRACKING_URI": hosts.mlflow_uri}

    # What it wrote to S3, read back from the driver's side.
    s3 = hosts.s3_client()
    body = json.loads(s3.get_object(Bucket=hosts.bucket, Key=f"probe/{token}.json")["Body"].read())
    assert body["node_ip"] == hosts.worker_ip

    # Its MLflow run, over HTTP; the artifact went through the server (mlflow-artifacts:) into S3.
    import mlflow

    run = hosts.mlflow_client().get_run(out["run_id"])
    assert run.data.params["node_ip"] == hosts.worker_ip
    assert out["artifact_uri"].startswith("mlflow-artifacts:")
    local = mlflow.artifacts.download_artifacts(run_id=out["run_id"], artifact_path="probe.txt",
                                                dst_path=str(tmp_path / "dl"), tracking_uri=hosts.mlflow_uri)
    assert Path(local).read_text() == token
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=hosts.bucket, Prefix="mlartifacts/").get("Contents", [])]
    assert any(k.endswith(f"{out['run_id']}/artifacts/probe.txt") for k in keys), keys


@pytest.mark.timeout(300)
def test_worker_host_killed_and_restarted(two_hosts, tmp_path):
    hosts = two_hosts
    [old] = hosts.worker_node_ids()
    killed = hosts.kill_worker_host()
    assert killed and netns_pids(hosts.ns) == []
    seconds = hosts.wait_node_state(old, "DEAD", timeout=60)
    assert seconds < 60
    assert hosts.worker_node_ids() == []
    assert hosts.head_node_id in {n["node_id"] for n in hosts.alive_nodes()}

    new = hosts.start_worker_host()
    assert new != old and hosts.worker_node_ids() == [new]
    out = submit_probe(hosts, tmp_path / "job", probe_args(hosts, "where"))
    assert out["node_id"] == new and out["node_ip"] == hosts.worker_ip
    assert out["data_listing"] == []  # a fresh, empty tmpfs again


PROBE_TEST = '''
from hosts import two_hosts  # noqa: F401


def test_uses_two_hosts(two_hosts):
    assert two_hosts.worker_ip
'''


@pytest.mark.parametrize("ci", ["true", ""])
def test_fixture_fails_under_ci_when_hosts_cannot_be_made(tmp_path, ci):
    """A missing tool (stood in for by DIT_TEST_HOSTS_MISSING) makes the two-hosts fixture fail under
    CI=true, naming the tool, and skip with the same message elsewhere."""
    (tmp_path / "test_probe.py").write_text(PROBE_TEST)
    env = {**os.environ, "CI": ci, "DIT_TEST_HOSTS_MISSING": "unshare",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_probe.py")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "`unshare` is not installed" in out, out
    if ci:
        assert proc.returncode == 1 and "1 error" in out and "CI=true" in out, out
    else:
        assert proc.returncode == 0 and "1 skipped" in out, out
