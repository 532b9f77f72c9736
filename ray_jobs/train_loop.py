"""The parts of one worker's training loop (``ray_jobs.train.train_loop_per_worker``): setting up a
run (data plan, model, EMA, optimizer, resume, MLflow), one optimizer step, the logged loss window,
a checkpoint, and the end (the EMA model logged and registered).

The loop itself stays in ``ray_jobs/train.py`` and reads like DiT's ``train.py``: set up, then per
step the learning rate, the micro-batches' forward and backward, the optimizer and EMA update, a
log line every ``log_every`` steps and a checkpoint every ``checkpoint_every``.

Resume is exact: every random draw of a step comes from a generator seeded by (seed, step, rank,
micro-batch), the data stream restarts at the step's micro-batch, and the optimizer, the EMA and
the step come back from the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dit_core.contract import FINGERPRINT_KEY, LATENT_SHAPE_KEY, SCALE_FACTOR_KEY
from dit_core.models import DiT, DiTConfig
from dit_core.training import EMA, derive_seed, flatten, learning_rate, noisy_latents

from . import tracking
from .checkpoints import check_resumable, identity_record, layout_digest, read_checkpoint, write_checkpoint
from .latent_input import Batch, LatentStream, StreamPlan, Unit, plan_stream, read_stats, scan_units, train_shards
from .train_config import TrainConfig, diffusion_settings, model_config, training_objective


# --------------------------------------------------------------------------------------------
# Distributed helpers (DDP or FSDP)
# --------------------------------------------------------------------------------------------

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The DiT inside a DDP wrapper (FSDP keeps the DiT's own attributes on the wrapper)."""
    return getattr(model, "module", model)


def _fsdp() -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def gathered(model: torch.nn.Module, strategy: str) -> contextlib.AbstractContextManager:
    """Under FSDP, the full (unsharded) parameters for the duration (every rank must enter)."""
    return _fsdp().summon_full_params(model, writeback=False) if strategy == "fsdp" else contextlib.nullcontext()


def full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer, strategy: str) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full tensors and the model's own parameter names. Under
    FSDP a collective (every rank calls it); rank 0 gets the dicts."""
    if strategy != "fsdp":
        return unwrap(model).state_dict(), opt.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    fsdp = _fsdp()
    with fsdp.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                              FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        return model.state_dict(), fsdp.optim_state_dict(model, opt)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's groups: the class embedding table at ``lr * class_embed_lr_scale``, the rest at ``lr``.
    (With the paper's init and lr the labels' embedding moves far slower than the timestep MLP's
    output, and a short run learns to ignore the class.)"""
    table = unwrap(model).y_embedder.embedding_table.weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not table]
    if cfg.class_embed_lr_scale == 1.0 or not any(p is table for p in model.parameters()):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    return [{"params": rest, "lr_scale": 1.0}, {"params": [table], "lr_scale": cfg.class_embed_lr_scale}]


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory of this worker: allocated on its GPU, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# Setting up a run
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One worker's run, as ``setup`` leaves it: what the loop steps and what a checkpoint saves."""

    cfg: TrainConfig
    name: str
    rank: int
    world: int
    device: torch.device
    stats: dict[str, Any]            # stats.json of the latents
    plan: StreamPlan
    units: list[Unit]
    layout: str                      # the latents' row-group layout (part of the run's identity)
    mcfg: DiTConfig
    objective: Any                   # dit_core.diffusion objective: sample_t, losses (``objective_losses``)
    model: torch.nn.Module           # wrapped by Ray (DDP / FSDP)
    forward: Any                     # the model, compiled when train.compile
    ema: EMA
    opt: torch.optim.Optimizer
    autocast: Any
    start_step: int
    history: list[dict[str, Any]]    # the logged rows, kept across resumes
    attempts: list[dict[str, int]]   # the steps each attempt executed: a resume that started over from 0 would show
    run_id: str | None = None        # MLflow run (rank 0 with tracking)


def _resume_state(checkpoint: Any, cfg: TrainConfig, fingerprint: str, layout: str) -> dict[str, Any]:
    """The state of Ray Train's latest checkpoint of this run, refused if it is not this run's."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        state = read_checkpoint(d)
    check_resumable(state, cfg, fingerprint, layout)
    return state


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, state: dict[str, Any]) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if "optimizer" in state:
        osd = state["optimizer"]
        if cfg.strategy == "fsdp":
            osd = _fsdp().optim_state_dict_to_load(model, opt, osd)
        opt.load_state_dict(osd)
    return opt


def _start_tracking(run: Run, git_commit: str, num_parameters: int) -> str | None:
    """Rank 0's MLflow run with the settings as parameters (None: another rank, or tracking off)."""
    import ray
    import torch.distributed as dist

    nodes = [None] * run.world
    if run.world > 1:  # a collective: every rank takes part, whether it tracks or not
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    cfg = run.cfg
    if run.rank != 0 or not cfg.tracking:
        return None
    tracking.configure_tracking()
    run_id = tracking.start_run(cfg.experiment, run.name, tags={
        "preset": cfg.preset or "custom", "data_fingerprint": run.stats[FINGERPRINT_KEY], "objective": cfg.objective})
    tracking.log_params(run_id, {
        **flatten(asdict(cfg)), "run_name": run.name, "git_commit": git_commit,
        "data_fingerprint": run.stats[FINGERPRINT_KEY], "world_size": run.world, "num_nodes": len(set(nodes)),
        **flatten({"model_config": run.mcfg.to_dict()}), "num_parameters": num_parameters,
    })
    return run_id


def setup(cfg: TrainConfig, name: str, git_commit: str) -> Run:
    """Everything before the first step, on every worker: the data plan, the model (the same initial
    weights on every rank), the EMA, the optimizer, the state of the latest checkpoint, MLflow."""
    import ray.train
    import ray.train.torch

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

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DiT(mcfg)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    state = _resume_state(ray.train.get_checkpoint(), cfg, stats[FINGERPRINT_KEY], layout)
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
    start_step = int(state.get("step", 0))
    if start_step > cfg.steps:
        raise ValueError(f"run {name!r} already has {start_step} steps, more than train.steps={cfg.steps}; "
                         "use a new train.name (or name: null) or raise train.steps")
    ema.model.to(device)
    num_parameters = sum(p.numel() for p in model.parameters())
    model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.strategy)          # Ray: DDP / FSDP
    opt = _optimizer(model, cfg, state)
    run = Run(
        cfg=cfg, name=name, rank=rank, world=world, device=device, stats=stats, plan=plan, units=units, layout=layout,
        mcfg=mcfg, objective=training_objective(cfg), model=model,
        forward=torch.compile(model) if cfg.compile else model, ema=ema, opt=opt,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"),
        start_step=start_step, history=list(state.get("history", [])),
        attempts=[*state.get("attempts", []), {"start_step": start_step, "end_step": start_step}],
    )
    run.run_id = _start_tracking(run, git_commit, num_parameters)
    return run


def input_stream(run: Run) -> LatentStream:
    """This rank's micro-batches from the run's first step on (mid-epoch on a resume)."""
    return LatentStream(run.plan, run.units, run.stats[LATENT_SHAPE_KEY], run.rank, start=run.start_step * run.cfg.grad_accum)


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------

def set_learning_rate(run: Run, step: int) -> None:
    """Warmup, then constant; each group scaled by its ``lr_scale``."""
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(step, run.cfg.lr, run.cfg.warmup_steps) * group.get("lr_scale", 1.0)


def objective_losses(run: Run, x: torch.Tensor, y: torch.Tensor, times: Any) -> dict[str, torch.Tensor]:
    """The objective's per-sample terms (``loss``, ``mse``) of a micro-batch. MeanFlow's model takes
    (z, r, t, y) and drops no labels itself (the objective drops them, for its learned guidance); its
    no-gradient passes (the JVP, the guidance's own predictions) run through the DiT without the DDP
    wrapper (or the compiled module), whose hooks are for the backward pass. FSDP keeps the wrapper:
    its parameters are sharded outside the wrapper's forward."""
    if run.objective.name != "meanflow":
        return run.objective.losses(lambda xt, tt: run.forward(xt, tt, y), x, times)
    plain = run.model if run.cfg.strategy == "fsdp" else unwrap(run.model)

    def forward(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return run.forward(z, t, labels, r=r, drop_labels=False)

    def no_grad_pass(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return plain(z, t, labels, r=r, drop_labels=False)

    return run.objective.losses(forward, x, times, y, run.mcfg.num_classes, run.cfg.class_dropout_prob, jvp_fn=no_grad_pass)


def micro_step(run: Run, batch: Batch, step: int, micro: int) -> torch.Tensor:
    """Forward and backward of one micro-batch (gradients synchronised on the last one); its
    (loss, mse): the objective's loss and its plain squared error (equal for flow)."""
    cfg, model = run.cfg, run.model
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, run.rank, micro, 0))
    x = noisy_latents(batch.mean, batch.std, float(run.stats[SCALE_FACTOR_KEY]), gen)          # x_0 ~ q(z | image)
    x, y = x.to(run.device, non_blocking=True), torch.from_numpy(batch.labels).to(run.device, non_blocking=True)
    torch.manual_seed(derive_seed(cfg.seed, step, run.rank, micro, 1))  # timesteps, noise, label dropout
    t = run.objective.sample_t(x.shape[0], run.device)   # meanflow: (r, t)
    sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
    with (contextlib.nullcontext() if sync else model.no_sync()), run.autocast:
        terms = objective_losses(run, x, y, t)
        loss = terms["loss"].mean()
    (loss / cfg.grad_accum).backward()
    return torch.stack([loss.detach(), terms["mse"].detach().mean()])


def optimizer_step(run: Run, step: int) -> None:
    """Clip, step, clear the gradients, update the EMA (of the full parameters under FSDP)."""
    cfg, model = run.cfg, run.model
    if cfg.grad_clip:
        if cfg.strategy == "fsdp":
            model.clip_grad_norm_(cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    with gathered(model, cfg.strategy):
        run.ema.update(model if cfg.strategy == "fsdp" else unwrap(model), step)


# --------------------------------------------------------------------------------------------
# Logging, checkpoints and the end of a run
# --------------------------------------------------------------------------------------------

class LossWindow:
    """The loss and the throughput since the last log line, over all workers."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros(3, dtype=torch.float64, device=device)  # [sum of losses, sum of mse, count]
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def add(self, terms: torch.Tensor) -> None:
        """``terms``: a micro-batch's (loss, mse)."""
        self.loss += torch.cat([terms.double(), torch.ones(1, dtype=torch.float64, device=self.loss.device)])

    def report(self, run: Run, stream: LatentStream, step: int) -> dict[str, Any]:
        """The metrics of the window ending after ``step`` (logged to MLflow and the history), then a new window."""
        import torch.distributed as dist

        if run.world > 1:
            dist.all_reduce(self.loss)  # the loss of every worker, not rank 0's alone
        done, elapsed = step + 1, time.perf_counter() - self.start
        metrics = {
            "loss": float(self.loss[0] / self.loss[2]),
            "mse": float(self.loss[1] / self.loss[2]),   # the plain squared error (meanflow's loss is weighted)
            "lr": run.opt.param_groups[0]["lr"],
            "steps_per_sec": self.steps / elapsed,
            "images_per_sec": self.steps * run.cfg.batch_size / elapsed,
            "peak_memory_mb": peak_memory_mb(run.device),
            "data_wait_share": (stream.wait_seconds - self.wait) / elapsed,   # of the wall time: input-bound if high
            "epoch": run.plan.epoch_of(step * run.cfg.grad_accum),
        }
        self.wait = stream.wait_seconds
        run.history.append({"step": done, **metrics})
        if run.run_id:
            tracking.log_metrics(run.run_id, metrics, step=done)
        if run.rank == 0:
            print(f"step {done}/{run.cfg.steps} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        self.loss.zero_()
        self.start, self.steps = time.perf_counter(), 0
        return metrics


def save(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Every rank calls it (ray.train.report is a barrier); rank 0 writes the state."""
    import ray.train

    cfg = run.cfg
    model_sd, opt_sd = full_state_dicts(run.model, run.opt, cfg.strategy)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if run.rank == 0:
            write_checkpoint(tmp, {
                "model": model_sd, "ema": run.ema.state_dict(), "optimizer": opt_sd, "step": step,
                "model_config": run.mcfg.to_dict(), "diffusion": diffusion_settings(cfg), "latents": run.stats,
                "config": flatten(asdict(cfg)) | {"name": run.name}, "data_fingerprint": run.stats[FINGERPRINT_KEY],
                "data_layout": run.layout, "identity": identity_record(cfg), "mlflow_run_id": run.run_id,
            }, run.history, run.attempts)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:08d}")   # Ray


def finish(run: Run) -> None:
    """Rank 0 with tracking: log the EMA model to MLflow, register it, end the run."""
    if run.rank != 0 or not run.run_id:
        return
    cfg = run.cfg
    final = copy.deepcopy(run.ema.model).cpu()
    version = tracking.log_model(
        run.run_id, final, cfg.registered_model,
        model_info={"model_config": run.mcfg.to_dict(), "diffusion": diffusion_settings(cfg), "latents": run.stats},
        tags={"preset": cfg.preset or "custom", "data_fingerprint": run.stats[FINGERPRINT_KEY], "run_name": run.name,
              "objective": cfg.objective},
        step=max(cfg.steps, run.start_step),
    )
    tracking.finish_run(run.run_id)
    print(f"registered {cfg.registered_model} version {version} (MLflow run {run.run_id})", flush=True)
