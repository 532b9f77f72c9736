"""Offline interop with diffusers' ``DiTPipeline``, both ways, exact on names and shapes.

- ``export_pipeline(model, out_dir, autoencoder, class_names)`` writes one of our ``DiT`` models
  (ours from ``load_checkpoint``, or an official ``.pt``) as a ``DiTPipeline`` folder:
  ``transformer/`` (``DiTTransformer2DModel``), ``vae/`` (the given ``AutoencoderKL``, its
  ``scaling_factor`` set to our latent scale), ``scheduler/`` (``DDIMScheduler`` for our diffusion,
  ``scheduler_config``) and ``id2label`` in ``model_index.json``.
- ``import_transformer(folder)`` reads a diffusers DiT transformer (the layout of
  ``facebook/DiT-XL-2-256``: ``transformer/config.json`` + weights, or a folder that is itself the
  transformer) as our ``DiT``; every diffusers key is used, every key of ours filled, else a
  ``ValueError`` names the folder and the key.

Command line (local paths only; nothing is downloaded)::

    python -m dit_core.diffusers_interop export CHECKPOINT.pt OUT_DIR [--vae FOLDER] [--stats stats.json]
    python -m dit_core.diffusers_interop import FOLDER OUT.pt

Key mapping (ours -> diffusers): ``x_embedder.proj`` -> ``pos_embed.proj``; ``t_embedder.mlp.0/2``
-> ``transformer_blocks.N.norm1.emb.timestep_embedder.linear_1/2`` and ``y_embedder.embedding_table``
-> ``...class_embedder.embedding_table`` in *every* block N (diffusers keeps one embedder per block;
import refuses copies that differ); ``blocks.N.adaLN_modulation.1`` -> ``norm1.linear``; ``attn.qkv``
-> ``attn1.to_q | to_k | to_v`` (rows split in three); ``attn.proj`` -> ``attn1.to_out.0``;
``mlp.fc1/fc2`` -> ``ff.net.0.proj`` / ``ff.net.2``; ``final_layer.adaLN_modulation.1`` ->
``proj_out_1``; ``final_layer.linear`` -> ``proj_out_2``. ``pos_embed`` is the fixed sin-cos table:
diffusers recomputes it (a buffer it does not save), bit-equal to ours; export checks that.

Where diffusers (checked on 0.42.1) differs from the official DiT, and what to do:
- Timestep features: diffusers' ``CombinedTimestepLabelEmbeddings`` hard-codes
  ``downscale_freq_shift=1`` (frequencies 10000^(-i/127)); the official code and ours use
  10000^(-i/128). No weight mapping can absorb that, so a folder loaded with plain
  ``DiTPipeline.from_pretrained`` (facebook's own conversion included) is a slightly different
  model (on a random tiny model, outputs move by ~3% of their scale). ``load_pipeline`` (and
  ``use_official_timestep_embedding``) sets the shift to 0 at run time; then the transformer's
  output equals ours within 1e-5 in fp32 (measured ~3e-7 max abs on outputs of scale ~1).
- Guidance: the official code guides only the first 3 latent channels (our
  ``guided_channels=3``); the installed ``DiTPipeline`` guides all ``in_channels`` (our default,
  ``guided_channels=None``). Use ``None`` to reproduce the pipeline, 3 to reproduce the paper's code.
- Null class: ``DiTPipeline`` uses label 1000 as the null class whatever the model's class count;
  ``load_pipeline`` routes 1000 to this model's null class when it has fewer than 1000 classes
  (plain ``from_pretrained`` then fails with an index error at ``guidance_scale > 1``).
- DDIM timesteps: ``DDIMScheduler.step`` always steps from t to t - T // N, so only its "leading"
  grid {0, T//N, ..., (N-1)·T//N} is self-consistent (exported with ``steps_offset=0``,
  ``set_alpha_to_one=True``, ``clip_sample=False``). Our ``DDIMSampler`` spreads N steps evenly over
  [0, T-1] (Improved DDPM's respacing) instead, which no ``DDIMScheduler`` setting reproduces;
  ``DiffusersDDIMSampler`` is our DDIM update on diffusers' grid. With it, eta 0 and
  ``guided_channels=None``, our final latents equal the pipeline's within 1e-5 of their largest
  magnitude (measured ~5e-7; diffusers keeps abar_t in float32, we in float64).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from dit_core.contract import (AUTOENCODER_PATH_KEY, CLASS_NAMES_KEY, DIFFUSERS_PIPELINE_FILE, DIFFUSERS_SCHEDULER_DIR,
                               DIFFUSERS_TRANSFORMER_DIR, DIFFUSERS_VAE_DIR, DIFFUSERS_WEIGHTS_NAME, SCALE_FACTOR_KEY)
from dit_core.diffusion import DDIMSampler, GaussianDiffusion, make_betas, objective_name, respace
from dit_core.models import DiT, DiTConfig, load_checkpoint

if TYPE_CHECKING:  # diffusers is imported where it is used: importing this module stays cheap
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    from dit_core.autoencoders import Autoencoder

TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's folder says the latter
PIPELINE_NULL_CLASS = 1000   # DiTPipeline.__call__ hard-codes this label as the null class
LAYER_NORM_EPS = 1e-6        # every LayerNorm of our (and the official) DiT
MLP_RATIO = 4.0              # diffusers' DiT fixes the MLP width at 4 x hidden


# ----------------------------------------------------------------------------------------------
# Key mapping (pure functions of state dicts)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyPair:
    """One of our keys and the diffusers keys holding it. ``kind``: ``"same"`` one tensor as is;
    ``"split"`` ours is theirs concatenated along dim 0 (q, k, v); ``"copies"`` each of theirs is a
    copy of ours (the per-block embedders)."""

    ours: str
    theirs: tuple[str, ...]
    kind: str


_TOP = (("x_embedder.proj", "pos_embed.proj"),
        ("final_layer.adaLN_modulation.1", "proj_out_1"),
        ("final_layer.linear", "proj_out_2"))
_BLOCK = (("adaLN_modulation.1", "norm1.linear"),
          ("attn.proj", "attn1.to_out.0"),
          ("mlp.fc1", "ff.net.0.proj"),
          ("mlp.fc2", "ff.net.2"))
_QKV = ("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v"))
_EMBEDDERS = (("t_embedder.mlp.0.weight", "norm1.emb.timestep_embedder.linear_1.weight"),
              ("t_embedder.mlp.0.bias", "norm1.emb.timestep_embedder.linear_1.bias"),
              ("t_embedder.mlp.2.weight", "norm1.emb.timestep_embedder.linear_2.weight"),
              ("t_embedder.mlp.2.bias", "norm1.emb.timestep_embedder.linear_2.bias"),
              ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"))
_FIXED = ("pos_embed",)   # ours only: the sin-cos table, which diffusers recomputes and does not save


def key_pairs(depth: int) -> list[KeyPair]:
    """The complete mapping between our state dict and diffusers' for a DiT of ``depth`` blocks
    (every key of both sides but ``pos_embed`` appears exactly once)."""
    pairs = [KeyPair(f"{o}.{p}", (f"{t}.{p}",), "same") for o, t in _TOP for p in ("weight", "bias")]
    pairs += [KeyPair(o, tuple(f"transformer_blocks.{i}.{t}" for i in range(depth)), "copies") for o, t in _EMBEDDERS]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            pairs += [KeyPair(f"{ours}{o}.{p}", (f"{theirs}{t}.{p}",), "same") for o, t in _BLOCK]
            pairs.append(KeyPair(f"{ours}{_QKV[0]}.{p}", tuple(f"{theirs}{t}.{p}" for t in _QKV[1]), "split"))
    return pairs


def _key_problems(expected: Mapping[str, Any], got: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and (where ``expected`` holds shapes) mis-shaped keys, in words."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
    mismatched = [
        f"{k}: found {tuple(got[k].shape)}, expected {tuple(shape)}"
        for k, shape in expected.items()
        if k in got and shape is not None and tuple(got[k].shape) != tuple(shape)
    ]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
    return problems


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our DiT state dict -> ``DiTTransformer2DModel``'s. The values are views of (and repeated
    references to) the input's tensors: clone them before ``safetensors`` sees them."""
    pairs = key_pairs(depth)
    problems = _key_problems({p.ours: None for p in pairs} | {k: None for k in _FIXED}, state_dict)
    if problems:
        raise ValueError(f"not the state dict of a DiT of depth {depth}: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for p in pairs:
        value = state_dict[p.ours]
        if p.kind == "split":
            out.update(zip(p.theirs, value.chunk(3, dim=0)))
        else:  # "same", and "copies": every block gets ours
            out.update((k, value) for k in p.theirs)
    return out


def from_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], depth: int, source: str = "diffusers state dict"
) -> dict[str, torch.Tensor]:
    """``DiTTransformer2DModel``'s state dict -> ours, without ``pos_embed`` (the fixed table).
    Refuses, naming ``source`` and the key, any missing or unexpected key and per-block embedder
    copies that differ from block 0's (our DiT has one embedder for all blocks)."""
    pairs = key_pairs(depth)
    problems = _key_problems({k: None for p in pairs for k in p.theirs}, state_dict)
    if problems:
        raise ValueError(f"{source} is not a DiT of depth {depth} as its config says: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for p in pairs:
        values = [state_dict[k] for k in p.theirs]
        if p.kind == "split":
            out[p.ours] = torch.cat(values, dim=0)
            continue
        for key, value in zip(p.theirs[1:], values[1:]):
            if not torch.equal(value, values[0]):
                raise ValueError(
                    f"{source}: {key} differs from {p.theirs[0]}; the per-block copies of the timestep and "
                    "class embedders must be identical to import as our DiT, which has one embedder for all "
                    "blocks (a model trained in diffusers with untied copies cannot be imported exactly)"
                )
        out[p.ours] = values[0]
    return out


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def transformer_config(config: DiTConfig) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` config of our ``config``; refuses what diffusers cannot hold."""
    if config.mlp_ratio != MLP_RATIO:
        raise ValueError(
            f"mlp_ratio={config.mlp_ratio}: diffusers' DiTTransformer2DModel fixes the MLP width at "
            f"{MLP_RATIO:g} x hidden_size, so this model cannot be exported; only mlp_ratio={MLP_RATIO:g} can"
        )
    if config.class_dropout_prob <= 0:
        raise ValueError(
            "class_dropout_prob=0: this model has no null-class row, and diffusers' DiT always has one "
            "(num_classes + 1 rows); export a model trained with label dropout"
        )
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "norm_eps": LAYER_NORM_EPS,   # diffusers' default 1e-5 would differ from the official 1e-6
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
    }


def _transformer_defaults() -> dict[str, Any]:
    """``DiTTransformer2DModel``'s own defaults, for keys a config.json leaves out."""
    from diffusers import DiTTransformer2DModel

    params = inspect.signature(DiTTransformer2DModel.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def dit_config(config: Mapping[str, Any], source: str = "diffusers config") -> DiTConfig:
    """Our ``DiTConfig`` of a ``DiTTransformer2DModel`` config (``config.json`` as a dict).

    ``norm_eps``, ``dropout``, ``upcast_attention`` and ``norm_num_groups`` are not architecture and
    are ignored: our LayerNorms use the official eps 1e-6 (the hub folder's 1e-5 is diffusers'
    default, not the model's). Anything else that is not a DiT is refused, naming ``source``."""
    cfg = {**_transformer_defaults(), **dict(config)}
    name = cfg.get("_class_name", TRANSFORMER_CLASSES[0])
    required = {
        "_class_name": (name in TRANSFORMER_CLASSES, f"one of {TRANSFORMER_CLASSES}"),
        "norm_type": (cfg["norm_type"] == "ada_norm_zero", "'ada_norm_zero'"),
        "activation_fn": (cfg["activation_fn"] == "gelu-approximate", "'gelu-approximate'"),
        "attention_bias": (cfg["attention_bias"] is True, "true"),
        "norm_elementwise_affine": (cfg["norm_elementwise_affine"] is False, "false"),
        "num_embeds_ada_norm": (isinstance(cfg["num_embeds_ada_norm"], int), "the number of classes"),
        "cross_attention_dim": (cfg.get("cross_attention_dim") is None, "null (a DiT has no cross-attention)"),
        "num_vector_embeds": (cfg.get("num_vector_embeds") is None, "null (a DiT takes continuous latents)"),
    }
    wrong = [f"{k}={cfg.get(k)!r} (a DiT needs {need})" for k, (ok, need) in required.items() if not ok]
    if wrong:
        raise ValueError(f"{source} is not a DiT transformer our DiT can hold: " + "; ".join(wrong))
    in_ch = int(cfg["in_channels"])
    out_ch = in_ch if cfg["out_channels"] is None else int(cfg["out_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(
            f"{source}: out_channels={out_ch} with in_channels={in_ch}; our DiT outputs in_channels (fixed "
            "variance) or 2 x in_channels (learned sigma)"
        )
    heads = int(cfg["num_attention_heads"])
    try:
        return DiTConfig(
            input_size=int(cfg["sample_size"]),
            patch_size=int(cfg["patch_size"]),
            in_channels=in_ch,
            hidden_size=heads * int(cfg["attention_head_dim"]),
            depth=int(cfg["num_layers"]),
            num_heads=heads,
            mlp_ratio=MLP_RATIO,
            class_dropout_prob=0.1,   # diffusers' label embedder always holds the null row
            num_classes=int(cfg["num_embeds_ada_norm"]),
            learn_sigma=out_ch == 2 * in_ch,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def scheduler_config(noise_schedule: str = "linear", diffusion_steps: int = 1000) -> dict[str, Any]:
    """The ``DDIMScheduler`` config of our ``create_diffusion(noise_schedule=..., diffusion_steps=...)``.

    The betas come from our ``make_betas`` (its constants live there). ``timestep_spacing="leading"``
    with ``steps_offset=0``: ``DDIMScheduler.step`` goes from t to t - T // N, which lands on the
    next evaluated timestep only on that grid; ``set_alpha_to_one``: the last step goes to abar = 1
    as our respaced diffusion does; ``clip_sample=False``: our samplers do not clip x_0 by default."""
    betas = make_betas(noise_schedule, diffusion_steps)
    if noise_schedule == "linear":
        schedule = {"beta_schedule": "linear", "beta_start": float(betas[0]), "beta_end": float(betas[-1])}
    else:  # make_betas accepted it, so it is the cosine schedule: diffusers' name for it
        schedule = {"beta_schedule": "squaredcos_cap_v2"}
    return {
        "num_train_timesteps": int(diffusion_steps),
        **schedule,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
    }


def diffusion_settings(config: Mapping[str, Any], learn_sigma: bool) -> dict[str, Any] | None:
    """Our checkpoint's ``diffusion`` settings of a scheduler config, or None where its schedule is
    none of ours (e.g. Stable Diffusion's "scaled_linear")."""
    steps = int(config.get("num_train_timesteps", 1000))
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return None
    if beta_schedule == "squaredcos_cap_v2":
        schedule = "cosine"
    elif beta_schedule == "linear":
        ours = make_betas("linear", steps)
        if not np.allclose([config.get("beta_start", 1e-4), config.get("beta_end", 0.02)], [ours[0], ours[-1]]):
            return None
        schedule = "linear"
    else:
        return None
    return {"noise_schedule": schedule, "diffusion_steps": steps, "learn_sigma": bool(learn_sigma)}


# ----------------------------------------------------------------------------------------------
# Sampling on diffusers' grid
# ----------------------------------------------------------------------------------------------

def leading_timesteps(num_steps: int, diffusion_steps: int = 1000) -> list[int]:
    """The timesteps ``DDIMScheduler`` ("leading", ``steps_offset=0``) evaluates, ascending."""
    if not 1 <= num_steps <= diffusion_steps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {diffusion_steps}]")
    stride = diffusion_steps // num_steps
    return [k * stride for k in range(num_steps)]


class DiffusersDDIMSampler(DDIMSampler):
    """Our DDIM update on ``DDIMScheduler``'s timestep grid (``leading_timesteps``) instead of our
    even respacing over [0, T-1]: with eta 0 it reproduces ``DiTPipeline`` with the exported
    scheduler (see the module docstring for the tolerance)."""

    def __init__(self, base: GaussianDiffusion, num_steps: int, eta: float = 0.0, clip_denoised: bool = False):
        super().__init__(base, num_steps, eta, clip_denoised)
        self.diffusion = respace(base, leading_timesteps(num_steps, base.num_timesteps))
        self.model_timesteps = self.diffusion.timestep_map[::-1].copy()


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def use_official_timestep_embedding(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Make a loaded diffusers DiT embed timesteps as the official DiT (and ours) does: frequencies
    10000^(-i/128), not diffusers' hard-coded 10000^(-i/127). A run-time setting: it is not saved."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def route_pipeline_null_class(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Map label 1000, which ``DiTPipeline`` uses as the null class, to this model's null class
    (``num_embeds_ada_norm``) when it has fewer than 1000 classes. A run-time hook: it is not saved."""
    num_classes = int(transformer.config.num_embeds_ada_norm)
    if num_classes > PIPELINE_NULL_CLASS:
        warnings.warn(
            f"this DiT has {num_classes} classes: DiTPipeline's guidance uses the real class "
            f"{PIPELINE_NULL_CLASS} as the null class; sample with guidance_scale <= 1 or with our samplers",
            stacklevel=2,
        )
    if num_classes >= PIPELINE_NULL_CLASS or getattr(transformer, "_null_class_routed", False):
        return transformer

    def to_null(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        labels = args[0]
        return (torch.where(labels == PIPELINE_NULL_CLASS, module.num_classes, labels), *args[1:])

    for block in transformer.transformer_blocks:
        block.norm1.emb.class_embedder.register_forward_pre_hook(to_null)
    transformer._null_class_routed = True
    return transformer


def to_diffusers_transformer(model: DiT, official_timestep_embedding: bool = True) -> DiTTransformer2DModel:
    """A ``DiTTransformer2DModel`` (eval mode, the model's dtype) holding ``model``'s weights;
    ``official_timestep_embedding``: see ``use_official_timestep_embedding``."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(**transformer_config(model.config))
    fixed = transformer.pos_embed.pos_embed
    if not torch.equal(model.pos_embed.detach().cpu(), fixed.to(model.pos_embed.dtype)):
        raise ValueError(
            "this model's pos_embed is not the fixed 2-D sin-cos table; diffusers recomputes that table "
            "and does not save one, so these weights cannot be exported"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    transformer.load_state_dict(to_diffusers_state_dict(state, model.config.depth), strict=True)
    if model.pos_embed.dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
        transformer.to(model.pos_embed.dtype)
    transformer.eval()
    return use_official_timestep_embedding(transformer) if official_timestep_embedding else transformer


def _dit_from_weights(config: DiTConfig, weights: Mapping[str, torch.Tensor], source: str) -> DiT:
    """Our DiT of ``config`` with diffusers-named ``weights``, all names and shapes checked first."""
    model = DiT(config).eval()
    expected = {k: v.shape for k, v in to_diffusers_state_dict(model.state_dict(), config.depth).items()}
    problems = _key_problems(expected, weights)
    if problems:
        raise ValueError(f"{source} does not match its config ({config}): " + "; ".join(problems))
    state = from_diffusers_state_dict(weights, config.depth, source)
    state["pos_embed"] = model.pos_embed.detach()
    model.load_state_dict(state, strict=True)
    return model


def from_diffusers_transformer(transformer: nn.Module, source: str = "diffusers transformer") -> DiT:
    """Our ``DiT`` (eval mode, float32) with a ``DiTTransformer2DModel``'s config and weights."""
    return _dit_from_weights(dit_config(dict(transformer.config), source), transformer.state_dict(), source)


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

def _vae_and_scale(autoencoder: Any, scale_factor: float | None) -> tuple[nn.Module, float]:
    """(AutoencoderKL, latent scale) of our ``Autoencoder`` (its record's scale) or a bare
    ``AutoencoderKL`` (its config's); an explicit ``scale_factor`` wins."""
    vae = getattr(autoencoder, "vae", autoencoder)
    if not hasattr(vae, "decode") or not hasattr(vae, "config"):
        raise TypeError(f"autoencoder must be a diffusers AutoencoderKL or dit_core's Autoencoder, got {type(autoencoder).__name__}")
    record = getattr(autoencoder, "record", None)
    own = record.scale_factor if record is not None else getattr(vae.config, "scaling_factor", 1.0)
    return vae, float(scale_factor if scale_factor is not None else own)


def _id2label(class_names: Sequence[str] | None, num_classes: int) -> dict[str, str] | None:
    """``DiTPipeline``'s id2label (string keys: it goes through JSON) from our class names."""
    if class_names is None:
        return None
    if len(class_names) != num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model of {num_classes} classes; pass the class_names of "
            "the latents the model was trained on (stats.json)"
        )
    return {str(i): str(name) for i, name in enumerate(class_names)}


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; choose another folder or pass overwrite=True (--overwrite)")
        shutil.rmtree(out)
    tmp.rename(out)


def export_pipeline(
    model: DiT,
    out_dir: str | os.PathLike,
    autoencoder: AutoencoderKL | Autoencoder,
    class_names: Sequence[str] | None = None,
    scale_factor: float | None = None,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    overwrite: bool = False,
    diffusion: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a ``DiTPipeline`` folder at ``out_dir`` (written beside it and renamed, so
    an interrupted export leaves no folder that looks complete) and return its path.

    ``autoencoder``: a diffusers ``AutoencoderKL`` or our ``Autoencoder``; the saved ``vae/config.json``
    gets ``scaling_factor`` = ``scale_factor`` or the autoencoder's own (the pipeline decodes
    ``latents / scaling_factor``). ``noise_schedule`` and ``diffusion_steps``: the model's diffusion
    (a checkpoint's ``diffusion`` settings). Load it back with ``load_pipeline`` (see the module
    docstring for what plain ``DiTPipeline.from_pretrained`` does differently).

    ``diffusion``: the model's whole ``diffusion`` record (it overrides ``noise_schedule`` and
    ``diffusion_steps``). A flow model's folder gets a ``FlowMatchEulerDiscreteScheduler`` and names
    ``ClassConditionalDiTPipeline`` as its class. Every folder ships that pipeline's code as
    ``pipeline.py`` (``dit_core/diffusers_pipeline.py``): with plain diffusers,
    ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`` samples it, either
    objective, guidance above 1 for any number of classes."""
    from diffusers import DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler

    from dit_core import diffusers_pipeline

    if objective_name(diffusion) == "meanflow" or model.config.interval_embed:
        raise ValueError("a meanflow model (average velocity, a second time input) has no diffusers pipeline to "
                         "export to; sample it here (`dit generate`, the sample job or the registered pyfunc)")
    vae, scale = _vae_and_scale(autoencoder, scale_factor)
    if int(vae.config.latent_channels) != model.config.in_channels:
        raise ValueError(
            f"the autoencoder has {vae.config.latent_channels} latent channels, the model takes "
            f"{model.config.in_channels}; pass the autoencoder the model was trained with"
        )
    id2label = _id2label(class_names, model.config.num_classes)
    record = dict(diffusion or {"noise_schedule": noise_schedule, "diffusion_steps": diffusion_steps})
    flow = objective_name(record) == "flow"
    if model.config.num_classes != PIPELINE_NULL_CLASS and not flow:
        warnings.warn(
            f"the model has {model.config.num_classes} classes, and DiTPipeline uses label {PIPELINE_NULL_CLASS} "
            "as the null class: to sample it with guidance_scale > 1, load the folder with "
            "DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True) or "
            "dit_core.diffusers_interop.load_pipeline",
            stacklevel=2,
        )
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(record.get("diffusion_steps", 1000)),
                                                    shift=float(record.get("sample_shift", 1.0)))
        pipe = diffusers_pipeline.ClassConditionalDiTPipeline(to_diffusers_transformer(model), vae, scheduler, id2label)
    else:
        scheduler = DDIMScheduler(**scheduler_config(str(record.get("noise_schedule", "linear")),
                                                     int(record.get("diffusion_steps", 1000))))
        pipe = DiTPipeline(to_diffusers_transformer(model), vae, scheduler, id2label=id2label)
    if id2label is not None:
        pipe.register_to_config(id2label=id2label)  # DiTPipeline does not record it itself
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        vae_config = tmp / DIFFUSERS_VAE_DIR / "config.json"
        # Edited in the saved file: the caller's autoencoder object is left as it was.
        vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": scale}, indent=2) + "\n")
        shutil.copyfile(diffusers_pipeline.__file__, tmp / DIFFUSERS_PIPELINE_FILE)
        _replace_dir(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def transformer_folder(folder: str | os.PathLike) -> Path:
    """The transformer folder of a ``DiTPipeline`` folder, or ``folder`` itself if it is one."""
    folder = Path(folder)
    for candidate in (folder / DIFFUSERS_TRANSFORMER_DIR, folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no diffusers DiT transformer at {folder}: expected {folder / DIFFUSERS_TRANSFORMER_DIR / 'config.json'} (a DiTPipeline "
        f"folder, as facebook/DiT-XL-2-256) or {folder / 'config.json'} (a transformer folder)"
    )


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    stem = f"{DIFFUSERS_WEIGHTS_NAME}.{variant}" if variant else DIFFUSERS_WEIGHTS_NAME
    for ext in ("safetensors", "bin"):
        single = folder / f"{stem}.{ext}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.{ext}.index.json"
        if index.is_file():  # sharded
            return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"no weights in {folder}: expected {stem}.safetensors or {stem}.bin (or a sharded index); found {present}"
        + ("" if variant else "; for a variant such as fp16 pass variant='fp16' (--variant fp16)")
    )


def _read_weights(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            weights.update(load_file(str(f)))
        else:
            weights.update(torch.load(f, map_location="cpu", weights_only=True))
    return weights


def import_transformer(folder: str | os.PathLike, variant: str | None = None) -> DiT:
    """Our ``DiT`` (eval mode, float32) from a diffusers DiT transformer folder, or a ``DiTPipeline``
    folder holding one in ``transformer/``; strict on the config, names and shapes (errors name the
    folder and the part). ``variant``: a weight variant such as ``"fp16"``."""
    path = transformer_folder(folder)
    source = f"diffusers transformer {path}"
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: config.json is not valid JSON ({e})") from e
    return _dit_from_weights(dit_config(config, source), _read_weights(_weight_files(path, variant)), source)


def load_pipeline(folder: str | os.PathLike, official_timestep_embedding: bool = True) -> DiTPipeline:
    """``DiTPipeline.from_pretrained(folder)`` (local files only) with the run-time fixes of the
    module docstring: the official timestep embedding, and label 1000 routed to this model's null class."""
    from diffusers import DiTPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a DiTPipeline folder: {folder / 'model_index.json'} is missing")
    pipe = DiTPipeline.from_pretrained(folder, local_files_only=True)
    if official_timestep_embedding:
        use_official_timestep_embedding(pipe.transformer)
    route_pipeline_null_class(pipe.transformer)
    return pipe


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _checkpoint_extras(path: Path) -> dict[str, Any]:
    """The ``latents`` (stats.json) and ``diffusion`` records one of our checkpoints carries ({} for
    an official one); memory-mapped, so the weights are not read a second time."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        return {}
    return {k: dict(obj[k]) for k in ("latents", "diffusion") if isinstance(obj.get(k), Mapping)}


def _export_command(args: argparse.Namespace) -> Path:
    from dit_core.autoencoders import load_autoencoder

    ckpt = Path(args.checkpoint)
    model = load_checkpoint(ckpt, num_heads=args.num_heads)
    extras = _checkpoint_extras(ckpt)
    diffusion = extras.get("diffusion", {})
    stats = json.loads(Path(args.stats).read_text()) if args.stats else extras.get("latents", {})
    vae_path = args.vae or stats.get(AUTOENCODER_PATH_KEY)
    if not vae_path:
        raise ValueError(
            f"no autoencoder for {ckpt}: pass --vae FOLDER (a diffusers AutoencoderKL folder, e.g. models/autoencoder "
            "or a local copy of stabilityai/sd-vae-ft-ema); the checkpoint and --stats name none"
        )
    return export_pipeline(
        model,
        args.out,
        load_autoencoder(vae_path),
        class_names=stats.get(CLASS_NAMES_KEY),
        scale_factor=stats.get(SCALE_FACTOR_KEY),
        overwrite=args.overwrite,
        diffusion=diffusion,
    )


def _import_command(args: argparse.Namespace) -> Path:
    model = import_transformer(args.folder, variant=args.variant)
    checkpoint: dict[str, Any] = {"ema": model.state_dict(), "model_config": model.config.to_dict()}
    scheduler = Path(args.folder) / DIFFUSERS_SCHEDULER_DIR / "scheduler_config.json"
    if scheduler.is_file():
        diffusion = diffusion_settings(json.loads(scheduler.read_text()), model.config.learn_sigma)
        if diffusion is not None:
            checkpoint["diffusion"] = diffusion
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from dit_core.settings import CommandParser

    parser = CommandParser(prog="python -m dit_core.diffusers_interop", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp_help = "our checkpoint (or an official .pt) -> a DiTPipeline folder"
    exp = sub.add_parser("export", help=exp_help, description=exp_help + ".")
    exp.add_argument("checkpoint", help="a .pt file: ours (a checkpoint directory's state.pt) or an official release")
    exp.add_argument("out", help="the DiTPipeline folder to write")
    exp.add_argument("--vae", help="diffusers AutoencoderKL folder (default: the checkpoint's latents.autoencoder_path)")
    exp.add_argument("--stats", help="the latents' stats.json (class_names, scale_factor; default: the checkpoint's)")
    exp.add_argument("--num-heads", type=int, help="attention heads of a bare state dict of non-preset width")
    exp.add_argument("--overwrite", action="store_true", help="replace the folder if it exists (default: refuse)")
    imp_help = "a diffusers DiT transformer (or DiTPipeline) folder -> our checkpoint .pt"
    imp = sub.add_parser("import", help=imp_help, description=imp_help + ".")
    imp.add_argument("folder", help="a diffusers DiTPipeline folder or its transformer folder (e.g. a local facebook/DiT-XL-2-256)")
    imp.add_argument("out", help="the .pt to write: {'ema', 'model_config', 'diffusion'}, loadable by load_checkpoint")
    imp.add_argument("--variant", help="weight variant, e.g. fp16")
    imp.add_argument("--overwrite", action="store_true", help="replace the .pt if it exists (default: refuse)")
    args = parser.parse_args(argv)
    try:
        out = _export_command(args) if args.command == "export" else _import_command(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


__all__ = [
    "DiffusersDDIMSampler",
    "KeyPair",
    "diffusion_settings",
    "dit_config",
    "export_pipeline",
    "from_diffusers_state_dict",
    "from_diffusers_transformer",
    "import_transformer",
    "key_pairs",
    "leading_timesteps",
    "load_pipeline",
    "route_pipeline_null_class",
    "scheduler_config",
    "to_diffusers_state_dict",
    "to_diffusers_transformer",
    "transformer_config",
    "transformer_folder",
    "use_official_timestep_embedding",
]

if __name__ == "__main__":
    raise SystemExit(main())
