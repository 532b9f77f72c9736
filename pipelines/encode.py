"""encode stage: prepared images -> autoencoder latents with the Ray Data job in ray_jobs/encode.py.

    python -m pipelines.encode --prepared data/prepared --autoencoder models/autoencoder --out data/latents

Every path may be an ``s3://`` URI; ``RAY_ADDRESS`` picks the cluster (unset: a local runtime).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import StageIO, load_params, run_stage
from ray_jobs.encode import config_from, encode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", required=True, help="prepared data folder or s3:// URI")
    p.add_argument("--autoencoder", required=True, help="autoencoder folder, s3:// URI or HF id (local cache)")
    p.add_argument("--out", required=True, help="latents folder or s3:// URI")
    p.add_argument("--params", default="params.yaml")
    a = p.parse_args(argv)
    params = load_params("encode", a.params)

    def core(job: argparse.Namespace) -> None:
        stats = encode(config_from(job.prepared, job.autoencoder, job.out, params))
        print(f"encode: {stats['counts']} latents {stats['latent_shape']} views {stats['views']} "
              f"scale {stats['scale_factor']:.5f} -> {job.out}")

    run_stage("encode", a, StageIO(inputs=("prepared", "autoencoder"), outputs=("out",)), core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
