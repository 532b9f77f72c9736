"""Markdown tables of the results in benchmarks/results/ (for BENCHMARKS.md).

    python -m benchmarks.report [FILE.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import RESULTS, table

COLUMNS = {
    "train_step": ["preset", "variant", "batch", "ours_img_s", "peer_img_s", "ratio", "ours_step_ms", "ours_mfu", "peer_mfu",
                   "gflop_per_img", "ours_peak_gib", "peer_peak_gib", "error"],
    "sampling": ["sampler", "nfe_per_image", "timed_evals", "ours_img_s", "peer_img_s", "ratio", "ours_ms_per_eval", "peer_ms_per_eval", "error"],
    "ab_block": ["variant", "eval_ms", "eval_speedup", "train_ms", "train_speedup", "max_abs_diff_vs_first"],
    "ray_scaling": ["actors", "images", "seconds", "images_per_s", "speedup", "efficiency"],
    "ray_scaling_encode": ["actors", "images", "seconds", "images_per_s", "speedup", "efficiency"],
}


def describe(path: Path) -> str:
    res = json.loads(path.read_text())
    m = res["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_threads']} threads)"
    head = [f"### {path.name}" + ("" if res.get("complete", True) else " (incomplete)"), "",
            f"{res['when']}, {where}, torch {m['torch']}, diffusers {m.get('diffusers')}, load average {m.get('load_average')}; "
            f"settings {json.dumps({k: v for k, v in res['settings'].items() if k != 'argv'})}"]
    if "matmul_peak_tflops" in res:
        head.append(f"; measured matmul peak (TFLOP/s): " + ", ".join(f"{k} {v:.3g}" for k, v in res["matmul_peak_tflops"].items()))
    rows = res["rows"]
    cols = [c for c in COLUMNS[res["benchmark"]] if any(c in r for r in rows)]
    return "\n".join([head[0], "", "".join(head[2:]), "", table(rows, cols), ""])


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(RESULTS.glob("*.json"))
    for path in paths:
        print(describe(path))


if __name__ == "__main__":
    main()
