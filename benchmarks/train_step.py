"""Training-step benchmark: ours against diffusers' DiTTransformer2DModel of identical dimensions.

Prints a table and writes benchmarks/results/train_step-{cpu,gpu}.json. Each variant's runs of the
two models alternate (ours, peer, ours, peer, ...) so that drift of the machine hits both alike.

    python -m benchmarks.train_step --presets DiT-S/2 --batch-size 8 --input-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import resource
from typing import Any, Callable

import torch

from dit_core.diffusion import create_diffusion, training_losses
from dit_core.models import DiT, preset_config

from .common import flops_of, machine, matmul_peak, median, table, time_fn, write_result

VARIANTS = ("fp32", "bf16", "compile", "grad_ckpt")


def peer_model(cfg) -> torch.nn.Module:
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


def make_step(which: str, preset: str, variant: str, batch: int, input_size: int, device: torch.device):
    cfg = preset_config(preset, input_size=input_size, num_classes=1000, grad_checkpointing=variant == "grad_ckpt")
    if which == "ours":
        model = DiT(cfg).to(device)
        forward: Callable = model
    else:
        model = peer_model(cfg).to(device)
        if variant == "grad_ckpt":
            model.enable_gradient_checkpointing()
        forward = lambda x, t, y: model(x, timestep=t, class_labels=y).sample  # noqa: E731
    model.train()
    if variant == "compile":
        forward = torch.compile(forward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    diffusion = create_diffusion()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, input_size, input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    use_bf16 = variant == "bf16" or (variant == "compile" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = training_losses(diffusion, lambda xt, tt: forward(xt, tt, y), x, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fwd_bwd() -> None:
        loss = training_losses(diffusion, lambda xt, tt: model(xt, tt, y) if which == "ours" else forward(xt, tt, y), x, t, noise)["loss"].mean()
        loss.backward()

    return step, fwd_bwd, model


def run(presets: list[str], variants: list[str], batch: int, input_size: int, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    rows = []
    for preset in presets:
        flops = None
        for variant in variants:
            built = {w: make_step(w, preset, variant, batch, input_size, device) for w in ("ours", "peer")}
            if flops is None:
                flops = flops_of(built["ours"][1]) / batch  # model FLOPs per image, fwd + bwd
            times: dict[str, list[float]] = {"ours": [], "peer": []}
            for w in ("ours", "peer"):
                time_fn(built[w][0], device, warmup=warmup, repeats=0)
            for _ in range(rounds):
                for w in ("ours", "peer"):
                    times[w] += time_fn(built[w][0], device, warmup=0, repeats=steps)
            peak = peaks["bf16" if variant == "bf16" or (variant == "compile" and device.type == "cuda") else "fp32"]
            result = {}
            for w in ("ours", "peer"):
                step_s = median(times[w])
                result[w] = {"step_s": step_s, "images_per_s": batch / step_s, "mfu": flops * batch / step_s / peak}
            if device.type == "cuda":
                mem = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            else:
                mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            rows.append({
                "preset": preset, "variant": variant, "batch": batch,
                "ours_img_s": result["ours"]["images_per_s"], "peer_img_s": result["peer"]["images_per_s"],
                "ratio": result["ours"]["images_per_s"] / result["peer"]["images_per_s"],
                "ours_step_ms": 1e3 * result["ours"]["step_s"], "ours_mfu": result["ours"]["mfu"],
                "peer_mfu": result["peer"]["mfu"], "gflop_per_img": flops / 1e9,
                "peak_mem_gib": mem, "peak_tflops": peak / 1e12,
            })
            del built
    return {"settings": {"presets": presets, "variants": variants, "batch": batch, "input_size": input_size, "rounds": rounds, "steps": steps, "warmup": warmup},
            "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="DiT-S/2,DiT-B/2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    res = run(a.presets.split(","), a.variants.split(","), a.batch_size, a.input_size, a.rounds, a.steps, a.warmup)
    print(machine())
    print("matmul peak (TFLOP/s):", {k: round(v, 3) for k, v in res["matmul_peak_tflops"].items()})
    print(table(res["rows"], ["preset", "variant", "batch", "ours_img_s", "peer_img_s", "ratio", "ours_step_ms", "ours_mfu", "peer_mfu", "gflop_per_img", "peak_mem_gib"]))
    print("wrote", write_result("train_step", res))


if __name__ == "__main__":
    main()
