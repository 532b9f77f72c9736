"""A training run's identity and its checkpoints (docs/CONTRACTS.md, ``checkpoints/<run>/``).

A run is named by its settings and data (``default_name``), or by ``train.name``. Its identity (the
settings that decide the weights, the data's fingerprint and its row-group layout) is recorded
beside its checkpoints at the first start (``check_identity``) and inside every checkpoint, so a
resume with anything else is refused, naming what differs. A checkpoint directory holds
``state.pt`` (model, EMA, optimizer, step and the records a reader needs: ``model_source`` reads
our checkpoints through this module, not through the training job), ``history.json`` (every
logged row) and ``attempts.json`` (the steps each start, resume or restart executed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from dit_core.contract import CHECKPOINT_STATE_FILE, FINGERPRINT_KEY, TRAIN_ATTEMPTS_FILE, TRAIN_HISTORY_FILE, TRAIN_IDENTITY_FILE

from . import storage


class TrainConfig(Protocol):
    """What this module reads of ``train_config.TrainConfig``: a protocol, so that reading a
    checkpoint (``model_source``: sampling, evaluation) loads neither the training job nor its settings."""

    latents: str
    storage_path: str
    registered_model: str
    steps: int

    def identity(self) -> dict[str, Any]: ...


def identity_record(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg.identity()`` as JSON reads it back (tuples as lists, ...), so a saved one compares equal."""
    return json.loads(json.dumps(cfg.identity(), default=str))


def layout_digest(units: Sequence[Any]) -> str:
    """The row-group layout of the train shards: with the seed and the worker count it decides the
    data order (ray_jobs/latent_input.py), so a resumed run must find the same layout."""
    return hashlib.sha256(json.dumps([u.rows for u in units]).encode()).hexdigest()[:16]


def default_name(cfg: TrainConfig, stats: dict[str, Any]) -> str:
    """``<registered_model>-<hash>`` of the run's identity, its data and its step count."""
    # the step count too: `dvc exp run -S train.steps=300` is a run of its own, not a resume of the
    # 1,500-step one (an explicit train.name continues a run with more steps)
    digest = hashlib.sha256(json.dumps([cfg.identity(), stats[FINGERPRINT_KEY], cfg.steps], sort_keys=True, default=str).encode())
    return f"{cfg.registered_model}-{digest.hexdigest()[:10]}"


def _refuse_other_data(run: str, saved: str, cfg: TrainConfig, fingerprint: str) -> None:
    raise ValueError(
        f"run {run!r} was started on latents with fingerprint {saved}; {cfg.latents} has fingerprint {fingerprint}: "
        "resuming on other data is refused; use a new train.name (or name: null) or the latents the run was started on")


def _refuse_other_layout(run: str, saved: str, cfg: TrainConfig, layout: str) -> None:
    raise ValueError(
        f"run {run!r} read latents laid out in row groups {saved}, and {cfg.latents} has layout {layout} (the same data, "
        "re-encoded with another encode.rows_per_group): the data order would differ; use a new train.name or the "
        "latents it was started on")


def _refuse_other_settings(run: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ValueError(f"run {run!r} was started with other values of {diff}; use a new train.name (or name: null) "
                     "or delete its checkpoints to start over")


def check_identity(cfg: TrainConfig, name: str, fingerprint: str, layout: str) -> None:
    """Record the run's weight-deciding settings, data and data layout at its first start; refuse
    (here, on the driver: the workers would fail the same way on every restart) to resume it with
    other settings, on other data or on the same data laid out otherwise."""
    uri = storage.join(cfg.storage_path, name, TRAIN_IDENTITY_FILE)
    current = identity_record(cfg) | {"data_fingerprint": fingerprint}
    if not storage.exists(uri):
        storage.write_json(uri, current | {"data_layout": layout})
        return
    saved = storage.read_json(uri)
    run = f"{name} under {cfg.storage_path}"
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        _refuse_other_data(run, saved["data_fingerprint"], cfg, fingerprint)
    saved.setdefault("data_fingerprint", fingerprint)  # written before the data was part of the identity
    started_layout = saved.pop("data_layout", layout)   # written before the layout was part of it: not checked here
    if started_layout != layout:
        _refuse_other_layout(run, started_layout, cfg, layout)
    if saved != current:
        _refuse_other_settings(run, saved, current)


@contextlib.contextmanager
def run_lock(storage_path: str, name: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """One training process per run at a time in a local ``storage_path``: a second start of the same
    run (two queued experiments with the same settings and data: the same name) waits for the first
    and then resumes from its last checkpoint, rather than writing into the same folder at once.
    On S3 there is no lock: give experiments that run side by side different settings or train.name."""
    if storage.is_s3(storage_path):
        yield
        return
    import fcntl

    path = Path(storage_path) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"train: another process is training run {name!r} (the same settings and data) in {storage_path}; "
                "waiting for it to finish, then resuming from its last checkpoint")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_checkpoint(folder: str, state: dict[str, Any], history: list[dict[str, Any]], attempts: list[dict[str, int]]) -> None:
    """One checkpoint's files in ``folder`` (a local directory Ray Train then uploads)."""
    torch.save(state, os.path.join(folder, CHECKPOINT_STATE_FILE))
    with open(os.path.join(folder, TRAIN_HISTORY_FILE), "w") as f:
        json.dump(history, f)
    with open(os.path.join(folder, TRAIN_ATTEMPTS_FILE), "w") as f:
        json.dump(attempts, f)


def read_checkpoint(folder: str) -> dict[str, Any]:
    """``state.pt`` of a local checkpoint directory, with its ``history`` and ``attempts``."""
    try:
        state = torch.load(os.path.join(folder, CHECKPOINT_STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt file: say which, do not start over silently
        raise ValueError(f"checkpoint {folder}/{CHECKPOINT_STATE_FILE} cannot be read ({type(e).__name__}: {e}); delete that checkpoint "
                         "folder to resume from the one before, or use a new train.name") from e
    for name, key in ((TRAIN_HISTORY_FILE, "history"), (TRAIN_ATTEMPTS_FILE, "attempts")):
        path = os.path.join(folder, name)
        state[key] = json.loads(Path(path).read_text()) if os.path.exists(path) else []
    return state


def check_resumable(state: dict[str, Any], cfg: TrainConfig, fingerprint: str, layout: str) -> None:
    """Refuse a checkpoint trained on other data, another layout of it or other settings."""
    run = str(state["config"].get("name"))
    saved_fp = state.get("data_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        _refuse_other_data(run, saved_fp, cfg, fingerprint)
    if state.get("data_layout") not in (None, layout):
        _refuse_other_layout(run, state["data_layout"], cfg, layout)
    saved = state.get("identity")
    if saved is not None and saved != identity_record(cfg):
        _refuse_other_settings(run, saved, identity_record(cfg))


def run_records(checkpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """(history, attempts) beside a checkpoint (local or s3://); empty where one is missing."""
    history_uri, attempts_uri = storage.join(checkpoint, TRAIN_HISTORY_FILE), storage.join(checkpoint, TRAIN_ATTEMPTS_FILE)
    return (storage.read_json(history_uri) if storage.exists(history_uri) else [],
            storage.read_json(attempts_uri) if storage.exists(attempts_uri) else [])


def checkpoint_uri(path: str, storage_path: str) -> str:
    """The URI of a checkpoint Ray Train reports as a bare bucket path when it is on S3."""
    return f"s3://{path}" if storage.is_s3(storage_path) and not path.startswith("s3://") else path


__all__ = ["check_identity", "check_resumable", "checkpoint_uri", "default_name", "identity_record", "layout_digest",
           "read_checkpoint", "run_records", "write_checkpoint"]
