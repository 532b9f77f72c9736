"""Profile one training step, or one guided sampling evaluation (``--mode sample``), of ours or
the peer with torch.profiler: where does the time go?

Prints the top operators by self time and a split into matrix products, attention, optimizer and
the rest (elementwise, norms, copies); writes the table to OUT/profile-{device}-{tag}.txt.

    python -m benchmarks.profile_step --preset DiT-S/2 --batch-size 8
    python -m benchmarks.profile_step --preset DiT-XL/2 --batch-size 32 --mode sample --who ours,peer
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .train_step import Variant, make_step


def make_eval(who: str, preset: str, variant: Variant, batch: int, input_size: int, device: torch.device):
    """One guided network evaluation as in benchmarks.sampling (forward of 2N, inference mode)."""
    import contextlib

    from dit_core.models import DiT, preset_config

    from .sampling import guided_fn
    from .train_step import autocast_for, peer_model

    cfg = preset_config(preset, input_size=input_size, num_classes=1000)
    torch.manual_seed(0)
    model = DiT(cfg) if who == "ours" else peer_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    model.to(device).eval()
    y = torch.arange(batch, device=device) % 1000
    fn = guided_fn(who, model, y, 4.0, 1000)
    if variant.compile:
        fn = torch.compile(fn)
    x = torch.randn(batch, cfg.in_channels, input_size, input_size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    autocast = autocast_for(variant, device) if variant.dtype == "bf16" else contextlib.nullcontext

    def step() -> None:
        with torch.inference_mode(), autocast():
            fn(x, t)

    return step

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::convolution_backward", "aten::_convolution"),
    "attention": ("flash", "efficient_attention", "scaled_dot_product", "cudnn_attention"),
    "optimizer": ("_foreach", "adam", "Adam"),  # on a CPU the plain for-loop AdamW shows as sqrt, div, lerp_, ...
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument("--who", default="ours", help="ours, peer or ours,peer")
    p.add_argument("--mode", default="train", choices=("train", "sample"))
    p.add_argument("--shapes", action="store_true", help="group operators by input shape")
    p.add_argument("--variant", default=None, help="default bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="shorthand for --variant bf16")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = a.variant or ("bf16" if a.bf16 or device.type == "cuda" else "fp32")
    for who in a.who.split(","):
        if a.mode == "train":
            step = make_step(who, a.preset, Variant.parse(name), a.batch_size, a.input_size, device)[0]
        else:
            step = make_eval(who, a.preset, Variant.parse(name), a.batch_size, a.input_size, device)
        for _ in range(3):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=a.shapes) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=a.shapes).table(sort_by=key, row_limit=a.rows, max_name_column_width=60)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        split: dict[str, float] = {}
        for ev in prof.key_averages():
            # on a GPU an operator's self device time already holds its kernels: count operators only
            if device.type == "cuda" and not ev.key.startswith("aten::"):
                continue
            split[group_of(ev.key)] = split.get(group_of(ev.key), 0.0) + getattr(ev, attr, 0.0) / 1e3
        total = sum(split.values())
        summary = " | ".join(f"{g} {ms:.1f} ms ({100 * ms / total:.0f}%)" for g, ms in sorted(split.items(), key=lambda kv: -kv[1]))
        text = f"{who} {a.mode} {a.preset} {name} batch {a.batch_size} on {device}: self time by group: {summary}\n{table}\n"
        print(text, flush=True)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{who}-{a.mode}-{a.preset.replace('/', '')}-{name}-b{a.batch_size}"
        (out / f"profile-{device.type}-{tag}.txt").write_text(text)


if __name__ == "__main__":
    main()
