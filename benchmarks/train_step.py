"""Training-step benchmark: ours against diffusers' DiTTransformer2DModel of identical dimensions.

Prints a table and writes benchmarks/results/train_step-{cpu,gpu}[-TAG].json. Within a variant the
two models' runs alternate (ours, peer, ours, peer, ...) so that drift of the machine hits both
alike. A variant is a dtype (fp32 | bf16 autocast) with optional "+compile" (torch.compile) and
"+ckpt" (gradient checkpointing) and "+foreach" (AdamW's multi-tensor path instead of the fused
kernel, which the pipeline uses on CPU and GPU alike), e.g. ``bf16+compile``. FLOPs per image are counted once per
preset with torch.utils.flop_counter on an un-checkpointed forward+backward (recomputation is not
model work); MFU is against the matmul rate measured at the start of the same run.

    python -m benchmarks.train_step --presets DiT-S/2 --batch-size 8 --input-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dit_core.diffusion import create_diffusion, training_losses
from dit_core.models import DiT, DiTConfig, preset_config

from .common import flops_of, machine, matmul_peak, median, table, time_fn, write_result

WHO = ("ours", "peer")
CPU_VARIANTS = ("fp32", "bf16", "fp32+compile", "fp32+ckpt")
GPU_VARIANTS = ("fp32", "bf16", "bf16+compile", "bf16+ckpt")


@dataclass(frozen=True)
class Variant:
    dtype: str          # "fp32" (tf32 matmuls on a GPU) or "bf16" (autocast)
    compile: bool
    ckpt: bool
    foreach: bool = False  # AdamW's multi-tensor path instead of the fused kernel

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = name.split("+")
        if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"compile", "ckpt", "foreach"}:
            raise ValueError(f"variant {name!r}: a dtype (fp32 | bf16) then optional +compile, +ckpt, +foreach")
        return cls(parts[0], "compile" in parts[1:], "ckpt" in parts[1:], "foreach" in parts[1:])


def peer_model(cfg: DiTConfig) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
        norm_type="ada_norm_zero",
    )


def build_model(which: str, cfg: DiTConfig) -> tuple[torch.nn.Module, Callable]:
    """The module and a (x, t, y) -> output callable for it."""
    if which == "ours":
        model = DiT(cfg)
        return model, model
    model = peer_model(cfg)
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    return model, lambda x, t, y: model(x, timestep=t, class_labels=y).sample


def inputs(cfg: DiTConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    return x, t, y, noise


def autocast_for(variant: Variant, device: torch.device):
    if variant.dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_step(which: str, preset: str, variant: Variant, batch: int, input_size: int, device: torch.device):
    """(step, model, optimizer): one optimizer step of the DiT training loss on fixed inputs."""
    cfg = preset_config(preset, input_size=input_size, num_classes=1000, grad_checkpointing=variant.ckpt)
    model, forward = build_model(which, cfg)
    model.to(device).train()
    if variant.compile:
        forward = torch.compile(forward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0,
                            **({"foreach": True} if variant.foreach else {"fused": True}))
    diffusion = create_diffusion()
    x, t, y, noise = inputs(cfg, batch, device)
    autocast = autocast_for(variant, device)

    def step() -> None:
        with autocast():
            loss = training_losses(diffusion, lambda xt, tt: forward(xt, tt, y), x, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model, opt


def train_flops_per_image(preset: str, input_size: int, device: torch.device, batch: int = 2) -> float:
    """Model FLOPs of forward + backward per image (our model; the peer computes the same layers)."""
    cfg = preset_config(preset, input_size=input_size, num_classes=1000)
    model = DiT(cfg).to(device).train()
    x, t, y, noise = inputs(cfg, batch, device)
    diffusion = create_diffusion()
    flops = flops_of(lambda: training_losses(diffusion, lambda xt, tt: model(xt, tt, y), x, t, noise)["loss"].mean().backward())
    del model
    return flops / batch


def static_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes held between steps: parameters, gradients, optimizer state."""
    seen, total = set(), 0
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def peak_step_gib(step: Callable[[], None], model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> float | None:
    """GPU: one model's peak memory over a step (its static bytes + the step's transient peak), so
    the other model resident at the same time does not count. CPU: None (see max_rss_gib)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base + static_bytes(model, opt)) / 2**30


def run(presets: list[str], variants: list[str], batch: int, input_size: int, rounds: int, steps: int, warmup: int,
        tag: str | None = None) -> dict[str, Any]:
    """Every row, and the JSON rewritten after each (``complete`` false until the last)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print("matmul peak (TFLOP/s):", {k: round(v / 1e12, 3) for k, v in peaks.items()}, flush=True)
    rows: list[dict[str, Any]] = []
    settings = {"presets": presets, "variants": variants, "batch": batch, "input_size": input_size, "rounds": rounds,
                "steps": steps, "warmup": warmup, "argv": sys.argv[1:]}

    start_peaks = dict(peaks)

    def payload(complete: bool) -> dict[str, Any]:
        return {"settings": settings, "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
                "matmul_peak_tflops_start": {k: v / 1e12 for k, v in start_peaks.items()}, "complete": complete, "rows": rows}

    for preset in presets:
        flops = train_flops_per_image(preset, input_size, device)
        print(f"{preset}: {flops / 1e9:.2f} GFLOP per image (forward + backward)", flush=True)
        for name in variants:
            variant = Variant.parse(name)
            row: dict[str, Any] = {"preset": preset, "variant": name, "batch": batch, "gflop_per_img": flops / 1e9}
            try:
                built = {w: make_step(w, preset, variant, batch, input_size, device) for w in WHO}
                for w in WHO:  # warm-up, compilation included
                    time_fn(built[w][0], device, warmup=warmup, repeats=0)
                times: dict[str, list[float]] = {w: [] for w in WHO}
                for _ in range(rounds):
                    for w in WHO:
                        times[w] += time_fn(built[w][0], device, warmup=0, repeats=steps)
                peak = peaks[variant.dtype]
                for w in WHO:
                    step_s = median(times[w])
                    row[f"{w}_img_s"] = batch / step_s
                    row[f"{w}_step_ms"] = 1e3 * step_s
                    row[f"{w}_step_ms_min_max"] = [1e3 * min(times[w]), 1e3 * max(times[w])]
                    row[f"{w}_mfu"] = flops * batch / step_s / peak
                    row[f"{w}_peak_gib"] = peak_step_gib(built[w][0], built[w][1], built[w][2], device)
                row["ratio"] = row["ours_img_s"] / row["peer_img_s"]
                row["peak_tflops"] = peak / 1e12
                row["timed_steps"] = rounds * steps
            except Exception as e:  # noqa: BLE001 - one failing variant (e.g. out of memory) must not lose the rest
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                built = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
            row["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            rows.append(row)
            print(table([row], COLUMNS), flush=True)
            write_result("train_step", payload(False), tag)
    # The peak again at the end: the machine's rate drifts, and the higher of the two is the peak
    # every row's MFU is taken against.
    end = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    peaks = {k: max(v, end[k]) for k, v in start_peaks.items()}
    print("matmul peak at the end (TFLOP/s):", {k: round(v / 1e12, 3) for k, v in end.items()}, flush=True)
    for row in rows:
        if "error" in row:
            continue
        variant = Variant.parse(row["variant"])
        row["peak_tflops"] = peaks[variant.dtype] / 1e12
        for w in WHO:
            row[f"{w}_mfu"] = row["gflop_per_img"] * 1e9 * batch / (row[f"{w}_step_ms"] / 1e3) / peaks[variant.dtype]
    return payload(True)


COLUMNS = ["preset", "variant", "batch", "ours_img_s", "peer_img_s", "ratio", "ours_step_ms", "peer_step_ms",
           "ours_mfu", "peer_mfu", "gflop_per_img", "ours_peak_gib", "peer_peak_gib", "error"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="DiT-S/2,DiT-B/2")
    p.add_argument("--variants", default=None, help=f"default: {','.join(CPU_VARIANTS)} on a CPU, {','.join(GPU_VARIANTS)} on a GPU")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tag", default=None, help="suffix of the results file name")
    a = p.parse_args()
    variants = a.variants.split(",") if a.variants else list(GPU_VARIANTS if torch.cuda.is_available() else CPU_VARIANTS)
    for v in variants:
        Variant.parse(v)
    res = run(a.presets.split(","), variants, a.batch_size, a.input_size, a.rounds, a.steps, a.warmup, a.tag)
    print(machine())
    print("matmul peak (TFLOP/s):", {k: round(v, 3) for k, v in res["matmul_peak_tflops"].items()})
    print(table(res["rows"], COLUMNS))
    print("wrote", write_result("train_step", res, a.tag))


if __name__ == "__main__":
    main()
