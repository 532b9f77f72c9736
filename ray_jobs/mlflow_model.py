"""The registered model: an MLflow pyfunc image generator that carries everything it needs.

Rows in (``class_label``: an id or a class name, ``seed``; optional ``num_steps``,
``guidance_scale``, ``sampler``, which a request's ``params`` may also give for all its rows), rows
out (``image``: PNG bytes, ``class_label``, ``seed``). An unknown column or param, or a value a
setting cannot take, is refused with a ``BadRequest`` naming it (HTTP 400 from ``mlflow models
serve``, its ``message`` the reason). A row's
``seed`` is the image's own seed, as the bulk sampler's ``seed`` column records it: the same
(label, seed, settings) gives the same image as ``python -m ray_jobs.sample`` with that seed.

The bundle (the pyfunc artifact ``bundle``, docs/CONTRACTS.md) is one folder:
    dit.json           format, model_config, diffusion, latents (stats.json), sampling defaults,
                       and every file of the bundle with its size
    dit.safetensors    the EMA weights (no pickle: tensors only)
    autoencoder/       the diffusers AutoencoderKL folder and its autoencoder.json
The model's code is this file (MLflow's "models from code": nothing is pickled) and ``dit_core``
(``code_paths``), so that it loads in a process that has only the pip requirements. This module
therefore imports nothing else of the project;
the sample and evaluate jobs read the same folder through ``read_bundle``.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np
import pandas as pd
import torch

from dit_core.contract import (CLASS_LABEL_COLUMN, CLASS_NAMES_KEY, IMAGE_COLUMN, MODEL_AUTOENCODER_DIR, MODEL_BUNDLE_ARTIFACT,
                               MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, SCALE_FACTOR_KEY, SEED_COLUMN)
from dit_core.models import DiT, DiTConfig, check_state_dict
from dit_core.settings import SettingError, coerce, field_types

FORMAT = 1                             # dit.json's "format"; a reader refuses others
SAMPLING_KEYS = ("sampler", "num_steps", "guidance_scale", "eta", "guided_channels", "cache_interval")
ROW_SETTINGS = ("num_steps", "guidance_scale", "sampler")  # per-row overrides of the sampling defaults
REQUIRED_COLUMNS = (CLASS_LABEL_COLUMN, SEED_COLUMN)
COLUMNS = REQUIRED_COLUMNS + ROW_SETTINGS       # every column a request may have


class BrokenBundle(ValueError):
    """The bundle lacks a part, or a part does not fit the others."""


class BadRequest(MlflowException, ValueError):
    """Input rows, columns or params the model refuses. MLflow's scoring server answers an
    MlflowException with its error code's status and its message (400 for
    INVALID_PARAMETER_VALUE), where any other exception becomes a generic 400 whose reason is
    only in the stack trace."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass
class BundleContents:
    """What ``read_bundle`` found: the recorded config, the checked weights, the autoencoder folder."""

    folder: Path
    config: dict[str, Any]            # dit.json
    state_dict: dict[str, torch.Tensor]

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.config["model_config"])

    @property
    def latents(self) -> dict[str, Any]:
        return dict(self.config.get("latents") or {})

    @property
    def sampling(self) -> dict[str, Any]:
        return dict(self.config.get("sampling") or {})

    @property
    def autoencoder_dir(self) -> Path | None:
        return self.folder / MODEL_AUTOENCODER_DIR if self.config.get("autoencoder") else None

    def build_model(self) -> DiT:
        model = DiT(DiTConfig(**self.model_config))
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing and reading the bundle folder
# ---------------------------------------------------------------------------------------------

def write_bundle(folder: str | Path, model: DiT, model_info: Mapping[str, Any], sampling: Mapping[str, Any],
                 autoencoder_dir: str | Path | None) -> Path:
    """Write the bundle of ``model`` into the empty ``folder``: weights, the autoencoder folder
    (copied; None: a bundle that cannot decode, recorded as such) and dit.json listing every file."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / MODEL_WEIGHTS_FILE))
    if autoencoder_dir is not None:
        shutil.copytree(autoencoder_dir, folder / MODEL_AUTOENCODER_DIR)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    config = {
        "format": FORMAT,
        "model_config": dict(model_info["model_config"]),
        "diffusion": dict(model_info.get("diffusion") or {}),
        "latents": dict(model_info.get("latents") or {}),
        "sampling": {k: sampling[k] for k in SAMPLING_KEYS if k in sampling},
        "autoencoder": MODEL_AUTOENCODER_DIR if autoencoder_dir is not None else None,
        "files": files,
    }
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _part(rel: str) -> str:
    return "the autoencoder" if rel.startswith(MODEL_AUTOENCODER_DIR + "/") else "the weights" if rel == MODEL_WEIGHTS_FILE else rel


def read_bundle(folder: str | Path) -> BundleContents:
    """Read and check a bundle folder: every listed file present at its size, the weights' names
    and shapes those of the recorded model_config. Errors name the part and the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise BrokenBundle(f"model bundle {folder} has no {MODEL_CONFIG_FILE}: it is not a DiT bundle, or an incomplete copy; "
                           "register the model again (ray_jobs.tracking.log_model)")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise BrokenBundle(f"model bundle {folder} has format {config.get('format')!r}; this code reads format {FORMAT}: "
                           "load it with the code version that wrote it, or register the model again")
    for rel, size in sorted((config.get("files") or {}).items()):
        path = folder / rel
        if not path.is_file():
            raise BrokenBundle(f"model bundle {folder} is missing {rel} ({_part(rel)}); the bundle is incomplete: "
                               "download it again or register the model again")
        if path.stat().st_size != size:
            raise BrokenBundle(f"model bundle {folder}: {rel} ({_part(rel)}) has {path.stat().st_size} bytes, "
                               f"not the {size} recorded; the file is damaged or replaced: register the model again")
    try:
        state_dict = load_file(str(folder / MODEL_WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same broken part
        raise BrokenBundle(f"model bundle {folder}: the weights {MODEL_WEIGHTS_FILE} are not readable safetensors ({e})") from e
    try:
        model_config = DiTConfig(**config["model_config"])
    except (KeyError, TypeError) as e:
        raise BrokenBundle(f"model bundle {folder}: {MODEL_CONFIG_FILE}'s model_config is not a DiTConfig ({e})") from e
    with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
        skeleton = DiT(model_config)
    try:
        check_state_dict(skeleton, state_dict, source=f"the weights {MODEL_WEIGHTS_FILE}")
    except ValueError as e:
        raise BrokenBundle(f"model bundle {folder}: {e} (recorded in {MODEL_CONFIG_FILE}); the weights belong to another "
                           "model: register the model again") from e
    return BundleContents(folder=folder, config=config, state_dict=state_dict)


def load_bundle_autoencoder(contents: BundleContents) -> tuple[Any, float]:
    """The bundled autoencoder and the latent scale factor (the latents' record, else the
    autoencoder's); refused when the bundle has none or it does not fit the model."""
    from dit_core.pipeline import load_fitting_autoencoder

    folder = contents.autoencoder_dir
    if folder is None:
        raise BrokenBundle(
            f"model bundle {contents.folder} holds no autoencoder (the training's latents named "
            f"{contents.latents.get('autoencoder_path')!r}, which was not found when the model was registered), so it "
            "cannot decode images; sample it with --autoencoder FOLDER, or register it again where the autoencoder is found")
    try:
        return load_fitting_autoencoder(folder, DiTConfig(**contents.model_config), contents.latents.get(SCALE_FACTOR_KEY),
                                        name=f"{MODEL_AUTOENCODER_DIR}/")
    except FileNotFoundError as e:
        raise BrokenBundle(f"model bundle {contents.folder}: the autoencoder ({MODEL_AUTOENCODER_DIR}/) does not load: {e}") from e
    except ValueError as e:
        raise BrokenBundle(f"model bundle {contents.folder}: {e}; the bundle mixes parts of two models: register it again") from e


# ---------------------------------------------------------------------------------------------
# Rows in, rows out
# ---------------------------------------------------------------------------------------------

def resolve_label(value: Any, class_names: Sequence[str], num_classes: int) -> int:
    """A class id from an id (int, or an integral float / numeric text) or a class name; else a
    SettingError naming the value and the ids and names it may be."""
    def refuse(problem: str, shown: Any = value) -> SettingError:
        return SettingError("class_label", shown, problem, f"class_label {shown!r} {problem}")

    if isinstance(value, (bool, np.bool_)) or value is None:
        raise refuse(f"is neither a class id 0..{num_classes - 1} nor a class name")
    if isinstance(value, numbers.Integral):
        label = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        label = int(value)
    elif isinstance(value, str):
        if value in class_names:
            return list(class_names).index(value)
        if not value.strip().lstrip("-").isdigit():
            shown = ", ".join(repr(n) for n in list(class_names)[:10]) + (", ..." if len(class_names) > 10 else "")
            raise refuse(f"is not a class name of this model ({shown or 'it records none'}) nor a class id 0..{num_classes - 1}")
        label = int(value)
    else:
        raise refuse(f"({type(value).__name__}) is neither a class id 0..{num_classes - 1} nor a class name")
    if not 0 <= label < num_classes:
        raise refuse(f"is out of range: the model has {num_classes} classes (0..{num_classes - 1})", label)
    return label


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def row_settings(row: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings of one input row: its own num_steps, guidance_scale, sampler where
    given (typed as SamplingSettings' fields: a SettingError names a value of the wrong type)."""
    from dit_core.pipeline import SamplingSettings

    hints = field_types(SamplingSettings)
    out = {k: defaults[k] for k in SAMPLING_KEYS if k in defaults}
    out.update({k: coerce(row[k], hints[k], k) for k in ROW_SETTINGS if _given(row.get(k))})
    return out


def check_columns(columns: Sequence[str], rows: int) -> None:
    """Refuse a column the model does not take (a misspelled ``steps`` would be ignored) or a
    request without a required one, naming the columns it takes."""
    takes = f"this model takes {list(REQUIRED_COLUMNS)} in every row and optionally {list(ROW_SETTINGS)}"
    unknown = [str(c) for c in columns if c not in COLUMNS]
    if unknown:
        raise BadRequest(f"unknown input columns {unknown}: {takes}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if rows and missing:
        raise BadRequest(f"input rows lack the columns {missing}: {takes}")


def check_params(params: Any) -> None:
    """Refuse names in a request's ``params`` that are not this model's (its ParamSchema's)."""
    unknown = sorted(str(k) for k in params or {} if k not in ROW_SETTINGS) if isinstance(params, dict) else []
    if unknown:
        raise BadRequest(f"unknown params {unknown}: this model takes the params {list(ROW_SETTINGS)} "
                         "(defaults for every row of the request; a row's own columns come first)")


def _refuse_unknown_params() -> None:
    """MLflow drops the ``params`` of a request that its model's ParamSchema does not list, with a
    warning in the server's log alone (mlflow/mlflow#9252), before ``predict`` sees them: a
    misspelled ``params={"steps": 8}`` would be silently ignored. For this model's schema (and no
    other), refuse them instead, as MLflow refuses a param value of the wrong type."""
    import mlflow.pyfunc as pyfunc

    enforce = getattr(pyfunc, "_enforce_params_schema", None)
    if enforce is None or getattr(enforce, "refuses_unknown", False):
        return
    ours = params_schema()

    def refuse_unknown(params: Any, schema: Any) -> Any:
        if schema == ours:
            check_params(params)
        return enforce(params, schema)

    refuse_unknown.refuses_unknown = True  # type: ignore[attr-defined]
    pyfunc._enforce_params_schema = refuse_unknown


def params_schema() -> Any:
    """``params`` a request may give: the per-row settings, as defaults for all its rows."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ParamSchema([ParamSpec("num_steps", "long", None), ParamSpec("guidance_scale", "double", None),
                        ParamSpec("sampler", "string", None)])


def signature() -> Any:
    """Outputs and params only: with an input schema, MLflow would drop unknown columns before
    ``predict`` could refuse them. The columns are COLUMNS, checked by ``check_columns``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = Schema([ColSpec("binary", IMAGE_COLUMN), ColSpec("long", CLASS_LABEL_COLUMN), ColSpec("long", SEED_COLUMN)])
    return ModelSignature(inputs=None, outputs=outputs, params=params_schema())


def input_example(num_classes: int, diffusion: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Two rows: the defaults, and every optional setting given (2 steps of a second sampler that
    fits the model's objective, guidance 1.5: a quick example). A model whose guidance was learned
    (meanflow): 2 steps of its own sampler, guidance 1 (it takes no other)."""
    from dit_core.diffusion import MEANFLOW_SAMPLER, SAMPLERS_BY_OBJECTIVE, guidance_learned, objective_name

    learned = guidance_learned(diffusion)
    other = MEANFLOW_SAMPLER if learned else SAMPLERS_BY_OBJECTIVE[objective_name(diffusion)][1]   # ddim (eps), heun (flow)
    return pd.DataFrame([
        {CLASS_LABEL_COLUMN: 0, SEED_COLUMN: 0, "num_steps": None, "guidance_scale": None, "sampler": None},
        {CLASS_LABEL_COLUMN: min(1, num_classes - 1), SEED_COLUMN: 1, "num_steps": 2, "guidance_scale": 1.0 if learned else 1.5,
         "sampler": other},
    ])


class DiTImageGenerator(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the bundle once in ``load_context``, generates in ``predict``."""

    batch_size = 64

    def load_context(self, context: Any) -> None:
        from dit_core.pipeline import ImagePipeline

        contents = read_bundle(context.artifacts[MODEL_BUNDLE_ARTIFACT])
        autoencoder, scale = load_bundle_autoencoder(contents)
        self.sampling = contents.sampling
        self.class_names = [str(n) for n in contents.latents.get(CLASS_NAMES_KEY) or []]
        self.pipeline = ImagePipeline(contents.build_model(), autoencoder, scale, contents.config.get("diffusion"))
        _refuse_unknown_params()

    def requests(self, frame: pd.DataFrame, params: Mapping[str, Any] | None) -> list[tuple[int, int, Any]]:
        """Each row's (class id, seed, SamplingSettings), every value checked once, here: a
        BadRequest naming the row, the column, the value and what it may be."""
        from dit_core.pipeline import SamplingSettings, check_sampling, check_seed

        check_columns(list(frame.columns), len(frame))
        check_params(params)
        defaults = {**self.sampling, **{k: v for k, v in (params or {}).items() if _given(v)}}
        out = []
        for i, row in enumerate(frame.to_dict("records")):
            try:
                sampling = SamplingSettings(**row_settings(row, defaults))
                check_sampling(self.pipeline.objective, sampling)
                out.append((resolve_label(row[CLASS_LABEL_COLUMN], self.class_names, self.pipeline.num_classes),
                            check_seed(row[SEED_COLUMN]), sampling))
            except SettingError as e:
                raise BadRequest(f"row {i}: {e.field}={e.value!r} {e.problem}") from None
        return out

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from dataclasses import astuple

        from dit_core.data import png_bytes

        rows = self.requests(pd.DataFrame(model_input), params)
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, sampling) in enumerate(rows):  # rows with the same settings share batches
            groups.setdefault(astuple(sampling), []).append(i)
        images: list[bytes] = [b""] * len(rows)
        for idx in groups.values():
            sampling = rows[idx[0]][2]
            out = self.pipeline.generate([rows[i][0] for i in idx], [rows[i][1] for i in idx], sampling, self.batch_size)
            for i, image in zip(idx, out):
                images[i] = png_bytes(image)
        return pd.DataFrame({IMAGE_COLUMN: images, CLASS_LABEL_COLUMN: np.asarray([r[0] for r in rows], np.int64),
                             SEED_COLUMN: np.asarray([r[1] for r in rows], np.int64)})


if __name__ != "ray_jobs.mlflow_model":
    # MLflow's "models from code": the registered model is this file, run under another module name
    # when the model loads (and once when it is logged); nothing of it is pickled.
    mlflow.models.set_model(DiTImageGenerator())


__all__ = [
    "COLUMNS",
    "BadRequest",
    "BrokenBundle",
    "BundleContents",
    "check_columns",
    "DiTImageGenerator",
    "input_example",
    "params_schema",
    "load_bundle_autoencoder",
    "read_bundle",
    "resolve_label",
    "row_settings",
    "signature",
    "write_bundle",
]
