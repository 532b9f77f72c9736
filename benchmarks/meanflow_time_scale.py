"""MeanFlow's time scale: the network sees t x scale; flow's 1000 against smaller ones, on latents.

    python -m benchmarks.meanflow_time_scale --latents data/latents --scales 1,100,1000 --steps 600

Trains the ``train`` section's DiT (the digits default) with the MeanFlow objective at each scale
(and the flow objective at its own, for reference), in this process, without Ray, EMA or label
dropout schedules beyond the objective's own: a plain loop (lr warm-up, clipping) so that only the
scale differs. Reports the plain mse to the MeanFlow target every ``--log-every`` steps (a target
that diverges shows there first) and judges samples in latent space, without an autoencoder: the
Frechet distance of ``--num-samples`` samples to the training latents, and the share of samples
nearest to their own class's mean latent. docs/training.md ("MeanFlow") has the digits figures.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_result
from benchmarks.recipes import load_train_split
from dit_core.diffusion import make_objective, randn, sample_loop
from dit_core.metrics import feature_stats, fid_from_stats
from dit_core.models import DiT
from dit_core.pipeline import make_model_fn
from dit_core.training import learning_rate
from ray_jobs.train_config import config_from, model_config

JUDGED = {"meanflow": [("meanflow", 1, 1.0), ("meanflow", 2, 1.0)], "flow": [("dpm-solver++", 20, 1.0), ("dpm-solver++", 20, 2.0)]}


def train(objective: str, scale: float, data: tuple, steps: int, log_every: int, seed: int) -> tuple[DiT, Any, list[dict]]:
    """A DiT trained ``steps`` steps with ``objective`` at time scale ``scale``; its mse curve."""
    stats, x_all, y_all = data
    recipe = {"meanflow": {"time_scale": scale}} if objective == "meanflow" else {"diffusion_steps": int(scale)}
    cfg = config_from("unused", {"objective": objective, **recipe})
    torch.manual_seed(seed)
    model = DiT(model_config(cfg, stats)).train()
    obj = make_objective({"objective": objective, "diffusion_steps": scale})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g, curve, window = torch.Generator().manual_seed(seed + 1), [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg.lr, cfg.warmup_steps)
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        x, y, times = x_all[idx], y_all[idx], obj.sample_t(cfg.batch_size, "cpu")
        if objective == "meanflow":
            terms = obj.losses(lambda z, r, t, c: model(z, t, c, r=r, drop_labels=False), x, times, y,
                               stats["num_classes"], cfg.class_dropout_prob)
        else:
            terms = obj.losses(lambda z, t: model(z, t, y), x, times)
        opt.zero_grad()
        terms["loss"].mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(terms["mse"].mean().item())
        if (step + 1) % log_every == 0:
            curve.append({"step": step + 1, "mse": float(np.mean(window))})
            window = []
    return model.eval(), obj, curve


@torch.no_grad()
def judge(model: DiT, obj: Any, data: tuple, sampler: str, num_steps: int, guidance: float, n: int) -> dict[str, Any]:
    """Frechet distance in latent space and the share nearest to their own class's mean latent."""
    stats, x_all, y_all = data
    real = x_all.reshape(len(x_all), -1).numpy()
    centres = np.stack([real[y_all.numpy() == c].mean(0) for c in range(stats["num_classes"])])
    y = torch.arange(n) % stats["num_classes"]
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    z = sample_loop(obj.sampler(sampler, num_steps), make_model_fn(model, y, guidance), randn((n, *x_all.shape[1:]), gens), gens)
    z = z.reshape(n, -1).numpy()
    nearest = ((z[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    return {"sampler": f"{sampler}-{num_steps}", "guidance_scale": guidance,
            "fd_latent": fid_from_stats(feature_stats(z), feature_stats(real)), "class_share": float((nearest == y.numpy()).mean())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", default="data/latents")
    p.add_argument("--scales", default="1,100,1000", help="meanflow time scales")
    p.add_argument("--flow", action="store_true", help="also the flow objective at x1000 (the reference)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)   # several runs side by side on a shared CPU
    stats, mean, _, labels = load_train_split(a.latents)
    data = (stats, torch.from_numpy(mean) * float(stats["scale_factor"]), torch.from_numpy(labels))
    runs = [("meanflow", float(s)) for s in a.scales.split(",")] + ([("flow", 1000.0)] if a.flow else [])
    rows = []
    for objective, scale in runs:
        model, obj, curve = train(objective, scale, data, a.steps, a.log_every, a.seed)
        judged = [judge(model, obj, data, *spec, a.num_samples) for spec in JUDGED[objective]]
        rows.append({"objective": objective, "time_scale": scale, "curve": curve, "samples": judged})
        print(rows[-1], flush=True)
    print(write_result("meanflow_time_scale", {"steps": a.steps, "seed": a.seed, "runs": rows}))


if __name__ == "__main__":
    main()
