"""`ray job submit` of the training job against a Ray head started by the test (its own ports and
temp dir, beside the session's cluster), and the train stage running as a Ray job there when
RAY_ADDRESS is a dashboard address, with its outputs in the S3 store and its results read back from
the store (not from the job's log)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from fixtures_latents import write_synthetic_latents

BIN = Path(sys.executable).parent
JOB_PARAMS = {
    "model": {"depth": 1, "hidden_size": 32, "num_heads": 2},
    "steps": 6, "batch_size": 16, "log_every": 3, "checkpoint_every": 3, "num_workers": 1, "cpus_per_worker": 1,
    "experiment": "dit-job", "registered_model": "dit-job", "max_failures": 0,
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{env.get('PATH', '')}")  # same mode on head and client
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server):
    """`ray start --head --block` in its own process group; the group is ended at the end. It has the
    S3 server's credentials in its environment, as a cluster node has them from its instance role."""
    tmp = tmp_path_factory.mktemp("rayhead")
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--temp-dir={Path('/tmp') / ('rh' + str(dash))}"]
    log = (tmp / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"Ray head did not come up; see {tmp / 'head.log'}")
                time.sleep(1)
        yield {"address": address, "root": tmp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)   # a clean stop takes ~30 s of Ray's own grace periods; the group is killed after 10
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def job_data(ray_head):
    root = ray_head["root"]
    write_synthetic_latents(root / "latents", n=64, num_classes=2, shape=(4, 8, 8))
    return {"latents": str(root / "latents"), "storage": str(root / "ckpt"), "mlflow": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.mark.timeout(300)
def test_ray_job_submit_cli(ray_head, job_data):
    sets = [f"{k}={json.dumps(v)}" for k, v in {**JOB_PARAMS, "storage_path": job_data["storage"], "name": "cli"}.items()]
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": job_data["mlflow"]}}
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "ray_jobs.train", "--latents", job_data["latents"], "--set", *sets],
        env=_env(), capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from ray_jobs.train import RESULT_PREFIX

    line = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)][-1]
    result = json.loads(line[len(RESULT_PREFIX):])
    assert result["step"] == 6 and result["model_uri"] == "models:/dit-job/1"
    assert Path(result["checkpoint"], "state.pt").is_file()


@pytest.mark.timeout(300)
def test_train_stage_runs_as_a_job_with_the_store(ray_head, job_data, s3_bucket, tmp_path, monkeypatch):
    from dit_core.contract import LOCATION_FILE
    from pipelines.train import main
    from ray_jobs import storage
    from ray_jobs.model_source import load_bundle

    latents = f"s3://{s3_bucket}/dit/data/latents"
    storage.upload_folder(job_data["latents"], latents)
    pointer_dir = tmp_path / "data" / "latents"          # what the encode stage leaves with store.root set
    pointer_dir.mkdir(parents=True)
    (pointer_dir / LOCATION_FILE).write_text(json.dumps({"uri": latents}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["store"]["root"] = f"s3://{s3_bucket}/dit"
    params["train"].update({**JOB_PARAMS, "name": "stage"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("RAY_ADDRESS", ray_head["address"])
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", job_data["mlflow"])
    monkeypatch.setenv("DIT_SHARED_FS", "1")   # one machine: the head reads this SQLite file too
    main(["--latents", str(pointer_dir), "--metrics", str(tmp_path / "train.json"), "--out", str(tmp_path / "models/dit"),
          "--plots", str(tmp_path / "loss.csv"), "--params", str(tmp_path / "params.yaml")])
    metrics = json.loads((tmp_path / "train.json").read_text())
    # the model folder lives in the store; the project keeps a pointer to it, which loading follows
    model_uri = json.loads((tmp_path / "models/dit" / LOCATION_FILE).read_text())["uri"]
    assert model_uri == f"s3://{s3_bucket}/dit/{tmp_path.relative_to('/')}/models/dit"
    pointer = storage.read_json(storage.join(model_uri, "trained.json"))
    assert load_bundle(str(tmp_path / "models/dit")).pinned_uri == pointer["model_uri"]
    assert metrics["steps"] == 6 and metrics["final_loss"] > 0
    assert pointer["registered_model"] == "dit-job"
    assert pointer["checkpoint"].startswith(f"s3://{s3_bucket}/dit/checkpoints/stage/checkpoint_00000006"), pointer
    assert storage.exists(storage.join(pointer["checkpoint"], "state.pt"))
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["step", "epoch"] and [r.split(",")[0] for r in rows[1:]] == ["3", "6"]


# A stage's submit-and-wait (ray_jobs.runtime.submit_job, which run_stage calls with RAY_ADDRESS a
# dashboard), in a process of its own, on a job that runs until it is stopped.
WAITER = """
import os, sys
from ray_jobs.runtime import submit_job
submit_job(os.environ["RAY_ADDRESS"], "python -c \\"import time; print('job running', flush=True); time.sleep(600)\\"",
           sys.argv[1], working_dir=sys.argv[2])
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_stage_stops_its_ray_job(ray_head, tmp_path, signum):
    from ray.job_submission import JobStatus, JobSubmissionClient

    name = f"interrupt-{signum.name.lower()}"
    work = tmp_path / "work"
    work.mkdir()
    (work / "README").write_text("the job's working dir\n")
    env = {**_env(), "RAY_ADDRESS": ray_head["address"], "PYTHONPATH": str(REPO)}
    out, err = (tmp_path / "out").open("w+"), (tmp_path / "err").open("w+")
    proc = subprocess.Popen([sys.executable, "-c", WAITER, name, str(work)], env=env, stdout=out, stderr=err,
                            start_new_session=True)
    client = JobSubmissionClient(ray_head["address"])
    try:
        deadline = time.time() + 120
        job = None
        while job is None or job.status != JobStatus.RUNNING:
            assert time.time() < deadline and proc.poll() is None, (job, (tmp_path / "err").read_text()[-3000:])
            time.sleep(0.5)
            job = next((j for j in client.list_jobs() if (j.submission_id or "").startswith(f"dit-{name}-")), None)
        proc.send_signal(signum)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "err").read_text()
    # the job on the cluster is stopped, by the time the process has exited
    assert client.get_job_status(job.submission_id) == JobStatus.STOPPED, stderr[-3000:]
    assert code != 0 and code == 128 + signum, (code, stderr[-3000:])
    assert f"stopping Ray job {job.submission_id}" in stderr and f"Ray job {job.submission_id} stopped" in stderr, stderr[-3000:]
