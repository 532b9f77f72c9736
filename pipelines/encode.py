"""encode stage: prepared images -> autoencoder latents with the Ray Data job in ray_jobs/encode.py.

    python -m pipelines.encode --prepared data/prepared --autoencoder models/autoencoder --out data/latents

Every path may be an ``s3://`` URI; ``RAY_ADDRESS`` picks the cluster (unset: a local runtime).
"""

from __future__ import annotations

import argparse
import sys

from dit_core import settings
from pipelines.common import PARAMS_FILE, StageIO, run_stage
from ray_jobs.encode import EncodeConfig, command_parser, config_from, encode


def main(argv: list[str] | None = None) -> int:
    p = command_parser(__doc__, PARAMS_FILE)
    a = p.parse_args(argv)
    with p.refusing(a):   # typed and sound before any work
        params = settings.read_settings(a, EncodeConfig, "encode")
        config_from(a.prepared, a.autoencoder, a.out, params).validate()

    def core(job: argparse.Namespace) -> None:
        stats = encode(config_from(job.prepared, job.autoencoder, job.out, params))
        print(f"encode: {stats['counts']} latents {stats['latent_shape']} views {stats['views']} "
              f"scale {stats['scale_factor']:.5f} -> {job.out}")

    run_stage("encode", a, StageIO(inputs=("prepared", "autoencoder"), outputs=("out",)), core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
