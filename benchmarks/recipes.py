"""Time to quality of training recipes: FID and class accuracy against optimizer steps, several
seeds per recipe, on the latents the pipeline encoded (``make run`` first, or ``dvc repro encode
train_classifier``).

Each (recipe, seed) trains the train stage's model (``params.yaml`` train settings, with the
recipe's keys over them) on the train split, in this process, with the train job's parts: the
objective (``dit_core.diffusion.make_objective``), AdamW with ``param_groups``, the warm-up
schedule, gradient clipping, the EMA, posterior sampling of the latents and per-step seeds. At each
``--eval-steps`` point the EMA weights sample ``--num-images`` images with the sample stage's
default settings (sampler, steps, guidance, labels, per-image seeds) and are scored as the evaluate
stage scores them (the trained classifier's features against the prepared val split; class
accuracy). The cost per step the recipes are compared at is timed apart, in alternation (recipe A,
B, A, B, ... for ``--cost-rounds`` rounds), so that other load on the machine hits all alike.

The summary: each recipe's median FID over seeds at every step count that all its seeds were
evaluated at; the reference recipe's median at ``--target-step`` is the quality to reach; for each
other recipe the first step count whose median is at or below it, and the ratio target-step / that
step count.

    python -m benchmarks.recipes --recipes paper,flow --seeds 0,1,2 --eval-steps 250,500,750,1000,1500

More seeds for a result already written, evaluated only where the ratio is decided (``--merge``
takes that file's runs; the data, recipes and sampling must be the same):

    python -m benchmarks.recipes --recipes paper,flow --seeds 1,2 --eval-steps 1500 --recipe-eval-steps flow=500 \
        --merge benchmarks/results/recipes-cpu-shapes.json --tag shapes-3seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import machine, table, write_result
from .ray_scaling import REPO

# Each recipe: train settings over params.yaml's (docs/training.md: recipes).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"objective": "eps", "learn_sigma": True, "timestep_sampling": "uniform", "loss_weighting": "none"},
    "min-snr": {"objective": "eps", "learn_sigma": True, "timestep_sampling": "uniform", "loss_weighting": "min-snr"},
    "flow": {"objective": "flow", "learn_sigma": False, "timestep_sampling": "logit-normal", "loss_weighting": "none"},
    "flow-uniform": {"objective": "flow", "learn_sigma": False, "timestep_sampling": "uniform", "loss_weighting": "none"},
}


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    """NAME or NAME:key=value;key=value (over the named recipe, or over params.yaml for a new name);
    a key ``model.FIELD`` sets one field of the model settings."""
    from dit_core.settings import load_yaml

    name, _, extra = spec.partition(":")
    over = dict(RECIPES.get(name, {}))
    for item in filter(None, extra.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--recipes item {spec!r}: write NAME or NAME:key=value;key=value")
        over[key] = load_yaml(value)
    if name not in RECIPES and not extra:
        raise SystemExit(f"unknown recipe {name!r}: one of {sorted(RECIPES)}, or NAME:key=value;...")
    return spec, over


def load_train_split(latents: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_jobs import storage
    from ray_jobs.train import read_stats, train_shards

    stats = read_stats(latents)
    tables = []
    for uri in train_shards(latents, stats):
        tables.append(pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=["mean", "std", "label"]))
    shape = (-1, *stats["latent_shape"])
    mean = np.concatenate([np.stack(t.column("mean").to_numpy(zero_copy_only=False)) for t in tables]).astype(np.float32).reshape(shape)
    std = np.concatenate([np.stack(t.column("std").to_numpy(zero_copy_only=False)) for t in tables]).astype(np.float32).reshape(shape)
    labels = np.concatenate([t.column("label").to_numpy() for t in tables]).astype(np.int64)
    return stats, mean, std, labels


class Scorer:
    """The evaluate stage's FID and class accuracy of generated images (classifier features, val split)."""

    def __init__(self, prepared: str, classifier_dir: str):
        from dit_core.classifier import load_classifier
        from dit_core.contract import CLASSIFIER_CONFIG_FILE
        from dit_core.data import pngs_to_batch, to_uint8
        from dit_core.metrics import batched_features, feature_stats
        from pipelines.common import read_manifest, read_split
        from ray_jobs import storage

        with storage.local_copy(classifier_dir, CLASSIFIER_CONFIG_FILE) as folder:
            self.classifier, _ = load_classifier(folder)
        val = read_split(prepared, read_manifest(prepared), "val", ["image"])
        self.reference = feature_stats(batched_features(self.classifier.features, to_uint8(pngs_to_batch(val.column("image").to_pylist()))))

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        from dit_core.classifier import predict
        from dit_core.metrics import batched_features, feature_stats, fid_from_stats, uint8_to_float

        fid = fid_from_stats(feature_stats(batched_features(self.classifier.features, images)), self.reference)
        return fid, float((predict(self.classifier, uint8_to_float(images)) == labels).mean())


class Trainer:
    """The train job's step for one recipe and seed, on the in-memory train split."""

    def __init__(self, recipe: dict[str, Any], seed: int, params: dict[str, Any], data: tuple, steps: int):
        from dit_core.diffusion import make_objective
        from dit_core.models import DiT
        from dit_core.training import EMA
        from ray_jobs.train import TrainConfig, diffusion_settings, model_config, param_groups

        self.stats, self.mean, self.std, self.labels = data
        merged = dict(params)
        for key, value in recipe.items():   # model.patch_size=2: one field of a dict setting
            section, dot, field = key.partition(".")
            merged[section] = {**merged[section], field: value} if dot else value
        self.cfg = cfg = TrainConfig(**{**merged, "seed": seed, "steps": steps, "latents": "unused"})
        cfg.validate()
        self.record = diffusion_settings(cfg)
        self.objective = make_objective(self.record)
        torch.manual_seed(cfg.seed)
        self.model = DiT(model_config(cfg, self.stats)).train()
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.order, self.pos, self.epoch, self.step_index = np.array([], dtype=np.int64), 0, 0, 0

    def step(self) -> float:
        from dit_core.training import derive_seed, learning_rate, noisy_latents

        cfg, step = self.cfg, self.step_index
        if self.pos + cfg.batch_size > len(self.order):
            self.order = np.random.default_rng([cfg.seed, self.epoch]).permutation(len(self.labels))
            self.pos, self.epoch = 0, self.epoch + 1
        idx = self.order[self.pos:self.pos + cfg.batch_size]
        self.pos += cfg.batch_size
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(step, cfg.lr, cfg.warmup_steps) * group.get("lr_scale", 1.0)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, 0, 0, 0))
        x = noisy_latents(self.mean[idx], self.std[idx], float(self.stats["scale_factor"]), gen)
        y = torch.from_numpy(self.labels[idx])
        torch.manual_seed(derive_seed(cfg.seed, step, 0, 0, 1))
        t = self.objective.sample_t(x.shape[0], "cpu")
        loss = self.objective.losses(lambda xt, tt: self.model(xt, tt, y), x, t)["loss"].mean()
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, step)
        self.step_index += 1
        return float(loss.detach())


def run_one(recipe: dict[str, Any], seed: int, params: dict[str, Any], data: tuple, eval_steps: list[int],
            scorer: Scorer, sample_params: dict[str, Any], num_images: int, autoencoder: Any) -> list[dict[str, Any]]:
    import copy

    from dit_core.pipeline import ImagePipeline, SamplingSettings, image_seed

    trainer = Trainer(recipe, seed, params, data, max(eval_steps))
    settings = SamplingSettings(**{k: sample_params[k] for k in ("sampler", "num_steps", "guidance_scale", "eta", "guided_channels")})
    sample_labels = np.arange(num_images) % int(trainer.stats["num_classes"])
    sample_seeds = [image_seed(int(sample_params.get("seed", 0)), i) for i in range(num_images)]
    rows, train_seconds = [], 0.0
    for done in range(1, max(eval_steps) + 1):
        t0 = time.perf_counter()
        loss = trainer.step()
        train_seconds += time.perf_counter() - t0
        if done in eval_steps:
            pipe = ImagePipeline(copy.deepcopy(trainer.ema.model), autoencoder, float(trainer.stats["scale_factor"]),
                                 trainer.record, device="cpu")
            t1 = time.perf_counter()
            images = pipe.generate(sample_labels, sample_seeds, settings)
            fid, acc = scorer(images, sample_labels)
            rows.append({"step": done, "fid": fid, "class_accuracy": acc, "loss": loss,
                         "train_seconds_per_step": train_seconds / done, "eval_seconds": time.perf_counter() - t1})
            print(f"  step {done}: FID {fid:.2f}, class accuracy {acc:.3f}, {train_seconds / done * 1000:.1f} ms/step", flush=True)
    return rows


def cost_per_step(recipes: dict[str, dict[str, Any]], params: dict[str, Any], data: tuple, rounds: int, steps: int) -> dict[str, Any]:
    """Seconds per training step of each recipe, timed in alternation (recipe A, B, A, B, ...:
    ``rounds`` rounds of ``steps`` steps after 3 untimed ones), so that load on the machine hits
    every recipe alike. The median round is the figure."""
    times: dict[str, list[float]] = {name: [] for name in recipes}
    for _ in range(rounds):
        for name, recipe in recipes.items():
            trainer = Trainer(recipe, 0, params, data, steps + 3)
            for _ in range(3):
                trainer.step()
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "rounds": ts} for name, ts in times.items()}


def summarize(results: dict[str, list[list[dict[str, Any]]]], reference: str, target_step: int,
              cost: dict[str, Any]) -> dict[str, Any]:
    curves: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        steps = sorted(set.intersection(*({r["step"] for r in run} for run in runs)))   # where every seed was scored
        curves[name] = {
            "steps": steps,
            "seeds": len(runs),
            "median_fid": [statistics.median(r["fid"] for run in runs for r in run if r["step"] == s) for s in steps],
            "median_class_accuracy": [statistics.median(r["class_accuracy"] for run in runs for r in run if r["step"] == s) for s in steps],
            "fid_by_seed": [[r["fid"] for r in run] for run in runs],
            "steps_by_seed": [[r["step"] for r in run] for run in runs],
            "seconds_per_step": cost[name]["median"],
        }
    ref = curves[reference]
    if target_step not in ref["steps"]:
        raise SystemExit(f"--target-step {target_step} is not among the reference's evaluated steps {ref['steps']}")
    bar = ref["median_fid"][ref["steps"].index(target_step)]
    bar_acc = ref["median_class_accuracy"][ref["steps"].index(target_step)]
    out: dict[str, Any] = {"reference": reference, "target_step": target_step, "target_fid": bar,
                           "target_class_accuracy": bar_acc, "recipes": {}}
    for name, c in curves.items():
        reached = next((s for s, f in zip(c["steps"], c["median_fid"]) if f <= bar), None)
        out["recipes"][name] = {
            "steps_to_target": reached,
            "step_ratio": target_step / reached if reached else None,
            "cost_per_step_vs_reference": c["seconds_per_step"] / ref["seconds_per_step"],
        }
    return {"curves": curves, "summary": out}


def plot(curves: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(c["steps"], c["median_fid"], marker="o", label=f"{name} (median)")
        for steps, fids in zip(c["steps_by_seed"], c["fid_by_seed"]):
            ax.plot(steps, fids, color=ax.lines[-1].get_color(), alpha=0.25, lw=1, marker="." if len(fids) == 1 else None)
    ax.axhline(summary["target_fid"], color="gray", ls="--", lw=1,
               label=f"{summary['reference']} at {summary['target_step']} steps")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("FID (classifier features)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _runs(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["recipe"], int(r["seed"])), []).append({k: v for k, v in r.items() if k not in ("recipe", "seed")})
    return runs


def merged_rows(path: str, recipes: dict[str, dict[str, Any]], data: str, num_images: int, sampling: dict[str, Any],
                seeds: list[int]) -> list[dict[str, Any]]:
    """The rows of an earlier result, refused unless measured the same way on the same data."""
    earlier = json.loads(Path(path).read_text())
    s = earlier["settings"]
    for what, theirs, ours in (("data", s.get("data"), data), ("num_images", s.get("num_images"), num_images),
                               ("sampling", s.get("sampling"), sampling)):
        if theirs != ours:
            raise SystemExit(f"--merge {path}: its {what} is {theirs!r}, this run's {ours!r}; merge only results of the same data and scoring")
    rows = [r for r in earlier["rows"] if r["recipe"] in recipes]
    for r in rows:
        if s["recipes"][r["recipe"]] != recipes[r["recipe"]]:
            raise SystemExit(f"--merge {path}: recipe {r['recipe']!r} was {s['recipes'][r['recipe']]}, here {recipes[r['recipe']]}")
        if int(r["seed"]) in seeds:
            raise SystemExit(f"--merge {path}: it already has seed {r['seed']} of {r['recipe']!r}; run other --seeds")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="paper,flow", help=f"comma-separated; known: {sorted(RECIPES)}")
    p.add_argument("--reference", default="paper")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-steps", default="250,500,750,1000,1500")
    p.add_argument("--recipe-eval-steps", action="append", default=[], metavar="RECIPE=S1,S2",
                   help="other eval steps for one recipe (it trains to the last of them)")
    p.add_argument("--merge", action="append", default=[], metavar="RESULT.json",
                   help="add the runs of an earlier result of the same data, recipes and sampling")
    p.add_argument("--target-step", type=int, default=1500)
    p.add_argument("--num-images", type=int, default=None, help="default: params.yaml sample.num_images")
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--latents", default=str(REPO / "data" / "latents"))
    p.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    p.add_argument("--classifier", default=str(REPO / "models" / "classifier"))
    p.add_argument("--cost-rounds", type=int, default=5, help="alternating timing rounds of the cost per step")
    p.add_argument("--cost-steps", type=int, default=20, help="steps per timing round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from dit_core.autoencoders import load_autoencoder
    from dit_core.settings import read_yaml
    from ray_jobs import storage
    from dit_core.contract import AUTOENCODER_RECORD_FILE

    params_all = read_yaml(a.params)
    params = {k: v for k, v in params_all["train"].items()}
    sample_params = params_all["sample"]
    recipes = dict(parse_recipe(s) for s in a.recipes.split(",") if s.strip())
    if a.reference not in recipes:
        raise SystemExit(f"--reference {a.reference} is not in --recipes")
    seeds = [int(s) for s in a.seeds.split(",")]
    eval_steps = sorted(int(s) for s in a.eval_steps.split(","))
    steps_of = {name: eval_steps for name in recipes}
    for item in a.recipe_eval_steps:
        name, _, steps = item.partition("=")
        if name not in recipes:
            raise SystemExit(f"--recipe-eval-steps {item}: {name!r} is not in --recipes")
        steps_of[name] = sorted(int(s) for s in steps.split(","))
    num_images = a.num_images or int(sample_params["num_images"])
    data = load_train_split(a.latents)
    stats = data[0]
    with storage.local_copy(stats["autoencoder_path"], AUTOENCODER_RECORD_FILE) as ae_dir:
        autoencoder = load_autoencoder(ae_dir)
    scorer = Scorer(a.prepared, a.classifier)
    results: dict[str, list[list[dict[str, Any]]]] = {}
    rows = []
    sampling = {k: sample_params[k] for k in ("sampler", "num_steps", "guidance_scale")}
    for path in a.merge:
        rows += merged_rows(path, recipes, stats["fingerprint"], num_images, sampling, seeds)
    for (name, _seed), run in _runs(rows).items():
        results.setdefault(name, []).append(run)
    for name, recipe in recipes.items():
        for seed in seeds:
            print(f"{name}, seed {seed}: {recipe}", flush=True)
            run = run_one(recipe, seed, params, data, steps_of[name], scorer, sample_params, num_images, autoencoder)
            results.setdefault(name, []).append(run)
            rows += [{"recipe": name, "seed": seed, **r} for r in run]
    print(f"cost per step: {a.cost_rounds} alternating rounds of {a.cost_steps} steps", flush=True)
    cost = cost_per_step(recipes, params, data, a.cost_rounds, a.cost_steps)
    out = summarize(results, a.reference, a.target_step, cost)
    out["cost_per_step"] = cost
    print(machine())
    print(table(rows, ["recipe", "seed", "step", "fid", "class_accuracy", "train_seconds_per_step"]))
    for name, r in out["summary"]["recipes"].items():
        reached = f"reaches FID {out['summary']['target_fid']:.2f} at {r['steps_to_target']} steps ({r['step_ratio']:.2f}x fewer)" \
            if r["steps_to_target"] else "does not reach it"
        print(f"{name}: {reached}; cost per step {r['cost_per_step_vs_reference']:.3f}x {a.reference}'s")
    settings = {k: v for k, v in vars(a).items() if k != "tag"} | {
        "recipes": recipes, "train": params, "num_images": num_images, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
        "sampling": sampling, "data": stats["fingerprint"]}
    path = write_result("recipes", {"settings": settings, "rows": rows, **out}, a.tag)
    figure = path.with_suffix(".png")
    plot(out["curves"], out["summary"], figure)
    print("wrote", path, "and", figure)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
