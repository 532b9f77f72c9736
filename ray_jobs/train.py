"""Ray Train job: a class-conditional DiT on the latent shards (docs/CONTRACTS.md, ``data/latents/``).

``train_loop_per_worker(config)`` runs on every worker: it reads the train split, takes its own
slice of every epoch (order from (seed, epoch)), trains with DDP (or FSDP), keeps an EMA of the
weights, logs the loss averaged over all workers to MLflow from rank 0, and checkpoints to
``storage_path`` every ``checkpoint_every`` steps and at the end. A run with the same name resumes
from its latest checkpoint; ``max_failures`` restarts the workers from it after a failure. At the
end rank 0 logs the EMA model to MLflow and registers it.

    python -m ray_jobs.train --latents data/latents --set steps=200 batch_size=64
    ray job submit --address http://head:8265 --working-dir . -- \\
        python -m ray_jobs.train --params configs/imagenet256-xl2.yaml --latents s3://bucket/latents

``RAY_ADDRESS`` set: runs on that cluster; unset: a local Ray runtime.

This module holds the driver (``train``, ``main``) and the loop (``train_loop_per_worker``); beside
it: the settings (``train_config.py``), the run's identity and its checkpoints (``checkpoints.py``),
the input (``latent_input.py``) and the parts of the loop (``train_loop.py``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dit_core import settings
from dit_core.contract import FINGERPRINT_KEY

from . import runtime, storage, tracking
from .checkpoints import check_identity, checkpoint_uri, default_name, layout_digest, run_lock, run_records
from .latent_input import VIEWS_BEFORE_FLIP_VIEWS, check_data, plan_stream, read_stats, stored_views, train_shards
from .train_config import (DATA_FIELDS, RESUMABLE_CHANGES, STRATEGIES, TrainConfig, config_from, diffusion_settings,
                           load_train_params, model_config, registered_name)
from .train_loop import LossWindow, input_stream, micro_step, optimizer_step, param_groups, save, set_learning_rate, setup
from .train_loop import finish as finish_run

RESULT_PREFIX = "TRAIN_RESULT "               # the last line of a job's log: its result for a human (the job API: --result)


# --------------------------------------------------------------------------------------------
# The training loop (one per worker)
# --------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: set up (or resume), then the steps; the parts are in ray_jobs/train_loop.py."""
    cfg = TrainConfig(**config["train"])
    run = setup(cfg, config["run_name"], config["git_commit"])
    stream = input_stream(run)
    batches, window, metrics = iter(stream), LossWindow(run.device), {}
    run.model.train()
    for step in range(run.start_step, cfg.steps):
        set_learning_rate(run, step)
        for micro in range(cfg.grad_accum):
            window.add(micro_step(run, next(batches), step, micro))
        optimizer_step(run, step)
        window.steps += 1
        done = step + 1
        run.attempts[-1]["end_step"] = done
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.report(run, stream, step)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(run, done, {**metrics, "step": done, "mlflow_run_id": run.run_id or ""})
    stream.close()
    finish_run(run)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    name: str
    checkpoint: str                 # URI of the final checkpoint directory
    step: int
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    registered_model: str | None
    version: str | None
    history: list[dict[str, Any]] = field(default_factory=list)   # every logged row: step, loss, lr, ...
    attempts: list[dict[str, int]] = field(default_factory=list)  # [{start_step, end_step}] of each start/resume/restart

    def summary(self) -> dict[str, Any]:
        """What the job hands back (``--result``): the pointer, the last metrics, the history and the attempts."""
        return {"name": self.name, "step": self.step, "metrics": self.metrics, "history": self.history,
                "attempts": self.attempts, **self.pointer()}

    def pointer(self) -> dict[str, Any]:
        """The registry part of ``models/dit/trained.json`` (docs/CONTRACTS.md)."""
        return {
            "checkpoint": self.checkpoint, "mlflow_run_id": self.mlflow_run_id, "registered_model": self.registered_model,
            "version": self.version,
            "model_uri": f"models:/{self.registered_model}/{self.version}" if self.version else None,
        }


def check_batch(cfg: TrainConfig, units: list[Any]) -> None:
    """Refuse on the driver a batch the workers' shares cannot serve (latent_input.plan_stream)."""
    plan_stream(units, cfg.per_worker_batch, cfg.num_workers, cfg.seed, cfg.shuffle_rows)


def _trainer(cfg: TrainConfig, name: str, use_gpu: bool) -> Any:
    """The TorchTrainer of run ``name``: its workers, its storage, its restarts and the checkpoints it keeps."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    fs, path = storage.resolve(cfg.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "run_name": name, "git_commit": tracking.git_commit()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                                placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": runtime.forwarded_env(tracking.tracking_uri())},
        ),
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Validate, run the TorchTrainer, return where the final checkpoint and model version are."""
    import ray

    cfg.validate()
    cfg = replace(cfg, latents=storage.absolute(cfg.latents))  # workers run in their own folders
    stats = read_stats(cfg.latents)
    cfg = replace(cfg, registered_model=registered_name(cfg, stats))  # the workers register under this name
    model_config(cfg, stats)  # fail here, on the driver, for a bad preset or shape
    units = check_data(cfg.latents, stats)  # and for latents the workers could not read
    check_batch(cfg, units)
    runtime.init_ray()
    # hosts share nothing but S3 and the tracking server: refuse, before anything is written, what
    # another host cannot reach or what Ray deletes with the job
    tracking_uri = tracking.tracking_uri() if cfg.tracking else None
    runtime.require_shared({"train.latents": cfg.latents, "train.storage_path": cfg.storage_path}, runtime.cluster_hosts(),
                           "the Ray cluster", tracking_uri)
    runtime.require_persistent({"train.storage_path": cfg.storage_path}, tracking_uri)
    storage.check_writable(cfg.storage_path)
    name = cfg.name or default_name(cfg, stats)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if cfg.strategy == "fsdp" and not use_gpu:
        raise ValueError("train.strategy=fsdp needs GPU workers (Ray's FSDP is GPU-only) and this cluster has none "
                         "(or use_gpu is false); use strategy: ddp on CPU")
    with run_lock(cfg.storage_path, name):
        check_identity(cfg, name, stats[FINGERPRINT_KEY], layout_digest(units))
        result = _trainer(cfg, name, use_gpu).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint under {cfg.storage_path}")
    metrics = dict(result.metrics or {})
    run_id = metrics.pop("mlflow_run_id", None) or None
    version = None
    if cfg.tracking and run_id:
        tracking.configure_tracking()
        version = tracking.registered_version(run_id, cfg.registered_model, int(metrics.get("step", cfg.steps)))
    checkpoint = checkpoint_uri(result.checkpoint.path, cfg.storage_path)
    history, attempts = run_records(checkpoint)
    return TrainResult(
        name=name, checkpoint=checkpoint, step=int(metrics.get("step", 0)),
        metrics=metrics, mlflow_run_id=run_id, registered_model=cfg.registered_model if version else None, version=version,
        history=history, attempts=attempts,
    )


def main(argv: list[str] | None = None) -> int:
    """``ray job submit`` entry point; settings from ``--params`` (default: params.yaml when the
    working dir has one, else the defaults of TrainConfig, which params.yaml repeats)."""
    p = settings.command_parser(__doc__)
    p.add_argument("--latents", required=True, help="latents folder or s3:// URI (encode's output)")
    settings.add_settings_arguments(p, TrainConfig, "train", None, skip=("latents",), example="steps=100 lr=1e-3")
    p.add_argument("--result", help="write the result (checkpoint, run, version, metrics) as JSON here (local or s3://)")
    a = p.parse_args(argv)
    with p.refusing(a):
        cfg = config_from(a.latents, settings.read_settings(a, TrainConfig, "train"))
        cfg.validate()
    result = train(cfg)
    out = result.summary()
    if a.result:
        storage.write_json(a.result, out)
    print(RESULT_PREFIX + json.dumps({k: v for k, v in out.items() if k != "history"}, default=str), flush=True)
    return 0


__all__ = [  # the names other modules and users import from here (most now live beside it)
    "DATA_FIELDS", "RESULT_PREFIX", "RESUMABLE_CHANGES", "STRATEGIES", "VIEWS_BEFORE_FLIP_VIEWS", "TrainConfig", "TrainResult",
    "check_batch", "check_data", "check_identity", "config_from", "default_name", "diffusion_settings", "layout_digest",
    "load_train_params", "main", "model_config", "param_groups", "read_stats", "stored_views", "train", "train_loop_per_worker",
    "train_shards",
]


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray then ships train_loop_per_worker by
    # reference (ray_jobs.train on the workers' path) instead of pickling this script by value.
    from ray_jobs.train import main as _main

    sys.exit(_main())
