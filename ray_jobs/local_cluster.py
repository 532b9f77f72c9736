"""Run a command (``dvc repro``, ``dvc exp run``) with one local Ray cluster that all its stages join.

    python -m ray_jobs.local_cluster dvc repro        (``make run`` does this; ``dit local-cluster dvc repro``)

Without it, each Ray stage (encode, train, sample, evaluate) starts a private Ray runtime and stops
it again, a few seconds each way (BENCHMARKS.md, "The default run, stage by stage"). Here the cluster
starts once, ``RAY_ADDRESS`` points the command's stages at it, and it stops when the command ends,
whatever its exit status. The cluster runs the dashboard, which Ray Train's placement-group cleaner
and ``ray list`` need (the State API). With ``RAY_ADDRESS`` already set, the command runs as is, on
that cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    if shutil.which(argv[0]) is None:   # before a cluster is started for nothing
        print(f"local_cluster: command {argv[0]!r} not found; give a command on PATH, e.g. `dvc repro` "
              "(after `source .venv/bin/activate`)", file=sys.stderr)
        return 127
    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(argv)

    import ray

    # No idle workers prestarted for this process: it runs no tasks, the stages bring their own.
    context = ray.init(address="local", include_dashboard=True, configure_logging=False, log_to_driver=False,
                       _system_config={"prestart_worker_first_driver": False})
    address = ray.get_runtime_context().gcs_address
    print(f"local Ray cluster at {address} (dashboard http://{context.dashboard_url}) for: {' '.join(argv)}",
          file=sys.stderr, flush=True)
    try:
        child = subprocess.Popen(argv, env={**os.environ, "RAY_ADDRESS": address})
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the command got the same signal: let it stop, then stop the cluster
                continue
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
