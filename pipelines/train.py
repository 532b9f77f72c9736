"""train stage: the DiT on the latents with the Ray Train job in ray_jobs/train.py.

    python -m pipelines.train --latents data/latents --out models/dit --metrics metrics/train.json \
        --plots metrics/train_loss.csv

``--out`` (``models/dit``, a cached DVC output) receives the trained model, whole: the bundle the
registered MLflow version carries (EMA weights as safetensors, dit.json, the autoencoder) and
``trained.json`` naming the run, the registered version and the final checkpoint. ``dvc push`` and
``dvc pull`` carry it, ``dvc exp apply`` brings an experiment's back, and the sample stage and
``dit generate --model models/dit`` read it without the tracking store or the checkpoints.
A relative ``train.storage_path`` (resume checkpoints) is taken in the user's workspace
(``tracking.workspace()``), also when DVC runs the stage in the temporary copy of an experiment.

``RAY_ADDRESS`` unset: a local Ray runtime; a ``host:port`` address: that cluster, from this process;
``http://<head>:8265`` (a dashboard): the stage runs as a Ray job there (``pipelines.common.run_stage``)
and its metrics and loss history come back through ``store.root`` on S3. With ``store.root``
set, a local ``train.storage_path`` (``checkpoints``) is taken under it, the model folder goes to
``<store.root>/models/dit`` and ``models/dit`` keeps a pointer to it (``location.json``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pipelines.common import StageIO, in_store, run_stage, stage_arguments, store_root
from ray_jobs import storage, tracking
from ray_jobs.model_source import save_trained_model
from ray_jobs.train import TrainConfig, config_from, train


def metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    """``metrics/train.json``: steps, final loss, images per second (and the rest of the last report)."""
    m = result["metrics"]
    return {"steps": result["step"], "final_loss": m.get("loss"), "images_per_sec": m.get("images_per_sec"),
            "steps_per_sec": m.get("steps_per_sec"), "peak_memory_mb": m.get("peak_memory_mb"), "run_name": result["name"]}


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    """The per-step plots file (``dvc plots show``): one CSV row per logged step."""
    lead = ["step", "epoch", "loss"]                      # first, in this order; the rest by name
    keys = {k for row in history for k in row}
    columns = [k for k in lead if k in keys or k == "step"] + sorted(keys - set(lead))
    lines = [",".join(columns)] + [",".join(f"{row.get(c, '')}" for c in columns) for row in history]
    storage.write_bytes(path, ("\n".join(lines) + "\n").encode())


RECORD_KEYS = ("name", "step", "checkpoint", "mlflow_run_id", "registered_model", "version", "model_uri")


def train_and_report(latents: str, params: dict[str, Any], metrics_path: str, model_out: str,
                     plots_path: str | None = None) -> dict[str, Any]:
    """The stage's core: train, then write the model folder, the metrics and the loss history."""
    result = train(config_from(latents, params)).summary()
    save_trained_model(result["checkpoint"], model_out, {k: result.get(k) for k in RECORD_KEYS})
    storage.write_json(metrics_path, metrics_of(result))
    if plots_path:
        write_history(plots_path, result.get("history") or [])
    print(f"train: {result['step']} steps, loss {result['metrics'].get('loss')}, -> {result.get('model_uri')} {result.get('checkpoint')}")
    return result


def main(argv: list[str] | None = None) -> int:
    flags = {"--latents": "latents folder or s3:// URI",
             "--metrics": "metrics JSON",
             "--out": "the model folder to write (models/dit), local or s3://",
             "--plots": "per-step CSV (step, loss, lr, ...) for `dvc plots show`"}
    p, a, params = stage_arguments(argv, __doc__, flags, TrainConfig, "train", "steps=100 lr=1e-3", optional=("--plots",),
                                   skip=("latents",))
    with p.refusing(a):   # typed and sound before any work
        config_from(a.latents, params).validate()
    root = store_root(a.params)
    checkpoints = str(params.get("storage_path", "checkpoints"))
    if root:
        params["storage_path"] = in_store(checkpoints, root)
    elif not storage.is_s3(checkpoints) and not os.path.isabs(checkpoints):
        params["storage_path"] = str(tracking.workspace() / checkpoints)   # never in an experiment's temporary copy
    io = StageIO(inputs=("latents",), outputs=("out",), reports=("metrics", "plots"), tracking=tracking.tracking_uri)
    run_stage("train", a, io, lambda job: train_and_report(job.latents, params, job.metrics, job.out, job.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
