"""The cluster path on two hosts that share nothing but S3 and the tracking server (tests/hosts.py:
a worker host in its own network and mount namespace, which cannot see the project's data folders
nor the "laptop" folder the pipeline is driven from).

- The whole pipeline, driven from the head's side as from a user's laptop: a `git clone`, then the
  README's cluster command (`RAY_ADDRESS=<dashboard> dvc exp run -S store.root=s3://... ...`). Every
  stage runs as a Ray job; training places a worker on each host; the project keeps only pointers
  and metrics; the registered version loads through `models:/...@champion` in a fresh process on a
  host that never saw the training, with only the tracking URI and S3 credentials.
- The worker host killed (SIGKILL, every process of it) mid-training: the job continues from the S3
  checkpoint once the host is back, finishes, and the MLflow run has no gap in its loss history.
- Sampling spread over both hosts gives the same images as on one host.
- A local path is refused by a job on this two-host cluster, naming the setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hosts import two_hosts  # noqa: F401  (the fixture)
from tests.fixtures_data import VENV_BIN, clone_project, run

pytestmark = pytest.mark.slow

DVC = str(VENV_BIN / "dvc")
PYTHON = str(VENV_BIN / "python")
STAGES = {"prepare", "train_autoencoder", "encode", "train", "train_classifier", "sample", "evaluate"}
# The README's cluster profile, and tiny sizes for 2 CPUs per host.
PROFILE = ["train.num_workers=2", "train.cpus_per_worker=1", "train.placement_strategy=STRICT_SPREAD"]
TINY = ["train_autoencoder.steps=60", "train_classifier.steps=100", "train.steps=60", "train.log_every=20",
        "train.checkpoint_every=30", "sample.num_images=100", "sample.batch_size=50", "sample.images_per_shard=50",
        "sample.baseline_images=50"]


def store(hosts) -> str:
    return f"s3://{hosts.bucket}/dit"


def on_third_host(hosts, code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in the worker's network namespace but a fresh mount namespace that hides
    the laptop's folder: a host that never saw the training, with only the environment given."""
    hide = f"mount -t tmpfs tmpfs {hosts.tmp}"
    cmd = ["ip", "netns", "exec", hosts.ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
           f'{hide} && cd / && exec {PYTHON} -c "$0"', code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(two_hosts):
    laptop = two_hosts.tmp / "laptop"
    laptop.mkdir()
    root = clone_project(laptop / "project")
    env = {**two_hosts.driver_env(), "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1"}
    sets = [x for s in [f"store.root={store(two_hosts)}", *PROFILE, *TINY] for x in ("-S", s)]
    start = time.time()
    proc = run([DVC, "exp", "run", "-n", "cluster", *sets], root, env, timeout=1800)
    seconds = time.time() - start
    from ray.job_submission import JobSubmissionClient

    jobs = sorted((j for j in JobSubmissionClient(two_hosts.dashboard).list_jobs() if j.submission_id.startswith("dit-")),
                  key=lambda j: j.start_time)
    timings = {j.submission_id.split("-")[1]: (j.end_time - j.start_time) / 1000 for j in jobs if j.end_time}
    print(f"two-host dvc exp run: {seconds:.0f}s; Ray job wall time per stage (s): {json.dumps(timings)}")
    return {"root": root, "env": env, "output": proc.stdout + proc.stderr, "jobs": jobs, "seconds": seconds}


@pytest.mark.timeout(2400)
def test_pipeline_on_two_hosts(two_hosts, pipeline):
    root = pipeline["root"]
    ran = {line.split("'")[1] for line in pipeline["output"].splitlines() if line.startswith("Running stage '")}
    assert ran == STAGES, pipeline["output"][-3000:]
    # every stage ran as a Ray job on the cluster, and succeeded
    assert {j.submission_id.split("-")[1] for j in pipeline["jobs"]} >= {"prepare", "encode", "train", "sample", "evaluate"}
    assert all(str(j.status) in ("SUCCEEDED", "JobStatus.SUCCEEDED") for j in pipeline["jobs"])
    # the project holds pointers and metrics; the data is in the store
    for out in ("data/prepared", "models/autoencoder", "data/latents", "models/classifier", "samples"):
        files = sorted(p.name for p in (root / out).iterdir())
        assert files == ["location.json"], (out, files)
        uri = json.loads((root / out / "location.json").read_text())["uri"]
        assert uri == f"{store(two_hosts)}/{out}"
    s3 = two_hosts.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=two_hosts.bucket, Prefix="dit/data/latents/")["Contents"]]
    assert "dit/data/latents/stats.json" in keys
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert ev["num_samples"] == 100 and ev["fid"] > 0 and 0 <= ev["class_accuracy"] <= 1
    model = json.loads((root / "models/dit/location.json").read_text())["uri"]
    assert model == f"{store(two_hosts)}/models/dit"
    key = model[len(f"s3://{two_hosts.bucket}/"):] + "/trained.json"
    pointer = json.loads(two_hosts.s3_client().get_object(Bucket=two_hosts.bucket, Key=key)["Body"].read())
    assert pointer["checkpoint"].startswith(f"{store(two_hosts)}/checkpoints/"), pointer
    assert len((root / "metrics/train_loss.csv").read_text().splitlines()) == 1 + 3  # steps 20, 40, 60

    # training placed its two workers on the two hosts
    client = two_hosts.mlflow_client()
    params = client.get_run(pointer["mlflow_run_id"]).data.params
    assert params["world_size"] == "2" and params["num_nodes"] == "2", params

    # a host that never saw the training loads the champion with the tracking URI and S3 credentials
    champion = client.get_model_version_by_alias("dit-digits", "champion")
    assert str(champion.version) == str(pointer["version"])
    env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": two_hosts.mlflow_uri, **two_hosts.aws_env()}
    loaded = on_third_host(two_hosts, (
        "import mlflow, pandas as pd; m = mlflow.pyfunc.load_model('models:/dit-digits@champion'); "
        "out = m.predict(pd.DataFrame({'class_label': [1, 2], 'seed': [0, 1], 'num_steps': [2, 2]})); "
        "print('OUT', len(out), all(bytes(b[:8]) == bytes.fromhex('89504e470d0a1a0a') for b in out['image']))"), env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "OUT 2 True" in loaded.stdout, loaded.stdout  # two PNG images from the registered bundle (autoencoder inside)


@pytest.fixture()
def store_access(two_hosts, monkeypatch):
    """This test process reads the store as the user's laptop does: the S3 endpoint and credentials."""
    for key, value in two_hosts.aws_env().items():
        monkeypatch.setenv(key, value)


def _submit(hosts, entrypoint: str, working_dir: str | Path) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(hosts.dashboard)
    return client.submit_job(entrypoint=entrypoint, submission_id=f"t-{uuid.uuid4().hex[:8]}",
                             runtime_env={"working_dir": str(working_dir), "env_vars": {"MLFLOW_TRACKING_URI": hosts.mlflow_uri}})


def _wait(hosts, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(hosts.dashboard)
    deadline = time.time() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still {status}: {client.get_job_logs(job_id)[-3000:]}"
        time.sleep(2)
    return client.get_job_logs(job_id) if status != JobStatus.SUCCEEDED else ""


@pytest.mark.timeout(1200)
def test_worker_host_killed_mid_training_resumes_from_s3(two_hosts, pipeline, store_access):
    root, latents = pipeline["root"], f"{store(two_hosts)}/data/latents"
    result = f"{store(two_hosts)}/kill-test/result.json"
    sets = ["steps=240", "log_every=10", "checkpoint_every=40", "max_failures=3", "num_workers=2", "cpus_per_worker=1",
            "placement_strategy=STRICT_SPREAD", f"storage_path={store(two_hosts)}/kill-test", "name=kill-test",
            "experiment=kill-test", "registered_model=kill-test"]
    job = _submit(two_hosts, f"python -m ray_jobs.train --latents {latents} --result {result} --set {' '.join(sets)}", root)
    client = two_hosts.mlflow_client()
    deadline = time.time() + 600
    while True:  # wait until the run has passed its first checkpoint
        runs = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "kill-test"])
        history = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
        if max((m.step for m in history), default=0) >= 60:
            break
        assert time.time() < deadline, "training did not reach step 60"
        time.sleep(1)
    killed = two_hosts.kill_worker_host()
    assert killed
    time.sleep(5)
    two_hosts.start_worker_host()
    logs = _wait(two_hosts, job, timeout=600)
    assert not logs, logs[-4000:]

    from ray_jobs import storage

    out = storage.read_json(result)
    assert out["step"] == 240 and out["checkpoint"].endswith("checkpoint_00000240")
    steps = [m.step for m in client.get_metric_history(out["mlflow_run_id"], "loss")]
    assert sorted(set(steps)) == list(range(10, 241, 10)), "the loss history has a gap"
    relogged = sorted({s for s in steps if steps.count(s) > 1})
    assert relogged, "no step was logged twice: the workers were not restarted"
    assert min(relogged) > 40, f"steps {relogged} logged again: the restart did not resume from a checkpoint past step 40"
    assert max(relogged) - min(relogged) < 40 + 10, relogged  # resumed from the last checkpoint, not an earlier one


@pytest.mark.timeout(900)
def test_sampling_across_hosts_equals_one_host(two_hosts, pipeline, store_access):
    root = pipeline["root"]
    model = json.loads((root / "models/dit/location.json").read_text())["uri"]   # the model folder in the store
    outs = {}
    for name, actors, cpus in (("two", 2, 1.5), ("one", 1, 1.0)):  # 1.5 CPUs each: two actors cannot share a 2-CPU host
        outs[name] = f"{store(two_hosts)}/samples-{name}"
        job = _submit(two_hosts, f"python -m ray_jobs.sample --model {model} --out {outs[name]} --num-images 60 "
                                 f"--images-per-shard 20 --batch-size 20 --num-actors {actors} --actor-num-cpus {cpus} "
                                 "--formats parquet --grid-per-class 0", root)
        logs = _wait(two_hosts, job, timeout=600)
        assert not logs, logs[-4000:]
    from ray_jobs import storage
    from ray_jobs.sample import read_images

    two, one = read_images(outs["two"], 60), read_images(outs["one"], 60)
    assert two[0].shape == (60, 16, 16, 3)
    assert (two[0] == one[0]).all() and (two[1] == one[1]).all()
    assert len(storage.list_files(f"{outs['two']}/parquet", ".parquet")) == 3


@pytest.mark.timeout(300)
def test_local_paths_refused_on_two_hosts(two_hosts, pipeline, tmp_path):
    root = pipeline["root"]
    job = _submit(two_hosts, f"python -m ray_jobs.train --latents {store(two_hosts)}/data/latents --set storage_path=checkpoints "
                             "num_workers=2 cpus_per_worker=1", root)
    logs = _wait(two_hosts, job, timeout=240)
    assert "train.storage_path='checkpoints' is a local path, but the Ray cluster has 2 hosts" in logs, logs[-3000:]
    env = {**two_hosts.driver_env(), "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--latents", f"{store(two_hosts)}/data/latents",
                           "--set", f"storage_path={store(two_hosts)}/refused"], cwd=root, capture_output=True, text=True,
                          env={**env, "RAY_ADDRESS": two_hosts.gcs_address}, timeout=240)
    assert proc.returncode != 0 and "MLFLOW_TRACKING_URI='sqlite:///" in proc.stderr, proc.stderr[-3000:]
