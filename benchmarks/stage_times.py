"""The default run's wall time per stage, with each Ray stage starting its own Ray runtime (plain
``dvc repro``) and with one local cluster the stages share (``make run``: ``python -m
ray_jobs.local_cluster dvc repro``), the two alternating in one copy of the project so that load on
the machine hits both alike.

Every round is ``dvc repro -f`` (all stages) after removing the checkpoints, so the train stage
trains its full ``train.steps`` each time rather than resuming a finished run. An untimed ``dvc
repro`` first pays what only a project's first run pays (the MLflow database's creation, the first
registration of the model). The figures are medians over ``--rounds``.

    python -m benchmarks.stage_times --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from .common import machine, table, write_result
from .image_sets import copy_project, timed_repro

KINDS = {
    "per-stage": ["dvc", "repro", "-f"],
    "shared": [sys.executable, "-m", "ray_jobs.local_cluster", "dvc", "repro", "-f"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of each kind, alternating")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--work", default="/tmp/dit-stage-times")
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    env = copy_project(work)
    dvc = str(Path(sys.executable).parent / "dvc")
    for _ in range(a.warmup):
        timed_repro([dvc, "repro"], work, env)
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(a.rounds):
        for kind, command in KINDS.items():
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            total, stages, _ = timed_repro([dvc if c == "dvc" else c for c in command], work, env)
            runs[kind].append({"seconds": total, "stages": stages})
            print(f"round {r} {kind}: {total:.1f} s " + ", ".join(f"{s} {t:.1f}" for s, t in stages.items()), flush=True)
    names = list(runs["per-stage"][0]["stages"]) + ["(all)"]
    median = {k: {n: statistics.median(run["stages"][n] if n != "(all)" else run["seconds"] for run in v) for n in names}
              for k, v in runs.items()}
    rows = [{"stage": n, "per-stage Ray s": median["per-stage"][n], "shared cluster s": median["shared"][n],
             "shared / per-stage": median["shared"][n] / median["per-stage"][n]} for n in names]
    print(machine())
    print(table(rows, ["stage", "per-stage Ray s", "shared cluster s", "shared / per-stage"]))
    print("wrote", write_result("stage_times", {"settings": vars(a), "runs": runs, "median": median, "rows": rows}, a.tag))


if __name__ == "__main__":
    main()
