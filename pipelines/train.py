"""train stage: the DiT on the latents with the Ray Train job in ray_jobs/train.py.

    python -m pipelines.train --latents data/latents --metrics metrics/train.json --pointer models/dit.json

``RAY_ADDRESS`` unset (or a ``host:port`` / ``ray://`` address): the job runs from this process, on a
local Ray runtime or that cluster. ``RAY_ADDRESS=http://<head>:8265`` (a dashboard): the stage
submits ``python -m ray_jobs.train`` there with Ray's job submission client, streams its logs and
waits; the cluster must reach ``train.storage_path``, the latents and MLflow (use ``s3://`` and
``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pipelines.common import load_params
from ray_jobs import storage
from ray_jobs.train import RESULT_PREFIX, config_from, train

REPO = Path(__file__).resolve().parents[1]
JOB_POLL_S = 2.0


def metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    """``metrics/train.json``: steps, final loss, images per second (and the rest of the last report)."""
    m = result["metrics"]
    return {"steps": result["step"], "final_loss": m.get("loss"), "images_per_sec": m.get("images_per_sec"),
            "steps_per_sec": m.get("steps_per_sec"), "peak_memory_mb": m.get("peak_memory_mb"), "run_name": result["name"]}


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    """The per-step plots file (``dvc plots show``): one CSV row per logged step."""
    columns = ["step", *sorted({k for row in history for k in row} - {"step"})]
    lines = [",".join(columns)] + [",".join(f"{row.get(c, '')}" for c in columns) for row in history]
    storage.write_bytes(path, ("\n".join(lines) + "\n").encode())


def run_local(latents: str, params: dict[str, Any]) -> dict[str, Any]:
    return train(config_from(latents, params)).summary()


def submit(address: str, latents: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``ray_jobs.train`` as a Ray job on the cluster whose dashboard is ``address``; stream its
    logs; return the result it prints. Only ``MLFLOW_TRACKING_URI`` travels with the job; AWS
    credentials come from the cluster's own environment (e.g. an instance role), never from here."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    overrides = " ".join(shlex.quote(f"{k}={json.dumps(v)}") for k, v in params.items())
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if os.environ.get(k)}
    job_id = client.submit_job(
        entrypoint=f"python -m ray_jobs.train --latents {shlex.quote(latents)} --set {overrides}",
        submission_id=f"dit-train-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(REPO), "env_vars": env},
    )
    print(f"train: submitted Ray job {job_id} to {address}", flush=True)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the log stream may drop; the status below decides
        print(f"train: log stream ended ({e}); waiting for the job", flush=True)
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(JOB_POLL_S)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"Ray job {job_id} on {address} ended {status}; see `ray job logs {job_id} --address {address}`")
    lines = [line for line in logs.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"Ray job {job_id} succeeded but printed no result line ({RESULT_PREFIX!r})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_stage(latents: str, params: dict[str, Any], metrics_path: str, pointer_path: str,
              plots_path: str | None = None) -> dict[str, Any]:
    """Train (here or on the cluster of ``RAY_ADDRESS``), then write the metrics, the pointer and
    the loss history."""
    address = os.environ.get("RAY_ADDRESS", "")
    result = submit(address, latents, params) if address.startswith(("http://", "https://")) else run_local(latents, params)
    pointer = {k: result.get(k) for k in ("checkpoint", "mlflow_run_id", "registered_model", "version", "model_uri")}
    storage.write_json(metrics_path, metrics_of(result))
    storage.write_json(pointer_path, pointer)
    if plots_path:
        write_history(plots_path, result.get("history") or [])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, help="latents folder or s3:// URI")
    p.add_argument("--metrics", required=True, help="metrics JSON (local)")
    p.add_argument("--pointer", required=True, help="where to write the pointer to the final checkpoint/model")
    p.add_argument("--plots", default=None, help="per-step CSV (step, loss, lr, ...) for `dvc plots show`")
    p.add_argument("--params", default="params.yaml")
    a = p.parse_args(argv)
    result = run_stage(a.latents, load_params("train", a.params), a.metrics, a.pointer, a.plots)
    print(f"train: {result['step']} steps, loss {result['metrics'].get('loss')}, -> {result.get('model_uri')} {result.get('checkpoint')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
