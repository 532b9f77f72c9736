"""Sampling benchmark: images per second and network evaluations per image for each sampler,
ours against diffusers' DiTTransformer2DModel of identical dimensions, both driven by the same
sampler loop (dit_core's), classifier-free guidance batched into one forward pass of 2N.

With ``--max-evals K`` a long trajectory is timed over its first K network evaluations only and
images/s is extrapolated to the full count (every step of these samplers costs the same: one
forward pass plus a few elementwise ops); the row's ``timed_evals`` says how many were timed. With
``--cache-interval k`` (ours only, ``dit_core.models.BlockCache``) make K a multiple of k, so the
timed evaluations hold full and cached ones in the trajectory's proportion.

    python -m benchmarks.sampling --preset DiT-S/2 --batch-size 8 --input-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from typing import Any, Callable

import torch

from dit_core.diffusion import create_diffusion, make_sampler, randn, sample_loop
from dit_core.diffusion.samplers import Sampler
from dit_core.models import BlockCache, DiT, preset_config

from .common import machine, median, table, time_fn, write_result
from .train_step import WHO, peer_model

SAMPLER_SETTINGS = (("ddpm", 250), ("ddim", 50), ("dpm-solver++", 10), ("dpm-solver++", 20), ("dpm-solver++", 25))


def guided_fn(which: str, model: torch.nn.Module, y: torch.Tensor, scale: float, null: int, cache_interval: int = 1) -> Callable:
    """(x, t) -> guided output, conditional and null halves in one batched forward pass of 2N.
    ``cache_interval`` > 1 (ours only): a ``BlockCache`` for one trajectory."""
    cache = BlockCache(cache_interval) if which == "ours" and cache_interval > 1 else None

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if which == "ours":
            return model.forward_with_cfg(x, t, y, scale, None, cache)
        n = x.shape[0]
        out = model(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.cat([y, torch.full_like(y, null)])).sample
        c = x.shape[1]
        cond, uncond = out[:n], out[n:]
        return torch.cat([uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)

    return fn


def truncated_loop(sampler: Sampler, fn: Callable, noise: torch.Tensor, generator: torch.Generator, evals: int) -> torch.Tensor:
    """dit_core's sample_loop, stopped after ``evals`` network evaluations (for timing only)."""
    if evals >= sampler.num_evaluations:
        return sample_loop(sampler, fn, noise, generator)
    sampler.reset()
    x = noise.float()
    for i in range(evals):
        t = torch.full((x.shape[0],), int(sampler.model_timesteps[i]), device=x.device, dtype=torch.long)
        x = sampler.step(i, x, fn(x, t), generator)
    return x


def run(preset: str, batch: int, input_size: int, scale: float, rounds: int, settings: list[tuple[str, int]], bf16: bool,
        compile_mode: str | None, max_evals: int | None, tag: str | None = None, cache_interval: int = 1) -> dict[str, Any]:
    """Every row, and the JSON rewritten after each (``complete`` false until the last)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = preset_config(preset, input_size=input_size, num_classes=1000)
    torch.manual_seed(0)
    models = {"ours": DiT(cfg), "peer": peer_model(cfg)}
    # A fresh adaLN-Zero model outputs zeros; give both the same kind of non-zero weights so that
    # no branch is trivially cheap and the outputs are those of a working network.
    for m in models.values():
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        m.to(device).eval()
    y = torch.arange(batch, device=device) % cfg.num_classes
    diffusion = create_diffusion()
    fns = {w: guided_fn(w, models[w], y, scale, cfg.num_classes) for w in WHO}
    mode = None if compile_mode == "default" else compile_mode
    if compile_mode and cache_interval > 1:
        # The cache's per-trajectory state is Python: compile our blocks and final layer one by
        # one (the decision to run or reuse them stays eager); the peer is compiled whole.
        for module in [*models["ours"].blocks, models["ours"].final_layer]:
            module.compile(mode=mode)
        fns["peer"] = torch.compile(fns["peer"], mode=mode)
    elif compile_mode:
        fns = {w: torch.compile(f, mode=mode) for w, f in fns.items()}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rows: list[dict[str, Any]] = []
    run_settings = {"preset": preset, "batch": batch, "input_size": input_size, "guidance_scale": scale, "rounds": rounds,
                    "bf16": bf16, "compile_mode": compile_mode, "max_evals": max_evals, "cache_interval": cache_interval,
                    "argv": sys.argv[1:]}

    def payload(complete: bool) -> dict[str, Any]:
        return {"settings": run_settings, "complete": complete, "rows": rows}

    for name, steps in settings:
        row: dict[str, Any] = {"sampler": f"{name}-{steps}"}
        try:
            sampler = make_sampler(name, diffusion, steps)
            evals = sampler.num_evaluations if not max_evals else min(max_evals, sampler.num_evaluations)
            times: dict[str, list[float]] = {w: [] for w in WHO}

            def once(w: str) -> None:
                g = torch.Generator().manual_seed(0)
                noise = randn((batch, cfg.in_channels, input_size, input_size), g, device)
                # ours with a cache: a fresh one per trajectory (its compiled blocks are shared)
                fn = guided_fn(w, models[w], y, scale, cfg.num_classes, cache_interval) if cache_interval > 1 and w == "ours" else fns[w]
                with torch.inference_mode(), autocast():
                    truncated_loop(sampler, fn, noise, g, evals)

            for w in WHO:
                once(w)  # warm-up (and compilation)
            for _ in range(rounds):
                for w in WHO:
                    times[w] += time_fn(lambda: once(w), device, warmup=0, repeats=1)
            full = sampler.num_evaluations / evals
            for w in WHO:
                row[f"{w}_img_s"] = batch / (median(times[w]) * full)
                row[f"{w}_ms_per_eval"] = 1e3 * median(times[w]) / evals
            row.update(nfe_per_image=2 * sampler.num_evaluations, forward_batch=2 * batch, timed_evals=evals,
                       ratio=row["ours_img_s"] / row["peer_img_s"])
        except Exception as e:  # noqa: BLE001 - keep the other samplers' rows
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(table([row], COLUMNS), flush=True)
        write_result("sampling", payload(False), tag)
    return payload(True)


COLUMNS = ["sampler", "nfe_per_image", "timed_evals", "ours_img_s", "peer_img_s", "ratio", "ours_ms_per_eval", "peer_ms_per_eval", "error"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (the forward pass sees twice as many)")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--samplers", default=",".join(f"{n}:{s}" for n, s in SAMPLER_SETTINGS))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the guided model call; optional mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--max-evals", type=int, default=None, help="time at most this many evaluations per trajectory")
    p.add_argument("--cache-interval", type=int, default=1,
                   help="ours only: run the blocks on one step in this many (dit_core.models.BlockCache); eager only")
    p.add_argument("--tag", default=None, help="suffix of the results file name")
    a = p.parse_args()
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in a.samplers.split(",")]
    res = run(a.preset, a.batch_size, a.input_size, a.guidance_scale, a.rounds, settings, a.bf16, a.compile, a.max_evals, a.tag, a.cache_interval)
    print(machine())
    print(table(res["rows"], COLUMNS))
    print("wrote", write_result("sampling", res, a.tag))


if __name__ == "__main__":
    main()
