"""The ``train`` settings (params.yaml's ``train`` section) and what they decide before any data is
read: the DiT's architecture for given latents and the training objective's record.

``TrainConfig`` is the one place the defaults live; params.yaml repeats them for DVC (a test keeps
the two equal). ``config_from`` and ``load_train_params`` are the typed loaders the job and the
stage share: unknown keys and values of the wrong type are refused, naming the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dit_core import settings
from dit_core.contract import DATASET_KEY, LATENT_SHAPE_KEY, LATENT_STATS_FILE, NUM_CLASSES_KEY
from dit_core.diffusion import MeanFlowSettings, Objective, make_objective
from dit_core.models import DiTConfig, preset_config

from .latent_input import stored_views

STRATEGIES = ("ddp", "fsdp")
# DiTConfig fields that the data decides; a preset or `model` overrides may not contradict them.
DATA_FIELDS = ("input_size", "in_channels", "num_classes")
# Settings that may change when a run resumes (everything else must match its checkpoint).
RESUMABLE_CHANGES = frozenset({
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "use_gpu",
    "cpus_per_worker", "gpus_per_worker", "resources_per_worker", "placement_strategy", "storage_path", "name", "experiment",
    "registered_model", "tracking", "compile", "latents",
})
# MeanFlowSettings' field that TrainConfig holds under the name the flow objective shares
MEANFLOW_SHARED = ("timestep_sampling",)


def meanflow_recipe() -> dict[str, float]:
    """``train.meanflow``'s defaults: MeanFlowSettings' (the paper's; the time scale, 1, measured
    here), but ``timestep_sampling``, shared with flow."""
    return {k: v for k, v in MeanFlowSettings().to_dict().items() if k not in MEANFLOW_SHARED}


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
    objective: str = "flow"                       # flow | eps (the paper's) | meanflow (one- or few-step sampling)
    timestep_sampling: str = "logit-normal"       # uniform | logit-normal (flow and meanflow)
    loss_weighting: str = "none"                  # none | min-snr (eps only)
    min_snr_gamma: float = 5.0
    learn_sigma: bool = False                     # eps only (flow learns no variance; the paper: true)
    noise_schedule: str = "linear"                # eps: the paper's (cosine: Improved DDPM's)
    diffusion_steps: int = 1000                   # eps: the discrete steps; flow: the timestep input's scale
    # meanflow only: dit_core.diffusion.MeanFlowSettings' fields (time_scale, interval_share, logit_mean,
    # logit_std, guidance_omega, guidance_kappa, weight_power, weight_eps); keys left out keep these defaults
    meanflow: dict[str, float] = field(default_factory=meanflow_recipe)
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
    registered_model: str | None = None           # None: dit-<the data set's name> (registered_name)
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
            objective = training_objective(self)
            if objective.name == "meanflow":
                objective.meanflow.settings.check_label_dropout(self.class_dropout_prob)
        except ValueError as e:
            raise ValueError(f"train: {e}") from None
        unknown = set(self.model) - {f.name for f in fields(DiTConfig)}
        if unknown:
            raise ValueError(f"train.model has unknown DiTConfig fields {sorted(unknown)}; known: {[f.name for f in fields(DiTConfig)]}")

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the trained weights; a resumed run must share them. The meanflow
        recipe only with objective meanflow (so that other runs keep the names they had before it)."""
        out = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}
        if self.objective != "meanflow":
            del out["meanflow"]
        return out


MODEL_NAME_PREFIX = "dit-"


def registered_name(cfg: TrainConfig, stats: dict[str, Any]) -> str:
    """The registry entry of the trained model: ``train.registered_model``, else ``dit-<data set>``
    (the prepared manifest's ``dataset``, which stats.json carries: ``dit-digits``, ``dit-flowers``),
    so that models of different data sets never share versions or a champion. Latents encoded before
    the name was recorded: ``dit-data-<first 8 of their input fingerprint>``."""
    if cfg.registered_model:
        return cfg.registered_model
    dataset = stats.get(DATASET_KEY)
    return MODEL_NAME_PREFIX + (str(dataset) if dataset else f"data-{str(stats.get('input_fingerprint', ''))[:8]}")


def model_config(cfg: TrainConfig, stats: dict[str, Any]) -> DiTConfig:
    """The DiT for this data: a preset and/or explicit fields, with shape and classes from stats.json.
    Also refuses settings the latents cannot serve (it runs on the driver before any work)."""
    if cfg.random_flip and "flip" not in stored_views(stats):
        raise ValueError(
            f"train.random_flip is true but the latents in {cfg.latents} hold no flipped view ({LATENT_STATS_FILE} views: "
            f"{list(stored_views(stats))}); set encode.flip_views: true and re-run the encode stage, "
            "or set train.random_flip: false"
        )
    c, h, w = stats[LATENT_SHAPE_KEY]
    if h != w:
        raise ValueError(f"latents are {h}x{w}; DiT needs square latents")
    data = {"input_size": h, "in_channels": c, "num_classes": int(stats[NUM_CLASSES_KEY])}
    clash = {k: (cfg.model[k], v) for k, v in data.items() if k in cfg.model and cfg.model[k] != v}
    if clash:
        raise ValueError(
            f"train.model {', '.join(f'{k}={a}' for k, (a, _) in clash.items())} contradicts the latents "
            f"({', '.join(f'{k}={b}' for k, (_, b) in clash.items())} from {cfg.latents}/{LATENT_STATS_FILE}); remove those keys"
        )
    interval = cfg.objective == "meanflow"   # the second time input r: MeanFlow's, and no other objective's
    if cfg.model.get("interval_embed", interval) != interval:
        raise ValueError(f"train.model.interval_embed={cfg.model['interval_embed']} contradicts train.objective="
                         f"{cfg.objective!r}, which decides it (true for meanflow only); remove the key")
    fields_ = {"class_dropout_prob": cfg.class_dropout_prob, "learn_sigma": cfg.learn_sigma, "interval_embed": interval,
               "grad_checkpointing": cfg.grad_checkpointing, **{k: v for k, v in cfg.model.items() if k not in data}, **data}
    if cfg.preset:
        return preset_config(cfg.preset, **fields_)  # raises naming the preset if unknown / overridden
    missing = {"depth", "hidden_size", "num_heads"} - set(cfg.model)
    if missing:
        raise ValueError(f"train.preset is null, so train.model must give {sorted(missing)} (or set a preset, e.g. DiT-S/2)")
    return DiTConfig(**fields_)


def training_objective(cfg: TrainConfig) -> Objective:
    """The objective these settings train (``train.meanflow`` read with objective meanflow only)."""
    record: dict[str, Any] = {
        "objective": cfg.objective, "noise_schedule": cfg.noise_schedule, "diffusion_steps": cfg.diffusion_steps,
        "learn_sigma": cfg.learn_sigma, "timestep_sampling": cfg.timestep_sampling, "loss_weighting": cfg.loss_weighting,
        "min_snr_gamma": cfg.min_snr_gamma}
    if cfg.objective == "meanflow":
        known = meanflow_recipe()
        unknown = sorted(set(cfg.meanflow) - set(known))
        if unknown:
            raise ValueError(f"meanflow has unknown settings {unknown}; known: {sorted(known)} (its time sampling "
                             "is train.timestep_sampling)")
        recipe = {**known, **cfg.meanflow}
        # the record keeps a time scale as diffusion_steps (the flow objective's name for it)
        record |= {**recipe, "diffusion_steps": recipe.pop("time_scale")}
    return make_objective(record)


def diffusion_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The objective's record (checkpoints and registered models: which objective, which samplers fit)."""
    return training_objective(cfg).settings()


def config_from(latents: str, params: dict[str, Any]) -> TrainConfig:
    """A typed TrainConfig from a ``train`` section: unknown keys and values of the wrong type are refused."""
    return settings.build(TrainConfig, {**params, "latents": latents}, "train")


def load_train_params(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The ``train`` section of a params file (none: the defaults) with ``KEY=VALUE`` overrides
    (values read as YAML 1.2: ``lr=1e-3`` is a float)."""
    params = settings.read_section(path, "train") if path else {}
    return {**params, **settings.parse_overrides(overrides, TrainConfig, "train")}
