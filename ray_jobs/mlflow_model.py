"""The registered model: an MLflow pyfunc image generator that carries everything it needs.

Rows in (``class_label``: an id or a class name, ``seed``; optional ``num_steps``,
``guidance_scale``, ``sampler``), rows out (``image``: PNG bytes, ``class_label``, ``seed``). A row's
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
import numpy as np
import pandas as pd
import torch

from dit_core.models import DiT, DiTConfig, check_state_dict

BUNDLE = "bundle"                      # the pyfunc artifact: the bundle folder
CONFIG_FILE = "dit.json"
WEIGHTS_FILE = "dit.safetensors"
AUTOENCODER_DIR = "autoencoder"
FORMAT = 1                             # dit.json's "format"; a reader refuses others
SAMPLING_KEYS = ("sampler", "num_steps", "guidance_scale", "eta", "guided_channels", "cache_interval")
ROW_SETTINGS = ("num_steps", "guidance_scale", "sampler")  # per-row overrides of the sampling defaults


class BrokenBundle(ValueError):
    """The bundle lacks a part, or a part does not fit the others."""


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
        return self.folder / AUTOENCODER_DIR if self.config.get("autoencoder") else None

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
    save_file(state, str(folder / WEIGHTS_FILE))
    if autoencoder_dir is not None:
        shutil.copytree(autoencoder_dir, folder / AUTOENCODER_DIR)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    config = {
        "format": FORMAT,
        "model_config": dict(model_info["model_config"]),
        "diffusion": dict(model_info.get("diffusion") or {}),
        "latents": dict(model_info.get("latents") or {}),
        "sampling": {k: sampling[k] for k in SAMPLING_KEYS if k in sampling},
        "autoencoder": AUTOENCODER_DIR if autoencoder_dir is not None else None,
        "files": files,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _part(rel: str) -> str:
    return "the autoencoder" if rel.startswith(AUTOENCODER_DIR + "/") else "the weights" if rel == WEIGHTS_FILE else rel


def read_bundle(folder: str | Path) -> BundleContents:
    """Read and check a bundle folder: every listed file present at its size, the weights' names
    and shapes those of the recorded model_config. Errors name the part and the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise BrokenBundle(f"model bundle {folder} has no {CONFIG_FILE}: it is not a DiT bundle, or an incomplete copy; "
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
        state_dict = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same broken part
        raise BrokenBundle(f"model bundle {folder}: the weights {WEIGHTS_FILE} are not readable safetensors ({e})") from e
    try:
        model_config = DiTConfig(**config["model_config"])
    except (KeyError, TypeError) as e:
        raise BrokenBundle(f"model bundle {folder}: {CONFIG_FILE}'s model_config is not a DiTConfig ({e})") from e
    with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
        skeleton = DiT(model_config)
    try:
        check_state_dict(skeleton, state_dict, source=f"the weights {WEIGHTS_FILE}")
    except ValueError as e:
        raise BrokenBundle(f"model bundle {folder}: {e} (recorded in {CONFIG_FILE}); the weights belong to another "
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
        return load_fitting_autoencoder(folder, DiTConfig(**contents.model_config), contents.latents.get("scale_factor"),
                                        name=f"{AUTOENCODER_DIR}/")
    except FileNotFoundError as e:
        raise BrokenBundle(f"model bundle {contents.folder}: the autoencoder ({AUTOENCODER_DIR}/) does not load: {e}") from e
    except ValueError as e:
        raise BrokenBundle(f"model bundle {contents.folder}: {e}; the bundle mixes parts of two models: register it again") from e


# ---------------------------------------------------------------------------------------------
# Rows in, rows out
# ---------------------------------------------------------------------------------------------

def resolve_label(value: Any, class_names: Sequence[str], num_classes: int) -> int:
    """A class id from an id (int, or an integral float / numeric text) or a class name."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise ValueError(f"class_label {value!r} is neither a class id nor a class name")
    if isinstance(value, numbers.Integral):
        label = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        label = int(value)
    elif isinstance(value, str):
        if value in class_names:
            return list(class_names).index(value)
        if not value.strip().lstrip("-").isdigit():
            shown = ", ".join(repr(n) for n in list(class_names)[:10]) + (", ..." if len(class_names) > 10 else "")
            raise ValueError(f"class_label {value!r} is not a class name of this model ({shown or 'it records none'}) "
                             f"nor a class id 0..{num_classes - 1}")
        label = int(value)
    else:
        raise ValueError(f"class_label {value!r} ({type(value).__name__}) is neither a class id nor a class name")
    if not 0 <= label < num_classes:
        raise ValueError(f"class_label {label} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return label


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def row_settings(row: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings of one input row: its own num_steps, guidance_scale, sampler where given."""
    out = {k: defaults[k] for k in SAMPLING_KEYS if k in defaults}
    for key, cast in (("num_steps", int), ("guidance_scale", float), ("sampler", str)):
        value = row.get(key)
        if _given(value):
            if cast is int and not float(value).is_integer():
                raise ValueError(f"num_steps={value!r} must be a whole number")
            out[key] = cast(value)
    return out


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([
        ColSpec(AnyType(), "class_label"),               # a class id, or a class name
        ColSpec("long", "seed"),
        ColSpec(AnyType(), "num_steps", required=False),  # Any: absent in some rows of a batch (null)
        ColSpec(AnyType(), "guidance_scale", required=False),
        ColSpec(AnyType(), "sampler", required=False),
    ])
    outputs = Schema([ColSpec("binary", "image"), ColSpec("long", "class_label"), ColSpec("long", "seed")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(num_classes: int, diffusion: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Two rows: the defaults, and every optional setting given (2 steps of a second sampler that
    fits the model's objective, guidance 1.5: a quick example). A model whose guidance was learned
    (meanflow): 2 steps of its own sampler, guidance 1 (it takes no other)."""
    from dit_core.diffusion import MEANFLOW_SAMPLER, SAMPLERS_BY_OBJECTIVE, guidance_learned, objective_name

    learned = guidance_learned(diffusion)
    other = MEANFLOW_SAMPLER if learned else SAMPLERS_BY_OBJECTIVE[objective_name(diffusion)][1]   # ddim (eps), heun (flow)
    return pd.DataFrame([
        {"class_label": 0, "seed": 0, "num_steps": None, "guidance_scale": None, "sampler": None},
        {"class_label": min(1, num_classes - 1), "seed": 1, "num_steps": 2, "guidance_scale": 1.0 if learned else 1.5,
         "sampler": other},
    ])


class DiTImageGenerator(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the bundle once in ``load_context``, generates in ``predict``."""

    batch_size = 64

    def load_context(self, context: Any) -> None:
        from dit_core.pipeline import ImagePipeline

        contents = read_bundle(context.artifacts[BUNDLE])
        autoencoder, scale = load_bundle_autoencoder(contents)
        self.sampling = contents.sampling
        self.class_names = [str(n) for n in contents.latents.get("class_names") or []]
        self.pipeline = ImagePipeline(contents.build_model(), autoencoder, scale, contents.config.get("diffusion"))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from dit_core.data import png_bytes
        from dit_core.pipeline import SamplingSettings

        rows = pd.DataFrame(model_input).to_dict("records")
        for column in ("class_label", "seed"):
            if rows and column not in rows[0]:
                raise ValueError(f"input rows lack the column {column!r}; give class_label and seed in every row")
        labels = [resolve_label(r["class_label"], self.class_names, self.pipeline.num_classes) for r in rows]
        seeds = []
        for r in rows:
            if not _given(r["seed"]) or not float(r["seed"]).is_integer():
                raise ValueError(f"seed {r['seed']!r} is not an integer; give every row an integer seed >= 0")
            seeds.append(int(r["seed"]))
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):  # rows with the same settings share batches
            groups.setdefault(tuple(sorted(row_settings(r, self.sampling).items())), []).append(i)
        images: list[bytes] = [b""] * len(rows)
        for key, idx in groups.items():
            settings = SamplingSettings(**dict(key))
            out = self.pipeline.generate([labels[i] for i in idx], [seeds[i] for i in idx], settings, self.batch_size)
            for i, image in zip(idx, out):
                images[i] = png_bytes(image)
        return pd.DataFrame({"image": images, "class_label": np.asarray(labels, np.int64), "seed": np.asarray(seeds, np.int64)})


if __name__ != "ray_jobs.mlflow_model":
    # MLflow's "models from code": the registered model is this file, run under another module name
    # when the model loads (and once when it is logged); nothing of it is pickled.
    mlflow.models.set_model(DiTImageGenerator())


__all__ = [
    "AUTOENCODER_DIR",
    "BUNDLE",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "BrokenBundle",
    "BundleContents",
    "DiTImageGenerator",
    "input_example",
    "load_bundle_autoencoder",
    "read_bundle",
    "resolve_label",
    "row_settings",
    "signature",
    "write_bundle",
]
