"""Helpers for code that runs inside Ray actors."""

from __future__ import annotations

import torch


def use_assigned_cpus() -> None:
    """Inside a Ray actor on CPUs: as many PyTorch threads as the actor was given CPUs (rounded, at
    least one), so that actors sharing a node do not oversubscribe its cores. Elsewhere (a GPU, the
    driver, plain Python): nothing."""
    import ray

    if torch.cuda.is_available() or not ray.is_initialized():
        return
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return
    torch.set_num_threads(max(1, round(context.get_assigned_resources().get("CPU", 1))))
