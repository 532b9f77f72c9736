"""MeanFlow training-step cost: the JVP loss against a plain flow step, and the attention path of the JVP.

Forward-mode AD (torch.func.jvp) is not implemented for PyTorch's flash / memory-efficient SDPA
kernels, so the JVP needs another attention path. Variants, each one optimizer-free training step
(loss, backward) of the same model, batch and times (every sample with r < t: the JVP runs on the
whole batch whatever the share):

  flow         the flow objective (fwd + bwd, default SDPA kernel): the baseline
  flow-math    the same under the math SDPA kernel (the attention path's own cost)
  meanflow     dit_core's objective: target by a no-grad JVP under the math SDPA kernel, then
               fwd + bwd with the default kernel (the chosen path)
  mf-explicit  the same, the JVP through explicit softmax(q k^T / sqrt(d)) v instead of SDPA math
  mf-joint     one JVP with gradient (under math), its primal output u used for the loss
  mf-fd        the target's d/dt u by a forward finite difference (one more no-grad forward, any
               kernel); inexact: its error against the JVP is printed too

Timings: one process per model, the variants alternating step by step (flow, flow-math, meanflow, ...,
flow, ...), so that the load of a shared machine hits them alike; the median per variant.
Memory (``--memory``): each variant in its own process, so that its peak is its own: peak RSS above the RSS
after a warm-up step on a CPU (the first JVP loads torch's forward-AD machinery once), peak
allocated above the baseline on a GPU. ``--threads 1`` by default: on a shared CPU, timings with more threads
than free cores are noise.

    python -m benchmarks.meanflow_step                       # tiny DiT and DiT-S/2 (32x32 latents), batch 4
    python -m benchmarks.meanflow_step --models DiT-S/2 --batch-size 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit_core.diffusion import FlowMatching, MeanFlow, MeanFlowSettings
from dit_core.models import DiT, DiTConfig, preset_config

from .common import machine, median, table, time_fn, write_result

VARIANTS = ("flow", "flow-math", "meanflow", "mf-explicit", "mf-joint", "mf-fd")
TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4)
FD_STEP = 1e-3   # in t in [0, 1]; the printed error table covers others


def build(name: str, input_size: int, device: torch.device) -> DiT:
    fields = dict(in_channels=4, num_classes=10, learn_sigma=False, interval_embed=True)
    cfg = DiTConfig(**TINY, **fields) if name == "tiny" else preset_config(name, input_size=input_size, **fields)
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():   # non-zero everywhere: a fresh adaLN-Zero DiT outputs zeros, and its JVP too
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.normal_(0, 0.02)
    return model.to(device).train()


def explicit_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


class _ExplicitAttention:
    """Swap SDPA for explicit attention inside the block (dit_core.models calls F.scaled_dot_product_attention)."""

    def __enter__(self) -> None:
        self.saved = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = explicit_sdpa

    def __exit__(self, *exc: Any) -> None:
        torch.nn.functional.scaled_dot_product_attention = self.saved


def make_step(variant: str, model: DiT, batch: int, device: torch.device) -> Callable[[], None]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    x, noise = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    t = (0.3 + 0.6 * torch.rand(batch, generator=g)).to(device)
    r = t * torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    mf = MeanFlow(MeanFlowSettings(interval_share=1.0))
    flow = FlowMatching()
    fn = lambda z, rr, tt, yy: model(z, tt, yy, r=rr, drop_labels=False)  # noqa: E731
    u_fn = mf.average_velocity_fn(fn, y, cfg.in_channels)
    z = flow.interpolate(x, noise, t)
    v = noise - x
    dt = (t - r).view(-1, 1, 1, 1)

    def manual(target_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def step() -> None:
            u, dudt = target_fn()
            loss = (u - (v - dt * dudt).detach()).pow(2).sum(dim=(1, 2, 3)).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    if variant in ("flow", "flow-math"):
        def step() -> None:
            with sdpa_kernel(SDPBackend.MATH) if variant == "flow-math" else _null():
                flow.losses(lambda zz, tt: model(zz, tt, y, drop_labels=False), x, t, noise)["loss"].mean().backward()
            model.zero_grad(set_to_none=True)
        return step
    if variant == "meanflow":
        def step() -> None:
            mf.losses(fn, x, (r, t), y, cfg.num_classes, 0.1, noise)["loss"].mean().backward()
            model.zero_grad(set_to_none=True)
        return step
    if variant == "mf-explicit":
        def target() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad(), _ExplicitAttention():
                _, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
            return u_fn(z, r, t), dudt
        return manual(target)
    if variant == "mf-joint":
        def target() -> tuple[torch.Tensor, torch.Tensor]:
            with sdpa_kernel(SDPBackend.MATH):
                u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
            return u, dudt.detach()
        return manual(target)
    if variant == "mf-fd":
        def target() -> tuple[torch.Tensor, torch.Tensor]:
            u = u_fn(z, r, t)
            with torch.no_grad():
                ahead = u_fn(z + FD_STEP * v, r, t + FD_STEP)
            return u, (ahead - u.detach()) / FD_STEP
        return manual(target)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


class _null:
    def __enter__(self) -> None: ...

    def __exit__(self, *exc: Any) -> None: ...


def _hwm_mb() -> float:
    """Peak RSS since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(name: str, variant: str, batch: int, input_size: int, repeats: int, threads: int | None) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)   # a shared CPU: more threads than free cores make every step spin
    model = build(name, input_size, device)
    step = make_step(variant, model, batch, device)
    # the warm-up step first: the first JVP loads ~150 MB of torch's forward-AD code and tables once,
    # which is not the step's memory; then the peak is reset (Linux: clear_refs 5 resets VmHWM)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    times = time_fn(step, device, warmup=0, repeats=repeats)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _hwm_mb() - base
    return {"model": name, "variant": variant, "seconds": median(times), "all_seconds": times, "peak_mb": peak}


def time_variants(name: str, variants: list[str], batch: int, input_size: int, repeats: int) -> list[dict[str, Any]]:
    """Median seconds per step of each variant, the variants interleaved round by round."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(name, input_size, device)
    steps = {v: make_step(v, model, batch, device) for v in variants}
    for step in steps.values():   # warm-up (the first JVP also loads torch's forward-AD machinery)
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, step in steps.items():
            times[v] += time_fn(step, device, warmup=0, repeats=1)
    return [{"model": name, "variant": v, "seconds": median(ts), "all_seconds": ts} for v, ts in times.items()]


def fd_error(name: str, input_size: int, batch: int) -> list[dict[str, Any]]:
    """Relative error of the finite-difference d/dt u against the JVP's, in float32."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(name, input_size, device).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    z, v = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    t = (0.3 + 0.6 * torch.rand(batch, generator=g)).to(device)
    r = 0.5 * t
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    u_fn = MeanFlow().average_velocity_fn(lambda zz, rr, tt, yy: model(zz, tt, yy, r=rr), y, cfg.in_channels)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        u, exact = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    rows = []
    with torch.no_grad():
        for h in (1e-2, 1e-3, 1e-4, 1e-5):
            fd = (u_fn(z + h * v, r, t + h) - u) / h
            rows.append({"model": name, "fd_step": h, "rel_error": float((fd - exact).norm() / exact.norm())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,DiT-S/2", help="comma-separated: tiny and/or DiT presets")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--input-size", type=int, default=32, help="latent side of the presets (32: ImageNet 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)   # a child process
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run (0: torch's default)")
    ap.add_argument("--memory", action="store_true", help="also each variant's peak memory, in a process of its own")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.batch_size, args.input_size, args.repeats, args.threads)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    variants = args.variants.split(",")
    for name in args.models.split(","):
        timed = time_variants(name, variants, args.batch_size, args.input_size, args.repeats)
        base = next((r["seconds"] for r in timed if r["variant"] == "flow"), None)
        for r in timed:
            r["x_flow"] = r["seconds"] / base if base else None
            if args.memory:
                cmd = [sys.executable, "-m", "benchmarks.meanflow_step", "--one", name, r["variant"], "--batch-size",
                       str(args.batch_size), "--input-size", str(args.input_size), "--repeats", "1",
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                r["peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] if out.returncode == 0 else None
            print(r, flush=True)
        rows += timed
    errors = [e for name in args.models.split(",") for e in fd_error(name, args.input_size, args.batch_size)]
    print(f"\n{args.threads or torch.get_num_threads()} CPU threads, load average {machine()['load_average']}; "
          f"batch {args.batch_size}, presets at {args.input_size}x{args.input_size} latents, median of {args.repeats} interleaved steps\n")
    print(table(rows, ["model", "variant", "seconds", "x_flow", "peak_mb", "error"]))
    print("\nfinite-difference d/dt u against the JVP (float32):\n")
    print(table(errors, ["model", "fd_step", "rel_error"]))
    path = write_result("meanflow_step", {"args": vars(args), "rows": rows, "fd_error": errors}, tag=args.tag)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
