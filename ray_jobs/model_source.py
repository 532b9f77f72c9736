"""Where a trained DiT comes from: the train stage's model folder (``models/dit``, a DVC output,
local or in the store), an MLflow model URI, one of our checkpoints (local or s3://), or an official
DiT ``.pt`` release. Each resolves to a ``ModelBundle``: the EMA weights, the
architecture, the diffusion settings and the latent space (autoencoder and scale factor). An MLflow
model is the registered pyfunc's bundle (``ray_jobs/mlflow_model.py``), read here without its code:
the sample and evaluate jobs use the very files that ``mlflow models serve`` does."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_core.contract import (AUTOENCODER_PATH_KEY, AUTOENCODER_RECORD_FILE, CHECKPOINT_STATE_FILE, MODEL_BUNDLE_ARTIFACT,
                               MODEL_CONFIG_FILE, MODEL_INFO_ARTIFACT, SCALE_FACTOR_KEY, TRAINED_RECORD_FILE)
from dit_core.models import DiT, DiTConfig, check_state_dict, config_from_state_dict, extract_state_dict, preset_name
from dit_core.pipeline import load_fitting_autoencoder

from . import storage, tracking


@dataclass
class ModelBundle:
    """Everything a sampler needs, as plain picklable data (shipped to actors through the object store)."""

    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    diffusion: dict[str, Any] = field(default_factory=dict)
    latents: dict[str, Any] = field(default_factory=dict)   # stats.json of the training data
    sampling: dict[str, Any] = field(default_factory=dict)  # recorded sampling defaults (registered models)
    source: str = ""
    mlflow_run_id: str | None = None
    registered_model: str | None = None
    version: str | None = None

    def build_model(self) -> DiT:
        model = DiT(DiTConfig(**self.model_config))
        check_state_dict(model, self.state_dict, source=self.source)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    @property
    def config(self) -> DiTConfig:
        return DiTConfig(**self.model_config)

    @property
    def pinned_uri(self) -> str:
        """The exact model: ``models:/name/<version>`` for a registry URI (an alias resolved once,
        here), else the source as given."""
        return f"models:/{self.registered_model}/{self.version}" if self.registered_model and self.version else self.source

    def weights_digest(self) -> str:
        return state_digest(self.state_dict)


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of weights (names, dtypes, shapes and bytes, in name order): the same for the same
    weights however they were saved."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _torch_load_bytes(data: bytes, source: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{source} is not a readable PyTorch checkpoint (truncated or corrupt? {type(e).__name__}: {e}); copy it "
            "again, or sample an earlier checkpoint of the run (its checkpoint_<step> folders) or a registered version"
        ) from e


def _from_checkpoint(uri: str, num_heads: int | None = None) -> ModelBundle:
    target = uri
    if not uri.endswith(".pt") and not uri.endswith(".pth"):
        target = storage.join(uri, CHECKPOINT_STATE_FILE)
    if not storage.exists(target):
        raise FileNotFoundError(
            f"model {uri!r} not found: expected an MLflow URI (models:/name/version, models:/name@alias, "
            f"runs:/id/model), a checkpoint directory holding {CHECKPOINT_STATE_FILE}, or a .pt file"
        )
    obj = _torch_load_bytes(storage.read_bytes(target), target)
    sd = extract_state_dict(obj, prefer="ema")
    if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):
        # One of ours: architecture, diffusion and latent space are recorded with the weights.
        return ModelBundle(
            model_config=dict(obj["model_config"]),
            state_dict=sd,
            diffusion=dict(obj.get("diffusion") or {}),
            latents=dict(obj.get("latents") or {}),
            source=target,
        )
    # An official release: a bare state dict; the architecture comes from its shapes.
    try:
        cfg = config_from_state_dict(sd, num_heads)
    except ValueError as e:
        raise ValueError(
            f"model {uri!r} is a bare state dict: {e} (load_bundle(..., num_heads=N)); for the sample job, save "
            "it in our layout, {'ema': state_dict, 'model_config': DiTConfig(...).to_dict()}"
        ) from e
    return ModelBundle(model_config=cfg.to_dict(), state_dict=sd, source=target)


def _download_dir() -> str:
    """A folder for downloaded models that lives as long as this process (the sample job loads the
    bundled autoencoder from it after ``load_bundle`` returns)."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="dit-model-")
    atexit.register(shutil.rmtree, path, True)
    return path


def _bundle_folder(model_dir: str) -> str | None:
    """The bundle folder of a downloaded MLflow model (the pyfunc's ``bundle`` artifact), or None
    for a model registered before the bundle existed (a pickled ``mlflow.pytorch`` model)."""
    from mlflow.models import Model


    pyfunc = Model.load(model_dir).flavors.get("python_function", {})
    artifact = (pyfunc.get("artifacts") or {}).get(MODEL_BUNDLE_ARTIFACT)
    return os.path.join(model_dir, artifact["path"]) if artifact else None


def _from_mlflow(uri: str) -> ModelBundle:
    """A registered or logged model: the same bundle the pyfunc loads (``ray_jobs/mlflow_model.py``),
    read without its code; ``latents.autoencoder_path`` points at the bundled autoencoder."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .mlflow_model import read_bundle
    from .tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    name = version = None
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):]
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, ver = rest.split("/", 1)
                mv = client.get_model_version(name, ver)
            run_id, version = mv.run_id, str(mv.version)
            uri_pinned = f"models:/{name}/{version}"     # the alias resolved once: one version throughout
        else:  # runs:/<run_id>/<path>
            run_id = uri[len("runs:/"):].split("/", 1)[0]
            uri_pinned = uri
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri_pinned, dst_path=_download_dir())
        folder = _bundle_folder(model_dir)
        if folder is None:
            return _from_legacy_mlflow(uri, model_dir, run_id, name, version)
    except MlflowException as e:
        raise ValueError(
            f"model {uri!r} could not be resolved in MLflow at {mlflow.get_tracking_uri()}: {e.message}. "
            "Check the name, version or alias (e.g. models:/dit-digits@champion) and MLFLOW_TRACKING_URI."
        ) from e
    contents = read_bundle(folder)
    latents = contents.latents
    if contents.autoencoder_dir is not None:
        latents[AUTOENCODER_PATH_KEY] = str(contents.autoencoder_dir)
    return ModelBundle(
        model_config=contents.model_config,
        state_dict=contents.state_dict,
        diffusion=dict(contents.config.get("diffusion") or {}),
        latents=latents,
        sampling=contents.sampling,
        source=uri,
        mlflow_run_id=run_id,
        registered_model=name,
        version=version,
    )


def _from_legacy_mlflow(uri: str, model_dir: str, run_id: str, name: str | None, version: str | None) -> ModelBundle:
    """A version registered before the bundle: the pickled module and the run's model_info.json."""
    import mlflow

    model = mlflow.pytorch.load_model(model_dir, map_location="cpu")
    info_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_INFO_ARTIFACT, dst_path=model_dir)
    with open(info_path) as f:
        info = json.load(f)
    return ModelBundle(
        model_config=dict(info["model_config"]),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        diffusion=dict(info.get("diffusion") or {}),
        latents=dict(info.get("latents") or {}),
        source=uri,
        mlflow_run_id=run_id,
        registered_model=name,
        version=version,
    )


# ---------------------------------------------------------------------------------------------
# The train stage's model folder (models/dit): the registered model's bundle, kept by DVC
# ---------------------------------------------------------------------------------------------

def is_model_folder(uri: str) -> bool:
    """Whether ``uri`` (local, s3://, or a local pointer to the store) is a model folder."""
    target = storage.located(uri)
    return bool(target) and (storage.is_s3(target) or os.path.isdir(target)) and storage.exists(storage.join(target, MODEL_CONFIG_FILE))


def save_trained_model(checkpoint: str, out: str, record: dict[str, Any]) -> str:
    """Write the model folder ``out`` (local or s3://) from a final checkpoint: the bundle the
    registered pyfunc carries (``ray_jobs/mlflow_model.py``: the EMA weights as safetensors, dit.json,
    the autoencoder copied in) and ``record`` as ``trained.json``. It needs neither the checkpoint
    nor the tracking store afterwards: ``dvc push``/``dvc pull`` carry the whole model. Returns ``out``."""
    from .mlflow_model import write_bundle

    bundle = _from_checkpoint(checkpoint)
    info = {"model_config": bundle.model_config, "diffusion": bundle.diffusion, "latents": bundle.latents}
    with tempfile.TemporaryDirectory(prefix="dit-model-") as tmp, \
            tracking.autoencoder_folder(bundle.latents.get(AUTOENCODER_PATH_KEY)) as ae_dir:
        folder = write_bundle(os.path.join(tmp, "model"), bundle.build_model(), info, tracking.sampling_defaults(None, bundle.diffusion), ae_dir)
        storage.write_json(str(folder / TRAINED_RECORD_FILE), record)
        storage.publish_folder(folder, out, last=MODEL_CONFIG_FILE)
    return out


def _from_model_folder(uri: str) -> ModelBundle:
    """A model folder: its bundle, read as the pyfunc reads it; the registered version its record
    names (when trained with tracking) goes with it, so evaluate scores that version."""
    from .mlflow_model import read_bundle

    folder = storage.located(uri)
    # absolute: the bundle's autoencoder path must stay valid in the sample job's other working dirs
    folder = storage.download_folder(folder, _download_dir()) if storage.is_s3(folder) else os.path.abspath(folder)
    contents = read_bundle(folder)
    record_path = os.path.join(folder, TRAINED_RECORD_FILE)
    record = storage.read_json(record_path) if os.path.isfile(record_path) else {}
    latents = contents.latents
    if contents.autoencoder_dir is not None:
        latents[AUTOENCODER_PATH_KEY] = str(contents.autoencoder_dir)
    return ModelBundle(
        model_config=contents.model_config, state_dict=contents.state_dict,
        diffusion=dict(contents.config.get("diffusion") or {}), latents=latents, sampling=contents.sampling,
        source=uri, mlflow_run_id=record.get("mlflow_run_id"), registered_model=record.get("registered_model"),
        version=record.get("version"),
    )


def load_bundle(uri: str, expect_preset: str | None = None, num_heads: int | None = None) -> ModelBundle:
    """Resolve ``uri`` and check it before any sampling work starts. ``num_heads``: the attention
    heads of a bare state dict (the weights do not record them) whose width is not a paper preset's;
    MLflow models and our checkpoints carry their whole config."""
    uri = str(uri)
    if uri.startswith(("models:/", "runs:/")):
        bundle = _from_mlflow(uri)
    elif is_model_folder(uri if storage.is_s3(uri) else os.path.expanduser(uri)):
        bundle = _from_model_folder(uri if storage.is_s3(uri) else os.path.expanduser(uri))
    else:
        bundle = _from_checkpoint(uri if storage.is_s3(uri) else os.path.expanduser(uri), num_heads)
    if expect_preset is not None:
        got = preset_name(bundle.config)
        if got != expect_preset:
            raise ValueError(
                f"model {uri!r} is a {got or 'custom'} model ({bundle.config}), not {expect_preset}; "
                "pass the matching preset or another checkpoint"
            )
    return bundle


def load_autoencoder_for(bundle: ModelBundle, autoencoder: str | None = None, scale_factor: float | None = None) -> tuple[Any, float]:
    """The autoencoder ``autoencoder`` names (default: the one the model records), local or on S3,
    and the latent scale (``scale_factor``, else the model's latent record, else the autoencoder's);
    refused when it does not fit the model (``dit_core.pipeline.load_fitting_autoencoder``). The
    sample job, ``dit generate`` and the benchmarks load a model's autoencoder through it."""
    path = autoencoder or bundle.latents.get(AUTOENCODER_PATH_KEY)
    if not path:
        raise ValueError(
            f"model {bundle.source!r} does not record its autoencoder (an official checkpoint?); pass --autoencoder "
            "with a diffusers AutoencoderKL folder, e.g. a local copy of stabilityai/sd-vae-ft-ema"
        )
    with storage.local_copy(path, AUTOENCODER_RECORD_FILE) as local:
        return load_fitting_autoencoder(local, bundle.config, scale_factor or bundle.latents.get(SCALE_FACTOR_KEY), name=path)
