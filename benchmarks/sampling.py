"""Sampling benchmark: images per second and network evaluations per image for each sampler,
ours against diffusers' DiTTransformer2DModel of identical dimensions, guidance batched in one pass.

    python -m benchmarks.sampling --preset DiT-S/2 --batch-size 8 --input-size 32
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch

from dit_core.diffusion import create_diffusion, make_sampler, randn, sample_loop
from dit_core.models import DiT, preset_config

from .common import machine, median, table, time_fn, write_result
from .train_step import peer_model

SAMPLER_SETTINGS = (("ddpm", 250), ("ddim", 50), ("dpm-solver++", 10), ("dpm-solver++", 20), ("dpm-solver++", 25))


def guided_fn(which: str, model: torch.nn.Module, y: torch.Tensor, scale: float, null: int):
    """(x, t) -> guided output, conditional and null halves in one batched forward pass."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if which == "ours":
            return model.forward_with_cfg(x, t, y, scale)
        n = x.shape[0]
        out = model(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.cat([y, torch.full_like(y, null)])).sample
        c = x.shape[1]
        cond, uncond = out[:n], out[n:]
        return torch.cat([uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)

    return fn


def run(preset: str, batch: int, input_size: int, scale: float, rounds: int, settings, bf16: bool, compile_: bool) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset_config(preset, input_size=input_size, num_classes=1000)
    models = {"ours": DiT(cfg).to(device).eval(), "peer": peer_model(cfg).to(device).eval()}
    # Non-zero weights for both (a fresh adaLN-Zero model short-circuits nothing, but be fair and equal).
    y = torch.arange(batch, device=device) % cfg.num_classes
    diffusion = create_diffusion()
    fns = {w: guided_fn(w, m, y, scale, cfg.num_classes) for w, m in models.items()}
    if compile_:
        fns = {w: torch.compile(f) for w, f in fns.items()}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rows = []
    for name, steps in settings:
        sampler = make_sampler(name, diffusion, steps)
        times: dict[str, list[float]] = {"ours": [], "peer": []}

        def once(w: str) -> None:
            g = torch.Generator().manual_seed(0)
            noise = randn((batch, cfg.in_channels, input_size, input_size), g, device)
            with torch.no_grad(), autocast():
                sample_loop(sampler, fns[w], noise, g)

        for w in ("ours", "peer"):
            once(w)  # warm-up
        for _ in range(rounds):
            for w in ("ours", "peer"):
                times[w] += time_fn(lambda: once(w), device, warmup=0, repeats=1)
        ours, peer = batch / median(times["ours"]), batch / median(times["peer"])
        rows.append({"sampler": f"{name}-{steps}", "nfe_per_image": 2 * sampler.num_evaluations, "ours_img_s": ours, "peer_img_s": peer, "ratio": ours / peer})
    return {"settings": {"preset": preset, "batch": batch, "input_size": input_size, "guidance_scale": scale, "rounds": rounds, "bf16": bf16, "compile": compile_}, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--samplers", default=",".join(f"{n}:{s}" for n, s in SAMPLER_SETTINGS))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in a.samplers.split(",")]
    res = run(a.preset, a.batch_size, a.input_size, a.guidance_scale, a.rounds, settings, a.bf16, a.compile)
    print(machine())
    print(table(res["rows"], ["sampler", "nfe_per_image", "ours_img_s", "peer_img_s", "ratio"]))
    print("wrote", write_result("sampling", res))


if __name__ == "__main__":
    main()
