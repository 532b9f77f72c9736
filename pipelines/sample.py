"""sample stage: images from the trained model with the Ray Data job in ray_jobs/sample.py, plus a
grid of samples per class.

    python -m pipelines.sample --pointer models/dit.json --out samples

``sample.model: null`` samples the model version the train stage registered (``models/dit.json``);
any MLflow model URI, checkpoint (local or s3://) or official ``.pt`` may be given instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dit_core import settings
from ray_jobs import storage, tracking
from ray_jobs.sample import SampleConfig, run
from pipelines.common import PARAMS_FILE, StageIO, run_stage

STAGE_KEYS = ("model",)   # params of this stage that are not SampleConfig fields


def model_uri(params: dict[str, Any], pointer_path: str | None) -> str:
    """The model to sample: ``sample.model``, else the registered version (or, untracked, the final
    checkpoint) in the train stage's pointer."""
    if params.get("model"):
        return str(params["model"])
    if not pointer_path or not storage.exists(pointer_path):
        raise FileNotFoundError(f"sample.model is null and the train pointer {pointer_path} does not exist; run the train stage or set sample.model")
    try:
        pointer = storage.read_json(pointer_path)
    except ValueError as e:   # empty or cut short: a train stage that did not finish writing it
        raise ValueError(f"the train pointer {pointer_path} is not JSON ({e}); re-run the train stage or set sample.model") from e
    uri = (pointer.get("model_uri") or pointer.get("checkpoint")) if isinstance(pointer, dict) else None
    if not uri:
        raise ValueError(f"{pointer_path} names neither a model version nor a checkpoint; re-run the train stage")
    return str(uri)


def config_from(params: dict[str, Any], model: str, out: str) -> SampleConfig:
    return settings.build(SampleConfig, {**params, "model": model, "output": out}, "sample", ignore=STAGE_KEYS)


def main(argv: list[str] | None = None) -> int:
    p = settings.command_parser(__doc__)
    p.add_argument("--pointer", default=None, help="the train stage's pointer (models/dit.json)")
    p.add_argument("--out", required=True, help="samples folder or s3:// prefix")
    settings.add_settings_arguments(p, SampleConfig, "sample", PARAMS_FILE, skip=("output",), example="num_images=64")
    a = p.parse_args(argv)
    params = settings.read_settings(a, SampleConfig, "sample")
    config_from(params, "unresolved", a.out)  # typed, complete and sound before any work, here and not on a cluster

    def core(job: argparse.Namespace) -> None:
        cfg = config_from(params, model_uri(params, job.pointer), job.out)
        summary = run(cfg)
        print(f"sample: {summary['images']} images in {summary['seconds']:.1f}s ({summary['images_per_second']:.2f}/s) -> {cfg.output}")
        print(json.dumps(summary, indent=2))

    local_model = {"sample.model": params.get("model"), "sample.autoencoder": params.get("autoencoder")}
    io = StageIO(files_in=("pointer",), outputs=("out",), tracking=tracking.tracking_uri,
                 settings_paths=lambda _: {k: v for k, v in local_model.items() if v and not str(v).startswith(("models:/", "runs:/"))})
    run_stage("sample", a, io, core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
