"""Ray Train job: a class-conditional DiT on the latent shards (docs/CONTRACTS.md, ``data/latents/``).

``train_loop_per_worker(config)`` runs on every worker: it reads the train split, takes its own
slice of every epoch (order from (seed, epoch)), trains with DDP (or FSDP), keeps an EMA of the
weights, logs the loss averaged over all workers to MLflow from rank 0, and checkpoints to
``storage_path`` every ``checkpoint_every`` steps and at the end. A run with the same name resumes
from its latest checkpoint; ``max_failures`` restarts the workers from it after a failure. At the
end rank 0 logs the EMA model to MLflow and registers it.

    python -m ray_jobs.train --latents data/latents --set steps=200 batch_size=64
    ray job submit --address http://head:8265 --working-dir . -- \\
        python -m ray_jobs.train --params configs/imagenet256-xl2.yaml --latents s3://bucket/latents

``RAY_ADDRESS`` set: runs on that cluster; unset: a local Ray runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dit_core import settings
from dit_core.diffusion import make_objective
from dit_core.models import DiT, DiTConfig, preset_config
from dit_core.training import LATENT_VIEWS, EMA, derive_seed, flatten, learning_rate, noisy_latents

from . import runtime, storage, tracking
from .latent_input import LatentStream, check_latents, plan_stream, scan_units

STATS = "stats.json"
RESULT_PREFIX = "TRAIN_RESULT "               # the last line of a job's log: its result for a human (the job API: --result)
STATE_FILE = "state.pt"                      # inside each checkpoint directory (docs/CONTRACTS.md)
HISTORY_FILE = "history.json"                # beside it: every logged row so far (step, loss, ...)
ATTEMPTS_FILE = "attempts.json"              # and the steps each attempt (start, resume, restart) executed
# stats.json without "views" was written before encode.flip_views existed, always with both views
VIEWS_BEFORE_FLIP_VIEWS = ("image", "flip")
STRATEGIES = ("ddp", "fsdp")
# DiTConfig fields that the data decides; a preset or `model` overrides may not contradict them.
DATA_FIELDS = ("input_size", "in_channels", "num_classes")
# Settings that may change when a run resumes (everything else must match its checkpoint).
RESUMABLE_CHANGES = frozenset({
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "use_gpu",
    "cpus_per_worker", "gpus_per_worker", "resources_per_worker", "placement_strategy", "storage_path", "name", "experiment",
    "registered_model", "tracking", "compile", "latents",
})


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` settings. These defaults are the project's (params.yaml repeats them for DVC:
    the digits default); configs/imagenet256-xl2.yaml gives the paper's values for ImageNet."""

    latents: str                                  # folder or s3:// URI with stats.json and train/ shards
    # model: a paper preset (DiT-S/2 ... DiT-XL/2) and/or explicit DiTConfig fields
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=lambda: {
        "depth": 6, "hidden_size": 128, "num_heads": 4, "patch_size": 4, "class_embed_init_std": 1.0})
    class_dropout_prob: float = 0.1               # label dropout for classifier-free guidance
    # the training objective (docs/training.md: recipes). The digits default is the flow recipe (linear
    # interpolant, velocity, logit-normal times); the paper's is eps, uniform, learn_sigma true
    objective: str = "flow"                       # flow | eps (the paper's)
    timestep_sampling: str = "logit-normal"       # uniform | logit-normal (flow only)
    loss_weighting: str = "none"                  # none | min-snr (eps only)
    min_snr_gamma: float = 5.0
    learn_sigma: bool = False                     # eps only (flow learns no variance; the paper: true)
    noise_schedule: str = "linear"                # eps: the paper's (cosine: Improved DDPM's)
    diffusion_steps: int = 1000                   # eps: the discrete steps; flow: the timestep input's scale
    random_flip: bool = False                     # horizontal flips (the paper: true); off for digits, text
    shuffle_rows: int = 1024                      # rows a worker shuffles together (its input memory: ~4 such windows)
    # optimisation (steps = optimizer steps; batch_size = global: all workers, all micro-batches)
    steps: int = 1000                             # digits need 500, 32x32 image sets 1,000 (BENCHMARKS.md: own images)
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 6e-4
    class_embed_lr_scale: float = 1.0             # lr multiplier of the class embedding table (1 = the paper)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float | None = 1.0                 # None: no clipping
    ema_decay: float = 0.999                      # the paper's 0.9999 suits runs of 100k+ steps
    ema_warmup: bool = True                       # decay min(ema_decay, (1+step)/(10+step)): short runs
    seed: int = 0
    bf16: bool = True                             # autocast on GPU (TF32 too); ignored on CPU
    compile: bool = False
    grad_checkpointing: bool = False
    strategy: str = "ddp"                         # ddp | fsdp
    # checkpoints, logging, fault tolerance
    storage_path: str = "checkpoints"             # local folder or s3:// URI
    name: str | None = None                       # None: <registered_model>-<hash of settings and data>
    experiment: str = "dit"                       # MLflow experiment
    registered_model: str = "dit-digits"
    tracking: bool = True                         # MLflow run + registered model
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 2
    # scaling
    num_workers: int = 1
    use_gpu: bool | None = None                   # None: when the cluster has GPUs
    cpus_per_worker: float = 2.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"              # SPREAD / STRICT_SPREAD: one worker per node

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={self.strategy!r}; choose one of {STRATEGIES}")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "num_workers", "diffusion_steps",
                    "shuffle_rows"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be a positive integer")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by num_workers x grad_accum = "
                f"{self.num_workers} x {self.grad_accum}; pick a multiple of {self.num_workers * self.grad_accum}"
            )
        gpus = self.gpus_per_worker
        whole = isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and float(gpus).is_integer() and gpus >= 1
        if self.use_gpu is not False and not whole:  # None may still pick GPUs on a GPU cluster
            raise ValueError(
                f"train.gpus_per_worker={gpus!r} is not a positive whole number: each training worker is one NCCL "
                "rank, and a fraction puts two ranks of one job on the same GPU, which NCCL refuses (\"Duplicate GPU "
                "detected\"); use 1 (one GPU per worker; fewer workers where GPUs are short), or use_gpu: false on CPUs"
            )
        if self.strategy == "fsdp" and self.class_embed_lr_scale != 1.0:
            raise ValueError("train.class_embed_lr_scale must be 1.0 with strategy fsdp (FSDP flattens the parameters)")
        if self.lr <= 0 or self.class_embed_lr_scale <= 0:
            raise ValueError(f"train.lr={self.lr} and class_embed_lr_scale={self.class_embed_lr_scale} must be positive")
        try:
            diffusion_settings(self)
        except ValueError as e:
            raise ValueError(f"train: {e}") from None
        unknown = set(self.model) - {f.name for f in fields(DiTConfig)}
        if unknown:
            raise ValueError(f"train.model has unknown DiTConfig fields {sorted(unknown)}; known: {[f.name for f in fields(DiTConfig)]}")

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the trained weights; a resumed run must share them."""
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}


# --------------------------------------------------------------------------------------------
# Data and model from stats.json (run on the driver to validate, and on every worker)
# --------------------------------------------------------------------------------------------

def read_stats(latents: str) -> dict[str, Any]:
    uri = storage.join(latents, STATS)
    if not storage.exists(uri):
        shipped = runtime.job_working_dir()
        hint = (f"; a Ray job gets a copy of the code ({shipped}), not the project's git-ignored data: pass the "
                "latents as an s3:// URI (store.root) or an absolute path every node reads") if shipped else ""
        raise FileNotFoundError(f"{uri} not found: {latents} is not a complete latents folder; run the encode stage first{hint}")
    stats = storage.read_json(uri)
    for key in ("latent_shape", "scale_factor", "num_classes", "fingerprint"):
        if key not in stats:
            raise ValueError(f"{uri} has no {key!r}; it does not follow docs/CONTRACTS.md (re-run encode)")
    views = stored_views(stats)
    if "image" not in views or set(views) - set(LATENT_VIEWS):
        raise ValueError(f"{uri} lists views {list(views)}; docs/CONTRACTS.md allows 'image' and optionally 'flip' (re-run encode)")
    return stats


def stored_views(stats: dict[str, Any]) -> tuple[str, ...]:
    """The views the latents hold: stats.json's ``views``, or both for latents written before it existed."""
    return tuple(stats.get("views", VIEWS_BEFORE_FLIP_VIEWS))


def model_config(cfg: TrainConfig, stats: dict[str, Any]) -> DiTConfig:
    """The DiT for this data: a preset and/or explicit fields, with shape and classes from stats.json.
    Also refuses settings the latents cannot serve (it runs on the driver before any work)."""
    if cfg.random_flip and "flip" not in stored_views(stats):
        raise ValueError(
            f"train.random_flip is true but the latents in {cfg.latents} hold no flipped view ({STATS} views: "
            f"{list(stored_views(stats))}); set encode.flip_views: true and re-run the encode stage, "
            "or set train.random_flip: false"
        )
    c, h, w = stats["latent_shape"]
    if h != w:
        raise ValueError(f"latents are {h}x{w}; DiT needs square latents")
    data = {"input_size": h, "in_channels": c, "num_classes": int(stats["num_classes"])}
    clash = {k: (cfg.model[k], v) for k, v in data.items() if k in cfg.model and cfg.model[k] != v}
    if clash:
        raise ValueError(
            f"train.model {', '.join(f'{k}={a}' for k, (a, _) in clash.items())} contradicts the latents "
            f"({', '.join(f'{k}={b}' for k, (_, b) in clash.items())} from {cfg.latents}/{STATS}); remove those keys"
        )
    fields_ = {"class_dropout_prob": cfg.class_dropout_prob, "learn_sigma": cfg.learn_sigma,
               "grad_checkpointing": cfg.grad_checkpointing, **{k: v for k, v in cfg.model.items() if k not in data}, **data}
    if cfg.preset:
        return preset_config(cfg.preset, **fields_)  # raises naming the preset if unknown / overridden
    missing = {"depth", "hidden_size", "num_heads"} - set(cfg.model)
    if missing:
        raise ValueError(f"train.preset is null, so train.model must give {sorted(missing)} (or set a preset, e.g. DiT-S/2)")
    return DiTConfig(**fields_)


def diffusion_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The objective's record (checkpoints and registered models: which objective, which samplers fit)."""
    return make_objective({
        "objective": cfg.objective, "noise_schedule": cfg.noise_schedule, "diffusion_steps": cfg.diffusion_steps,
        "learn_sigma": cfg.learn_sigma, "timestep_sampling": cfg.timestep_sampling, "loss_weighting": cfg.loss_weighting,
        "min_snr_gamma": cfg.min_snr_gamma}).settings()


def train_shards(latents: str, stats: dict[str, Any]) -> list[str]:
    names = (stats.get("shards") or {}).get("train")
    folder = storage.version_folder(latents, stats)  # the published version stats.json names
    files = [storage.join(folder, n) for n in names] if names else storage.list_files(storage.join(folder, "train"), ".parquet")
    if not files:
        raise FileNotFoundError(f"no train shards under {latents}/train; re-run the encode stage")
    return files


def layout_digest(units: Any) -> str:
    """The row-group layout of the train shards: with the seed and the worker count it decides the
    data order (ray_jobs/latent_input.py), so a resumed run must find the same layout."""
    return hashlib.sha256(json.dumps([u.rows for u in units]).encode()).hexdigest()[:16]


def check_data(latents: str, stats: dict[str, Any]) -> list[Any]:
    """The train units, after refusing (on the driver, before any work) latents the workers could not
    train on: an empty shard, a missing column, a wrong row width, labels outside the classes."""
    files = train_shards(latents, stats)
    units = scan_units(files)
    if not units:
        raise ValueError(f"the train shards under {latents} hold no rows; re-run the encode stage")
    check_latents(files, units, stats["latent_shape"], int(stats["num_classes"]), stored_views(stats))
    return units


def check_batch(cfg: TrainConfig, units: list[Any]) -> None:
    """Refuse on the driver a batch the workers' shares cannot serve (latent_input.plan_stream)."""
    plan_stream(units, cfg.per_worker_batch, cfg.num_workers, cfg.seed, cfg.shuffle_rows)


def default_name(cfg: TrainConfig, stats: dict[str, Any]) -> str:
    # the step count too: `dvc exp run -S train.steps=300` is a run of its own, not a resume of the
    # 1,500-step one (an explicit train.name continues a run with more steps)
    digest = hashlib.sha256(json.dumps([cfg.identity(), stats["fingerprint"], cfg.steps], sort_keys=True, default=str).encode())
    return f"{cfg.registered_model}-{digest.hexdigest()[:10]}"


# --------------------------------------------------------------------------------------------
# The training loop (one per worker)
# --------------------------------------------------------------------------------------------

def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


IDENTITY_FILE = "train_identity.json"   # beside a run's checkpoints: the settings it was started with


def check_identity(cfg: TrainConfig, name: str, fingerprint: str, layout: str) -> None:
    """Record the run's weight-deciding settings, data and data layout at its first start; refuse
    (here, on the driver: the workers would fail the same way on every restart) to resume it with
    other settings, on other data or on the same data laid out otherwise."""
    uri = storage.join(cfg.storage_path, name, IDENTITY_FILE)
    current = json.loads(json.dumps(cfg.identity(), default=str)) | {"data_fingerprint": fingerprint}
    if not storage.exists(uri):
        storage.write_json(uri, current | {"data_layout": layout})
        return
    saved = storage.read_json(uri)
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"run {name!r} under {cfg.storage_path} was started on latents with fingerprint {saved['data_fingerprint']}; "
            f"{cfg.latents} has fingerprint {fingerprint}: resuming on other data is refused; use a new train.name "
            "(or name: null) or the latents the run was started on")
    saved.setdefault("data_fingerprint", fingerprint)  # written before the data was part of the identity
    started_layout = saved.pop("data_layout", layout)   # written before the layout was part of it: not checked here
    if started_layout != layout:
        raise ValueError(
            f"run {name!r} under {cfg.storage_path} read latents laid out in row groups {started_layout}, and {cfg.latents} "
            f"has layout {layout} (the same data, re-encoded with another encode.rows_per_group): the data order would "
            "differ; use a new train.name or the latents it was started on")
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(
            f"run {name!r} under {cfg.storage_path} was started with other values of {diff}; "
            "use a new train.name (or name: null) or delete its checkpoints to start over"
        )


def _fsdp() -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _gathered(model: torch.nn.Module, strategy: str) -> contextlib.AbstractContextManager:
    """Under FSDP, the full (unsharded) parameters for the duration (every rank must enter)."""
    return _fsdp().summon_full_params(model, writeback=False) if strategy == "fsdp" else contextlib.nullcontext()


def _full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer, strategy: str) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full tensors and the model's own parameter names. Under
    FSDP a collective (every rank calls it); rank 0 gets the dicts."""
    if strategy != "fsdp":
        return _unwrap(model).state_dict(), opt.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    fsdp = _fsdp()
    with fsdp.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                              FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        return model.state_dict(), fsdp.optim_state_dict(model, opt)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's groups: the class embedding table at ``lr * class_embed_lr_scale``, the rest at ``lr``.
    (With the paper's init and lr the labels' embedding moves far slower than the timestep MLP's
    output, and a short run learns to ignore the class.)"""
    table = _unwrap(model).y_embedder.embedding_table.weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not table]
    if cfg.class_embed_lr_scale == 1.0 or not any(p is table for p in model.parameters()):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    return [{"params": rest, "lr_scale": 1.0}, {"params": [table], "lr_scale": cfg.class_embed_lr_scale}]


def _load_checkpoint(checkpoint: Any, cfg: TrainConfig, fingerprint: str, layout: str) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        try:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt file: say which, do not start over silently
            raise ValueError(f"checkpoint {d}/{STATE_FILE} cannot be read ({type(e).__name__}: {e}); delete that checkpoint "
                             "folder to resume from the one before, or use a new train.name") from e
        for name, key in ((HISTORY_FILE, "history"), (ATTEMPTS_FILE, "attempts")):
            path = os.path.join(d, name)
            state[key] = json.loads(Path(path).read_text()) if os.path.exists(path) else []
    saved_fp = state.get("data_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        raise ValueError(
            f"run {state['config'].get('name')!r} was trained on latents with fingerprint {saved_fp}, and "
            f"{cfg.latents} has fingerprint {fingerprint}: resuming on other data is refused; use a new train.name "
            "(or name: null) or the latents it was started on")
    if state.get("data_layout") not in (None, layout):
        raise ValueError(
            f"run {state['config'].get('name')!r} read latents laid out in row groups {state['data_layout']}, and "
            f"{cfg.latents} has layout {layout} (same data, re-encoded with another encode.rows_per_group): the data order "
            "would differ; use a new train.name or the latents it was started on")
    saved = state.get("identity")
    if saved is not None and saved != json.loads(json.dumps(cfg.identity(), default=str)):
        diff = sorted(k for k in set(saved) | set(cfg.identity()) if saved.get(k) != cfg.identity().get(k))
        raise ValueError(
            f"the checkpoint of run {state['config'].get('name')!r} was trained with other settings ({diff}); "
            "use a new train.name (or name: null) or delete its checkpoints to start over"
        )
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    stats = read_stats(cfg.latents)
    plan, units = plan_stream(scan_units(train_shards(cfg.latents, stats)),   # footers only: the data streams
                              cfg.per_worker_batch, world, cfg.seed, cfg.shuffle_rows, flip_prob=0.5 if cfg.random_flip else 0.0)
    layout = layout_digest(units)
    mcfg = model_config(cfg, stats)
    objective = make_objective(diffusion_settings(cfg))

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DiT(mcfg)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    state: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, cfg, stats["fingerprint"], layout)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
    start_step = int(state.get("step", 0))
    history: list[dict[str, Any]] = list(state.get("history", []))  # the logged rows, kept across resumes
    # the steps each attempt executed: a resume that started over from 0 would show here
    attempts: list[dict[str, int]] = [*state.get("attempts", []), {"start_step": start_step, "end_step": start_step}]
    if start_step > cfg.steps:
        raise ValueError(f"run {config['run_name']!r} already has {start_step} steps, more than train.steps={cfg.steps}; "
                         "use a new train.name (or name: null) or raise train.steps")
    ema.model.to(device)

    num_parameters = sum(p.numel() for p in model.parameters())
    model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.strategy)          # Ray: DDP / FSDP
    raw = _unwrap(model)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if "optimizer" in state:
        osd = state["optimizer"]
        if cfg.strategy == "fsdp":
            osd = _fsdp().optim_state_dict_to_load(model, opt, osd)
        opt.load_state_dict(osd)
    forward = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    nodes = [None] * world
    if world > 1:
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    run_id = None
    if rank == 0 and cfg.tracking:
        tracking.configure_tracking()
        run_id = tracking.start_run(cfg.experiment, config["run_name"], tags={
            "preset": cfg.preset or "custom", "data_fingerprint": stats["fingerprint"], "objective": cfg.objective})
        tracking.log_params(run_id, {
            **flatten(asdict(cfg)), "run_name": config["run_name"], "git_commit": config["git_commit"],
            "data_fingerprint": stats["fingerprint"], "world_size": world, "num_nodes": len(set(nodes)),
            **flatten({"model_config": mcfg.to_dict()}), "num_parameters": num_parameters,
        })

    def save(step: int, metrics: dict[str, Any]) -> None:
        """Every rank calls it (ray.train.report is a barrier); rank 0 writes the state."""
        model_sd, opt_sd = _full_state_dicts(model, opt, cfg.strategy)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": model_sd, "ema": ema.state_dict(), "optimizer": opt_sd, "step": step,
                    "model_config": mcfg.to_dict(), "diffusion": diffusion_settings(cfg), "latents": stats,
                    "config": flatten(asdict(cfg)) | {"name": config["run_name"]}, "data_fingerprint": stats["fingerprint"],
                    "data_layout": layout,
                    "identity": json.loads(json.dumps(cfg.identity(), default=str)), "mlflow_run_id": run_id,
                }, os.path.join(tmp, STATE_FILE))
                with open(os.path.join(tmp, HISTORY_FILE), "w") as f:
                    json.dump(history, f)
                with open(os.path.join(tmp, ATTEMPTS_FILE), "w") as f:
                    json.dump(attempts, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:08d}")   # Ray

    window_loss = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count]
    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
    metrics: dict[str, Any] = {}
    stream = LatentStream(plan, units, stats["latent_shape"], rank, start=start_step * cfg.grad_accum)
    batches = iter(stream)
    model.train()
    for step in range(start_step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg.lr, cfg.warmup_steps) * group.get("lr_scale", 1.0)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, rank, micro, 0))
            x = noisy_latents(batch.mean, batch.std, float(stats["scale_factor"]), gen)
            x, y = x.to(device, non_blocking=True), torch.from_numpy(batch.labels).to(device, non_blocking=True)
            torch.manual_seed(derive_seed(cfg.seed, step, rank, micro, 1))  # timesteps, noise, label dropout
            t = objective.sample_t(x.shape[0], device)
            sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss = objective.losses(lambda xt, tt: forward(xt, tt, y), x, t)["loss"].mean()
            (loss / cfg.grad_accum).backward()
            window_loss += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
        if cfg.grad_clip:
            clip = model.clip_grad_norm_ if cfg.strategy == "fsdp" else (lambda c: torch.nn.utils.clip_grad_norm_(model.parameters(), c))
            clip(cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with _gathered(model, cfg.strategy):
            ema.update(model if cfg.strategy == "fsdp" else raw, step)
        window_steps += 1
        done = step + 1
        attempts[-1]["end_step"] = done
        if done % cfg.log_every == 0 or done == cfg.steps:
            if world > 1:
                dist.all_reduce(window_loss)  # the loss of every worker, not rank 0's alone
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": float(window_loss[0] / window_loss[1]),
                "lr": opt.param_groups[0]["lr"],
                "steps_per_sec": window_steps / elapsed,
                "images_per_sec": window_steps * cfg.batch_size / elapsed,
                "peak_memory_mb": _peak_memory_mb(device),
                "data_wait_share": (stream.wait_seconds - window_wait) / elapsed,   # of the wall time: input-bound if high
                "epoch": plan.epoch_of(step * cfg.grad_accum),
            }
            window_wait = stream.wait_seconds
            history.append({"step": done, **metrics})
            if run_id:
                tracking.log_metrics(run_id, metrics, step=done)
            if rank == 0:
                print(f"step {done}/{cfg.steps} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
            window_loss.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done, {**metrics, "step": done, "mlflow_run_id": run_id or ""})
    stream.close()

    if rank == 0 and run_id:
        final = copy.deepcopy(ema.model).cpu()
        version = tracking.log_model(
            run_id, final, cfg.registered_model,
            model_info={"model_config": mcfg.to_dict(), "diffusion": diffusion_settings(cfg), "latents": stats},
            tags={"preset": cfg.preset or "custom", "data_fingerprint": stats["fingerprint"], "run_name": config["run_name"],
                  "objective": cfg.objective},
            step=max(cfg.steps, start_step),
        )
        tracking.finish_run(run_id)
        print(f"registered {cfg.registered_model} version {version} (MLflow run {run_id})", flush=True)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    name: str
    checkpoint: str                 # URI of the final checkpoint directory
    step: int
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    registered_model: str | None
    version: str | None
    history: list[dict[str, Any]] = field(default_factory=list)   # every logged row: step, loss, lr, ...
    attempts: list[dict[str, int]] = field(default_factory=list)  # [{start_step, end_step}] of each start/resume/restart

    def summary(self) -> dict[str, Any]:
        """What the job hands back (``--result``): the pointer, the last metrics, the history and the attempts."""
        return {"name": self.name, "step": self.step, "metrics": self.metrics, "history": self.history,
                "attempts": self.attempts, **self.pointer()}

    def pointer(self) -> dict[str, Any]:
        """``models/dit.json`` (docs/CONTRACTS.md)."""
        return {
            "checkpoint": self.checkpoint, "mlflow_run_id": self.mlflow_run_id, "registered_model": self.registered_model,
            "version": self.version,
            "model_uri": f"models:/{self.registered_model}/{self.version}" if self.version else None,
        }


def _checkpoint_uri(checkpoint: Any, storage_path: str) -> str:
    path = checkpoint.path
    return f"s3://{path}" if storage.is_s3(storage_path) and not path.startswith("s3://") else path


def train(cfg: TrainConfig) -> TrainResult:
    """Validate, run the TorchTrainer, return where the final checkpoint and model version are."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg.validate()
    cfg = replace(cfg, latents=storage.absolute(cfg.latents))  # workers run in their own folders
    stats = read_stats(cfg.latents)
    model_config(cfg, stats)  # fail here, on the driver, for a bad preset or shape
    units = check_data(cfg.latents, stats)  # and for latents the workers could not read
    check_batch(cfg, units)
    runtime.init_ray()
    # hosts share nothing but S3 and the tracking server: refuse, before anything is written, what
    # another host cannot reach or what Ray deletes with the job
    tracking_uri = tracking.tracking_uri() if cfg.tracking else None
    runtime.require_shared({"train.latents": cfg.latents, "train.storage_path": cfg.storage_path}, runtime.cluster_hosts(),
                           "the Ray cluster", tracking_uri)
    runtime.require_persistent({"train.storage_path": cfg.storage_path}, tracking_uri)
    storage.check_writable(cfg.storage_path)
    name = cfg.name or default_name(cfg, stats)
    check_identity(cfg, name, stats["fingerprint"], layout_digest(units))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if cfg.strategy == "fsdp" and not use_gpu:
        raise ValueError("train.strategy=fsdp needs GPU workers (Ray's FSDP is GPU-only) and this cluster has none "
                         "(or use_gpu is false); use strategy: ddp on CPU")
    resources = {"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    fs, path = storage.resolve(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "run_name": name, "git_commit": tracking.git_commit()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                                placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": runtime.forwarded_env(tracking.tracking_uri())},
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint under {cfg.storage_path}")
    metrics = dict(result.metrics or {})
    run_id = metrics.pop("mlflow_run_id", None) or None
    version = None
    if cfg.tracking and run_id:
        tracking.configure_tracking()
        version = tracking.registered_version(run_id, cfg.registered_model, int(metrics.get("step", cfg.steps)))
    checkpoint = _checkpoint_uri(result.checkpoint, cfg.storage_path)
    history_uri, attempts_uri = storage.join(checkpoint, HISTORY_FILE), storage.join(checkpoint, ATTEMPTS_FILE)
    return TrainResult(
        name=name, checkpoint=checkpoint, step=int(metrics.get("step", 0)),
        metrics=metrics, mlflow_run_id=run_id, registered_model=cfg.registered_model if version else None, version=version,
        history=storage.read_json(history_uri) if storage.exists(history_uri) else [],
        attempts=storage.read_json(attempts_uri) if storage.exists(attempts_uri) else [],
    )


def config_from(latents: str, params: dict[str, Any]) -> TrainConfig:
    """A typed TrainConfig from a ``train`` section: unknown keys and values of the wrong type are refused."""
    return settings.build(TrainConfig, {**params, "latents": latents}, "train")


def load_train_params(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The ``train`` section of a params file (none: the defaults) with ``KEY=VALUE`` overrides
    (values read as YAML 1.2: ``lr=1e-3`` is a float)."""
    params = settings.read_section(path, "train") if path else {}
    return {**params, **settings.parse_overrides(overrides, TrainConfig, "train")}


def main(argv: list[str] | None = None) -> int:
    """``ray job submit`` entry point; settings from ``--params`` (default: params.yaml when the
    working dir has one, else the defaults of TrainConfig, which params.yaml repeats)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, help="latents folder or s3:// URI (encode's output)")
    p.add_argument("--params", default=None, help="YAML file whose `train` section gives the settings (default: ./params.yaml if present)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override settings, e.g. steps=100 lr=1e-3")
    p.add_argument("--result", help="write the result (checkpoint, run, version, metrics) as JSON here (local or s3://)")
    a = p.parse_args(argv)
    params_path = a.params or ("params.yaml" if os.path.isfile("params.yaml") else None)
    result = train(config_from(a.latents, load_train_params(params_path, a.set)))
    out = result.summary()
    if a.result:
        storage.write_json(a.result, out)
    print(RESULT_PREFIX + json.dumps({k: v for k, v in out.items() if k != "history"}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray then ships train_loop_per_worker by
    # reference (ray_jobs.train on the workers' path) instead of pickling this script by value.
    from ray_jobs.train import main as _main

    sys.exit(_main())
