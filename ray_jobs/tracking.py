"""MLflow behind one small module: where tracking goes, one run per training (found again by its
name when a training resumes), params, metrics, the registered model.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<workspace>/mlflow.db``, the workspace
being the user's project folder (``workspace()``: also for ``dvc exp run --temp/--queue``, whose stages
run in a temporary copy that DVC deletes). Nothing that
looks like a credential (``AWS_*`` names, or the values of those variables, or URI passwords) is
ever written to params, tags or logs.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from dit_core.contract import (AUTOENCODER_PATH_KEY, AUTOENCODER_RECORD_FILE, MODEL_BUNDLE_ARTIFACT, MODEL_INFO_ARTIFACT,
                               TRACKING_ARTIFACTS_DIR, TRACKING_DB_FILE)
from dit_core.training import flatten

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

REPO = Path(__file__).resolve().parents[1]
DVC_ROOT_ENV = "DVC_ROOT"              # DVC sets it for every stage: the project's root, and for
                                       # `dvc exp run --temp/--queue` the user's workspace, not the copy
RUN_NAME_TAG = "dit.run_name"          # finds the MLflow run of a training again on resume
STEP_TAG = "step"
MAX_PARAM_CHARS = 6000                 # MLflow's limit on a param value
_SECRET_NAME = re.compile(r"(secret|password|token|credential|access_key|session_key|^aws_)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(://[^:/@]+):[^@/]+@")


def workspace() -> Path:
    """The user's project folder: where DVC runs the project (``DVC_ROOT``; for an experiment run in
    DVC's temporary copy, the workspace it was started from), else this checkout. What must outlive
    a run (the default tracking store, checkpoints) lives here, never in the temporary copy."""
    root = os.environ.get(DVC_ROOT_ENV)
    return Path(root).resolve() if root else REPO


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace() / TRACKING_DB_FILE}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns/`` beside the database
    file (MLflow's default is ``./mlruns`` of the working dir, which for an experiment run in DVC's
    temporary copy is deleted with it); None (the server's choice) for other stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return (Path(uri[len(prefix):]).resolve().parent / TRACKING_ARTIFACTS_DIR).as_uri()


def registry_uri() -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def configure_tracking(uri: str | None = None, registry: str | None = None) -> str:
    """Point this process's MLflow client at ``uri`` (default: ``tracking_uri()``); returns it."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry or (registry_uri() if uri == tracking_uri() else uri))
    return uri


def redact(text: str) -> str:
    """``text`` with URI passwords and the values of credential-like environment variables masked."""
    text = _URI_PASSWORD.sub(r"\1:***@", text)
    for name, value in os.environ.items():
        if value and len(value) >= 4 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params as strings, without credential-like keys, secrets redacted, values truncated."""
    out = {}
    for key, value in flatten(params).items():
        if _SECRET_NAME.search(key.rsplit(".", 1)[-1]):
            continue
        out[key] = redact(str(value))[:MAX_PARAM_CHARS]
    return out


def git_commit(repo: Path = REPO) -> str:
    """The checkout's commit (with ``-dirty`` when it has changes), or ``unknown`` outside git
    (e.g. a ``ray job submit`` working dir)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def start_run(experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """The id of the MLflow run of training ``run_name`` in ``experiment``: the existing one when
    the training resumes, else a new one."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = (exp.experiment_id if exp is not None
              else client.create_experiment(experiment, artifact_location=artifact_location(mlflow.get_tracking_uri())))
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}).info.run_id
    if tags:
        set_tags(run_id, tags)
    return run_id


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in safe_params(tags).items():
        client.set_tag(run_id, k, v)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log the flattened params; on a resumed run only those not logged yet (MLflow params are
    immutable; a changed value is recorded as a tag ``changed.<key>``)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    new = {k: v for k, v in safe_params(params).items() if k not in logged}
    changed = {k: v for k, v in safe_params(params).items() if k in logged and logged[k] != v}
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    for k, v in changed.items():
        client.set_tag(run_id, f"changed.{k}", v)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def registered_version(run_id: str, name: str, step: int) -> str | None:
    """The version of ``name`` this run already registered for ``step`` (a re-run registers once)."""
    from mlflow import MlflowClient

    for mv in MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if mv.tags.get(STEP_TAG) == str(step):
            return str(mv.version)
    return None


def log_model(
    run_id: str,
    model: Any,
    registered_model: str,
    model_info: Mapping[str, Any],
    tags: Mapping[str, Any],
    step: int,
) -> str:
    """Log ``model`` (the EMA DiT) as the run's ``model``: an MLflow pyfunc image generator
    (``ray_jobs/mlflow_model.py``) bundling the weights, ``model_info`` (model_config, diffusion,
    latents = the training data's stats.json, optional ``sampling`` defaults), the autoencoder that
    ``latents.autoencoder_path`` names (local, relative to the project, s3:// or a Hugging Face id in
    the local cache) and ``dit_core`` as code. Also writes ``model_info/model_info.json``, registers a
    new version of ``registered_model`` and tags it; returns the version (the one this run already
    registered for ``step``, if any).

    Sampling defaults: ``model_info["sampling"]`` where given, else the ``sample`` settings'
    defaults (``ray_jobs.sample.SampleConfig``). An autoencoder that cannot be found is reported
    and left out: the version then loads for sampling with ``--autoencoder`` only.
    """
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    from . import mlflow_model

    existing = registered_version(run_id, registered_model, step)
    if existing is not None:
        return existing
    latents = dict(model_info.get("latents") or {})
    with tempfile.TemporaryDirectory(prefix="dit-bundle-") as tmp, autoencoder_folder(latents.get(AUTOENCODER_PATH_KEY)) as ae_dir:
        bundle = mlflow_model.write_bundle(Path(tmp, MODEL_BUNDLE_ARTIFACT), model.cpu().eval(), model_info,
                                           sampling_defaults(model_info.get("sampling"), model_info.get("diffusion")), ae_dir)
        num_classes = int(model_info["model_config"]["num_classes"])
        with mlflow.start_run(run_id=run_id):
            mlflow.log_dict(dict(model_info), MODEL_INFO_ARTIFACT)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=mlflow_model.__file__,      # models from code: no pickle
                artifacts={MODEL_BUNDLE_ARTIFACT: str(bundle)},
                code_paths=_model_code(Path(tmp, "code")),
                signature=mlflow_model.signature(),
                # the example is predicted once at logging (MLflow's serving check): only where it can decode
                input_example=mlflow_model.input_example(num_classes, model_info.get("diffusion")) if ae_dir else None,
                pip_requirements=_model_requirements(),
                registered_model_name=registered_model,
                step=step,
            )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for k, v in {**safe_params(tags), STEP_TAG: str(step)}.items():
        client.set_model_version_tag(registered_model, version, k, v)
    return version


def sampling_defaults(given: Mapping[str, Any] | None = None, diffusion: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sampling defaults a registered model records: ``dit_core.pipeline.SamplingSettings``'s
    (= the ``sample`` settings' defaults), with its objective's own (``diffusion``: a meanflow model
    samples in one step of its sampler, without guidance), updated with ``given``; checked."""
    from dataclasses import asdict, fields

    from dit_core.pipeline import SamplingSettings, objective_sampling

    known = [f.name for f in fields(SamplingSettings)]
    unknown = sorted(set(given or {}) - set(known))
    if unknown:
        raise ValueError(f"model_info sampling keys {unknown} are unknown; known: {known}")
    return asdict(SamplingSettings(**{**objective_sampling(diffusion), **(given or {})}))


@contextlib.contextmanager
def autoencoder_folder(path: str | None) -> Iterator[str | None]:
    """A local folder holding the autoencoder ``path`` names, or None (reported) when none is found."""
    import shutil
    import tempfile

    from dit_core.autoencoders import load_autoencoder, save_autoencoder

    from . import storage

    if path and storage.is_s3(path):
        if storage.exists(storage.join(path, AUTOENCODER_RECORD_FILE)):
            with storage.local_copy(path, AUTOENCODER_RECORD_FILE) as local:
                yield local
            return
    elif path:
        local = Path(path).expanduser()
        for candidate in (local, REPO / local):  # relative: to the working dir, else to the project
            if candidate.is_dir():
                with storage.local_copy(str(candidate), AUTOENCODER_RECORD_FILE) as folder:  # its published version
                    yield folder
                return
        tmp = tempfile.mkdtemp(prefix="dit-autoencoder-")
        try:
            try:  # a Hugging Face id: from the local cache only, written out as a folder
                save_autoencoder(load_autoencoder(path), Path(tmp, "ae"))
            except FileNotFoundError:
                pass
            else:
                yield str(Path(tmp, "ae"))
                return
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"warning: the registered model bundles no autoencoder: the latents name {path!r}, which is no folder, "
          "s3:// folder or Hugging Face model in the local cache; it loads for sampling with --autoencoder only",
          file=sys.stderr, flush=True)
    yield None


def _model_code(dest: Path) -> list[str]:
    """The code a registered model loads with besides its own file: ``dit_core``, without caches."""
    import shutil

    import dit_core

    shutil.copytree(Path(dit_core.__file__).parent, dest / "dit_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(dest / "dit_core")]


# what dit_core and the pyfunc import, pinned to this environment's versions
_MODEL_PACKAGES = ("torch", "numpy", "pandas", "diffusers", "safetensors", "pillow", "pyyaml")


def _model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in _MODEL_PACKAGES]


FID_TAG = "fid"                         # on a model version: its FID (lower is better)
FID_FEATURES_TAG = "fid_features"       # the feature network that FID was measured with (a trained one: with its weights' digest)
FID_REFERENCE_TAG = "fid_reference"     # the statistics it was measured against (the val split: with the data's fingerprint)
FD_LABEL_FREE_TAG = "fd_label_free"     # its label-free distance (lower is better): the alias never moves to a worse one
FD_LABEL_FREE_BASIS_TAG = "fd_label_free_basis"  # how that was measured: the pixel features and the reference


def log_evaluation(
    run_id: str,
    metrics: Mapping[str, float],
    settings: Mapping[str, Any],
    artifacts: Mapping[str, str] | None = None,
    step: int | None = None,
) -> None:
    """Record an evaluation in the training run of the model it scored: ``eval.*`` metrics, the
    settings as ``eval.*`` tags (a run's params are immutable and a model may be scored many
    times), and files (local paths) as artifacts under ``eval/``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    log_metrics(run_id, {f"eval.{k}": v for k, v in metrics.items()}, step=step or 0)
    set_tags(run_id, {f"eval.{k}": v for k, v in settings.items()})
    for path in (artifacts or {}).values():
        client.log_artifact(run_id, path, artifact_path="eval")


def version_not_here(uri: str) -> str | None:
    """Why ``models:/<name>/<version>`` cannot be scored in this tracking store, or None when it is
    there. A teammate's `dvc pull` brings the model folder, not the MLflow database that registered
    it: evaluating there writes metrics/eval.json and leaves the registry alone."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri)
    if match is None:
        return None   # an alias or a run: resolved (and its errors raised) where it is loaded
    try:
        MlflowClient().get_model_version(match[1], match[2])
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return (f"{uri} is not in this tracking store ({tracking_uri()}): the model came from elsewhere (dvc pull); "
                "its evaluation is in metrics/eval.json only (set evaluate.register=false to say so, or point "
                "MLFLOW_TRACKING_URI at the store that registered it)")
    return None


def tag_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in safe_params(tags).items():
        client.set_model_version_tag(name, version, k, v)


# How MLflow 3.17's registry stores (SQL and file; the REST store relays the server's code and
# message) say that an alias does not exist: INVALID_PARAMETER_VALUE, "Registered model alias <alias>
# not found.". Its RESOURCE_DOES_NOT_EXIST means something else here: no such registered model, or an
# alias whose version row is gone (a damaged registry). Anything unrecognised counts as an error:
# the safe side, the alias stays.
_ALIAS_NOT_FOUND_CODE = "INVALID_PARAMETER_VALUE"


def alias_holder(name: str, alias: str) -> ModelVersion | None:
    """The ``ModelVersion`` of ``name`` that ``alias`` points at, or None when the alias does not
    exist. Any other registry error (server unreachable, permission denied, a damaged registry) is
    raised: reading it as "no holder" would move the alias over a better model."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code == _ALIAS_NOT_FOUND_CODE and f"alias {alias} not found" in e.message:
            return None
        raise MlflowException(
            f"could not read which version of registered model {name!r} holds alias {alias!r} "
            f"(registry {redact(mlflow.get_registry_uri())}), so the alias was not moved: {e.message}",
            error_code=ErrorCode.Value(e.error_code),
        ) from e


def promote_if_better(name: str, version: str, fid: float, features: str, alias: str = "champion",
                      reference: str | None = None, label_free: float | None = None,
                      label_free_basis: str | None = None) -> dict[str, Any]:
    """Move ``alias`` to ``version`` when its FID beats the current holder's, measured with the same
    feature network (``features``, the ``FID_FEATURES_TAG``) against the same reference
    (``reference``, the ``FID_REFERENCE_TAG``), and its label-free distance (``label_free``) is no
    worse than the holder's measured the same way (``label_free_basis``, the
    ``FD_LABEL_FREE_BASIS_TAG``): a classifier's FID is blind to colour, background and diversity,
    so a better FID never outweighs a worse picture. Scores measured otherwise are not comparable
    (a retrained classifier, new data): a holder scored otherwise on FID is replaced unless it wins
    on a comparable label-free distance. Returns what happened: ``{"moved": bool, "previous":
    version or None, "previous_fid": its FID if compared, "previous_fd_label_free": ...}``."""
    from mlflow import MlflowClient

    holder = alias_holder(name, alias)
    previous = str(holder.version) if holder is not None else None
    previous_fid = previous_label_free = None
    if (holder is not None and FID_TAG in holder.tags and holder.tags.get(FID_FEATURES_TAG) == features
            and holder.tags.get(FID_REFERENCE_TAG) == reference):
        previous_fid = float(holder.tags[FID_TAG])
    if (holder is not None and label_free is not None and label_free_basis is not None and FD_LABEL_FREE_TAG in holder.tags
            and holder.tags.get(FD_LABEL_FREE_BASIS_TAG) == label_free_basis):
        previous_label_free = float(holder.tags[FD_LABEL_FREE_TAG])
    fid_better = previous_fid is None or fid < previous_fid
    label_free_ok = previous_label_free is None or label_free <= previous_label_free
    better = previous is None or previous == str(version) or (fid_better and label_free_ok)
    if better:
        MlflowClient().set_registered_model_alias(name, alias, str(version))
    outcome = {"alias": alias, "moved": bool(better and previous != str(version)), "holder": str(version) if better else previous,
               "previous": previous, "previous_fid": previous_fid, "previous_fd_label_free": previous_label_free}
    if not better and fid_better:
        outcome["reason"] = (f"FID {fid:.4g} beats the holder's but the label-free distance {label_free:.4g} is worse than its "
                             f"{previous_label_free:.4g}")
    return outcome


__all__ = [
    "FD_LABEL_FREE_BASIS_TAG",
    "FD_LABEL_FREE_TAG",
    "FID_FEATURES_TAG",
    "FID_REFERENCE_TAG",
    "FID_TAG",
    "alias_holder",
    "artifact_location",
    "configure_tracking",
    "finish_run",
    "git_commit",
    "log_metrics",
    "log_model",
    "log_evaluation",
    "log_params",
    "promote_if_better",
    "redact",
    "registered_version",
    "registry_uri",
    "safe_params",
    "sampling_defaults",
    "set_tags",
    "start_run",
    "tag_version",
    "tracking_uri",
    "workspace",
]
