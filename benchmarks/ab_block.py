"""A/B timing of alternative formulations of the DiT's elementwise work and layout, in one process.

Each variant replaces ``PatchEmbed.forward`` and ``DiTBlock.forward`` (same parameters, same
checkpoint keys) and is checked against the first variant's output; the variants' runs alternate. Times a guided sampling evaluation
(forward of 2N, inference mode) and a training step (forward, backward, AdamW).

    python -m benchmarks.ab_block --preset DiT-S/2 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable

import torch

from dit_core import models as M
from dit_core.diffusion import create_diffusion, training_losses

from .common import machine, median, table, time_fn, write_result
from .train_step import inputs


def _base(self: M.DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The formulation before this benchmark: x * (1 + scale) + shift; x + gate * branch."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    mod = lambda h, s, sc: h * (1 + sc.unsqueeze(1)) + s.unsqueeze(1)  # noqa: E731
    x = x + gate_msa.unsqueeze(1) * self.attn(mod(self.norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp.unsqueeze(1) * self.mlp(mod(self.norm2(x), shift_mlp, scale_mlp))
    return x


def _addcmul_mod(self: M.DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """modulate as one addcmul kernel."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    mod = lambda h, s, sc: torch.addcmul(s.unsqueeze(1), h, 1 + sc.unsqueeze(1))  # noqa: E731
    x = x + gate_msa.unsqueeze(1) * self.attn(mod(self.norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp.unsqueeze(1) * self.mlp(mod(self.norm2(x), shift_mlp, scale_mlp))
    return x


def _addcmul_all(self: M.DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """modulate and the gated residual each as one addcmul kernel."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    mod = lambda h, s, sc: torch.addcmul(s.unsqueeze(1), h, 1 + sc.unsqueeze(1))  # noqa: E731
    x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(mod(self.norm1(x), shift_msa, scale_msa)))
    x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(mod(self.norm2(x), shift_mlp, scale_mlp)))
    return x


def _patch_strided(self: M.PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """The patch embedding before this benchmark: a transposed view, so the residual stream kept
    the convolution's (N, D, T) memory layout."""
    return self.proj(x).flatten(2).transpose(1, 2)


BLOCKS: dict[str, Callable] = {"base": _base, "addcmul_mod": _addcmul_mod, "addcmul_all": _addcmul_all, "current": M.DiTBlock.forward}
PATCHES: dict[str, Callable] = {"strided": _patch_strided, "contig": M.PatchEmbed.forward}
# name -> (patch embedding, block); "current" is dit_core's code as it stands.
VARIANTS: dict[str, tuple[str, str]] = {
    "before": ("strided", "base"),
    "strided+addcmul_mod": ("strided", "addcmul_mod"),
    "contig": ("contig", "base"),
    "contig+addcmul_mod": ("contig", "addcmul_mod"),
    "contig+addcmul_all": ("contig", "addcmul_all"),
    "current": ("contig", "current"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument("--batch-size", type=int, default=8, help="images (the guided forward sees twice as many)")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on a GPU)")
    p.add_argument("--tag", default=None)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = a.bf16 or device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    cfg = M.preset_config(a.preset, input_size=a.input_size, num_classes=1000)
    torch.manual_seed(0)
    model = M.DiT(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad:
                prm.normal_(0, 0.02)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0, fused=device.type == "cuda")  # lr 0: weights stay put
    x, t, y, noise = inputs(cfg, a.batch_size, device)
    diffusion = create_diffusion()
    names = a.variants.split(",")

    def use(name: str) -> None:
        patch, block = VARIANTS[name]
        M.PatchEmbed.forward = PATCHES[patch]
        M.DiTBlock.forward = BLOCKS[block]

    def evaluate() -> torch.Tensor:
        model.eval()
        with torch.inference_mode(), autocast():
            return model.forward_with_cfg(x, t, y, 4.0)

    def train_step() -> None:
        model.train()
        with autocast():
            loss = training_losses(diffusion, lambda xt, tt: model(xt, tt, y), x, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ref = None
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        use(name)
        out = evaluate().float()
        ref = out if ref is None else ref
        rows[name] = {"variant": name, "max_abs_diff_vs_first": float((out - ref).abs().max()), "eval": [], "train": []}
        time_fn(evaluate, device, warmup=2, repeats=0)
        time_fn(train_step, device, warmup=2, repeats=0)
    for _ in range(a.rounds):
        for name in names:
            use(name)
            rows[name]["eval"] += time_fn(evaluate, device, warmup=0, repeats=a.repeats)
            rows[name]["train"] += time_fn(train_step, device, warmup=0, repeats=a.repeats)
    base = rows[names[0]]
    for r in rows.values():
        r["eval_ms"] = 1e3 * median(r.pop("eval"))
        r["train_ms"] = 1e3 * median(r.pop("train"))
    for r in rows.values():
        r["eval_speedup"] = base["eval_ms"] / r["eval_ms"]
        r["train_speedup"] = base["train_ms"] / r["train_ms"]
    out_rows = list(rows.values())
    cols = ["variant", "eval_ms", "eval_speedup", "train_ms", "train_speedup", "max_abs_diff_vs_first"]
    print(machine())
    print(table(out_rows, cols))
    settings = {"preset": a.preset, "batch": a.batch_size, "input_size": a.input_size, "bf16": bf16, "rounds": a.rounds, "repeats": a.repeats}
    print("wrote", write_result("ab_block", {"settings": settings, "rows": out_rows}, a.tag))


if __name__ == "__main__":
    main()
