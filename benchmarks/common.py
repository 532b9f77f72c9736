"""Shared helpers for the benchmark scripts: machine facts, timing, the matmul peak, results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("numpy", "diffusers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **_versions(),
    }
    try:
        # Other work on the machine while the benchmark ran shows here (the 1, 5, 15 minute loads).
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, each call synchronised, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, repeats: int = 10) -> float:
    """Measured dense matmul rate in FLOP/s (multiply-add = 2 FLOPs) on square random matrices: the
    median of ``repeats`` products of size ``n``; with no ``n``, the best median over a few sizes
    (8192 on a GPU; 1024, 2048 and 3072 on a CPU, whose rate moves by 10-20% between sizes and runs:
    the best is the peak, and MFU against it is the conservative figure)."""
    if n is None:
        sizes = (8192,) if device.type == "cuda" else (1024, 2048, 3072)
        return max(matmul_peak(device, dtype, size, repeats) for size in sizes)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * n**3 / median(times)


def flops_of(fn: Callable[[], Any]) -> int:
    """FLOPs of one call counted by torch.utils.flop_counter (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def write_result(name: str, payload: dict[str, Any], tag: str | None = None) -> Path:
    """benchmarks/results/{name}-{cpu|gpu}[-{tag}].json, written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **payload}
    stem = f"{name}-{'gpu' if torch.cuda.is_available() else 'cpu'}" + (f"-{tag}" if tag else "")
    path = Path(os.environ.get("BENCH_RESULTS", RESULTS)) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([_fmt(r.get(c)) for c in columns]) for r in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)
