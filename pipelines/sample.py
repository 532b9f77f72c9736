"""sample stage: images from the trained model with the Ray Data job in ray_jobs/sample.py, plus a
grid of samples per class.

    python -m pipelines.sample --trained models/dit --out samples

``sample.model: null`` samples the train stage's model folder (``models/dit``, a DVC output: no
tracking store needed); any MLflow model URI, checkpoint (local or s3://) or official ``.pt`` may be
given instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dit_core import settings
from ray_jobs import tracking
from ray_jobs.model_source import is_model_folder
from ray_jobs.sample import SampleConfig, run
from pipelines.common import StageIO, run_stage, stage_arguments

STAGE_KEYS = ("model",)   # params of this stage that are not SampleConfig fields


def model_uri(params: dict[str, Any], trained: str | None) -> str:
    """The model to sample: ``sample.model``, else the train stage's model folder."""
    if params.get("model"):
        return str(params["model"])
    if not trained or not is_model_folder(trained):
        raise FileNotFoundError(f"sample.model is null and the train stage's model folder {trained} holds no model; "
                                "run the train stage (`dvc repro train`), fetch it (`dvc pull`), or set sample.model")
    return str(trained)


def config_from(params: dict[str, Any], model: str, out: str) -> SampleConfig:
    return settings.build(SampleConfig, {**params, "model": model, "output": out}, "sample", ignore=STAGE_KEYS)


def main(argv: list[str] | None = None) -> int:
    flags = {"--trained": "the train stage's model folder (models/dit), sampled when sample.model is null",
             "--out": "samples folder or s3:// prefix"}
    p, a, params = stage_arguments(argv, __doc__, flags, SampleConfig, "sample", "num_images=64", optional=("--trained",),
                                   skip=("output",))
    with p.refusing(a):   # typed, complete and sound before any work, here and not on a cluster
        config_from(params, "unresolved", a.out)

    def core(job: argparse.Namespace) -> None:
        cfg = config_from(params, model_uri(params, job.trained), job.out)
        summary = run(cfg)
        print(f"sample: {summary['images']} images in {summary['seconds']:.1f}s ({summary['images_per_second']:.2f}/s) -> {cfg.output}")
        print(json.dumps(summary, indent=2))

    local_model = {"sample.model": params.get("model"), "sample.autoencoder": params.get("autoencoder")}
    io = StageIO(inputs=("trained",), outputs=("out",), tracking=tracking.tracking_uri,
                 settings_paths=lambda _: {k: v for k, v in local_model.items() if v and not str(v).startswith(("models:/", "runs:/"))})
    run_stage("sample", a, io, core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
