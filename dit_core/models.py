"""Diffusion Transformer (DiT) with adaLN-Zero conditioning (Peebles and Xie, 2023).

The parameter names and shapes follow the official release (facebookresearch/DiT), so its
checkpoints (e.g. ``DiT-XL-2-256x256.pt``) load with ``strict=True``. Symbols: ``x`` latents
(N, C, H, W), ``t`` diffusion timesteps (N,), ``y`` class labels (N,), ``c`` the conditioning
vector (N, D), T tokens of width D.

MeanFlow (Geng et al. 2025): with ``interval_embed`` the network takes a second time, the start ``r``
of the interval [r, t], and predicts the average velocity u(z_t, r, t). It embeds the interval's
length h = t - r (the paper's best-measured pair (t, t - r), Table 1c) with an embedder that is
exactly zero at h = 0, so with r = t (or no r) the model is exactly the one without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32          # latent height and width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000       # the null (unconditional) class id is num_classes
    learn_sigma: bool = True
    grad_checkpointing: bool = False
    class_embed_init_std: float = 0.02   # the paper's; short runs on small data learn labels faster from ~1
    interval_embed: bool = False  # MeanFlow: a second time input r (the model embeds t - r); off = the DiT paper's

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size != 0:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                f"choose an input_size that is a multiple of {self.patch_size}"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be at least 1")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# depth, hidden size, heads of the paper's Table 1; the patch size is the "/p" suffix.
_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
_PRESET_HEADS: dict[int, int] = {h: n for _, h, n in _SIZES.values()}  # width -> heads
PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _SIZES.items()
    for patch in (2, 4, 8)
}


def preset_config(name: str, **overrides: Any) -> DiTConfig:
    """The config of preset ``name`` (e.g. ``"DiT-XL/2"``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}")
    fixed = set(PRESETS[name]) & set(overrides)
    if fixed:
        raise ValueError(f"{sorted(fixed)} are fixed by preset {name!r}: remove them from the model settings "
                         "(train.model: {} with a preset) or pick another preset")
    return DiTConfig(**PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Image to patch tokens, a strided convolution (named as timm's, for checkpoint keys)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: the convolution's (N, D, T) memory layout would otherwise carry through every
        # residual add, norm and gate of the transformer (strided kernels, a copy in each norm).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, C, H, W) -> (N, T, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim), [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class IntervalEmbedder(nn.Module):
    """The interval h = t - r (MeanFlow) embedded like a timestep, but exactly zero at h = 0 for any
    weights: the cos features enter as cos(h f) - 1 and the MLP has no biases, so with r = t the
    conditioning c is bit-equal to the one without this embedder (u(z, t, t) is today's v(z, t))."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=False), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=False),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=h.device) / half)
        args = h[:, None].float() * freqs[None]
        # cos(a) - 1 written as -2 sin^2(a / 2): exact zero at a = 0 and no cancellation near it
        freq = torch.cat([-2 * torch.sin(0.5 * args) ** 2, torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            freq = torch.cat([freq, torch.zeros_like(freq[:, :1])], dim=-1)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout for classifier-free guidance; row ``num_classes`` is null."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # The official code adds the null row only when dropout is on; keep that for key shapes.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, as one fused kernel over x (eager mode would run two)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash / memory-efficient kernels where present)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, d = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # 3 x (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)                                       # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, tokens, d))                         # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning regresses shift, scale and a gate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class BlockCache:
    """Sampling speed-up (opt-in): run the transformer blocks on one step in ``interval`` and reuse
    their residual (blocks' output minus input, per sample) on the steps between; the embeddings
    and the final layer still see each step's input, timestep and label. An approximation: adjacent
    steps of a long trajectory (DDPM-250) change the residual little, few-step solvers' steps are
    far apart (BENCHMARKS.md, change 5, measures both). One cache per trajectory: ``make_model_fn``
    builds one with the trajectory's model function."""

    def __init__(self, interval: int):
        if int(interval) < 1:
            raise ValueError(f"cache interval {interval} must be at least 1 (1 = no caching)")
        self.interval = int(interval)
        self.calls = 0
        self.residual: torch.Tensor | None = None

    def reuse(self) -> bool:
        """Whether this call may reuse the residual (and count the call)."""
        i, self.calls = self.calls, self.calls + 1
        return self.residual is not None and i % self.interval != 0


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        # Fixed 2-D sin-cos position embedding; a frozen parameter, as in the official state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()
        if cfg.interval_embed:
            # built and drawn after the shared weights, so one seed gives the same shared weights with or without it
            self.interval_embedder = IntervalEmbedder(cfg.hidden_size)
            self._init_interval_embedder()

    def _init_interval_embedder(self) -> None:
        # as t's first layer; the last at zero: a model given this embedder (e.g. a flow checkpoint
        # fine-tuned into MeanFlow) starts as exactly the model without it, for every r
        nn.init.normal_(self.interval_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.interval_embedder.mlp[2].weight)

    def initialize_weights(self) -> None:
        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic)
        grid = int(self.config.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.config.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear, not a Conv
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.config.class_embed_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if hasattr(self, "interval_embedder"):
            self._init_interval_embedder()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)                  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)                      # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)              # (N, C, H, W)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None = None) -> None:
        cfg = self.config
        if r is not None and not cfg.interval_embed:
            raise ValueError("r was given, but this DiT has no second time input (interval_embed is false): build it "
                             "with interval_embed: true in the model settings to train or sample MeanFlow, or pass r=None")
        if r is not None and r.shape != t.shape:
            raise ValueError(f"r {tuple(r.shape)} must have the shape of t {tuple(t.shape)}")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[-2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"x has shape {tuple(x.shape)}; this DiT expects (N, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size})"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t {tuple(t.shape)} and y {tuple(y.shape)} must both have shape ({x.shape[0]},)")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels must be an integer tensor, got {y.dtype}")
        max_label = cfg.num_classes if self.y_embedder.dropout_prob > 0 else cfg.num_classes - 1
        if torch.compiler.is_compiling():
            return
        if y.device.type == "cpu":
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > max_label):
                raise ValueError(
                    f"class labels out of range [0, {max_label}] (null class = {cfg.num_classes}): "
                    f"got min {int(y.min())}, max {int(y.max())}"
                )
        else:  # no host sync on accelerators
            torch._assert_async(((y >= 0) & (y <= max_label)).all(), "class labels out of range")

    def _block(self, block: DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cache: BlockCache | None = None, *,
                r: torch.Tensor | None = None, drop_labels: bool = True) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W).
        ``cache``: sampling only, see ``BlockCache``. ``r``: (N,) the start of MeanFlow's interval,
        in t's units (``interval_embed`` models only; None: r = t). ``drop_labels=False``: no label
        dropout in training mode (an objective that drops labels itself, MeanFlow's, passes null ids)."""
        self._check_inputs(x, t, y, r)
        x = self.x_embedder(x) + self.pos_embed        # (N, T, D)
        h = t - r if r is not None else None            # (N,) the interval length t - r
        t = self.t_embedder(t)                          # (N, D)
        if h is not None:
            t = t + self.interval_embedder(h)           # (N, D); exactly + 0 where r = t
        y = self.y_embedder(y, self.training and drop_labels)  # (N, D)
        c = t + y                                       # (N, D)
        if cache is not None and cache.reuse():
            x = x + cache.residual
        else:
            h = x
            for block in self.blocks:
                h = self._block(block, h, c)            # (N, T, D)
            if cache is not None:
                cache.residual = h - x
            x = h
        x = self.final_layer(x, c)                      # (N, T, p*p*out_channels)
        return self.unpatchify(x)                       # (N, out_channels, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = None,
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched pass over [conditional | null-class] inputs.

        x, t, y hold N samples; the output has N samples. ``guided_channels=None`` guides every
        epsilon channel; ``3`` reproduces the official code, which guided only the first three.
        The variance channels (learned sigma) come from the conditional half.
        """
        n = x.shape[0]
        null = torch.full_like(y, self.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), cache)  # (2N, out_channels, H, W)
        cond, uncond = out[:n], out[n:]
        k = self.in_channels if guided_channels is None else guided_channels
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


# ----------------------------------------------------------------------------------------------
# Position embedding (numpy, as the reference, so the float64 computation matches it)
# ----------------------------------------------------------------------------------------------

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) embedding; the first half encodes the column (w), the second the row (h)."""
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0)  # w first, as in the reference
    return np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)


# ----------------------------------------------------------------------------------------------
# Presets and checkpoints
# ----------------------------------------------------------------------------------------------

def _preset_constructor(name: str) -> Callable[..., DiT]:
    def build(**kwargs: Any) -> DiT:
        return DiT(preset_config(name, **kwargs))

    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: kwargs are DiTConfig fields (input_size, in_channels, num_classes, ...)."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {name: _preset_constructor(name) for name in PRESETS}


def create_model(preset: str, **kwargs: Any) -> DiT:
    if preset not in DiT_models:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DiT_models)}")
    return DiT_models[preset](**kwargs)


def extract_state_dict(obj: Mapping[str, Any], prefer: str = "ema") -> dict[str, torch.Tensor]:
    """The model weights in a loaded checkpoint: an official bare state dict, or ours / fast-DiT's
    ``{"model": ..., "ema": ...}`` (EMA preferred). DDP/compile prefixes are stripped."""
    sd: Any = obj
    for key in (prefer, "ema", "model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            sd = obj[key]
            break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
        cfg = getattr(model, "config", None)
        hint = f"; the model is {cfg}" if cfg is not None else ""
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts) + hint)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Infer the architecture of an (official or our) DiT state dict from its shapes.

    The weights do not record the number of attention heads: it is ``num_heads`` when given, else
    the paper's for the presets' widths (the official releases are presets); any other width is refused.
    """
    try:
        w = state_dict["x_embedder.proj.weight"]            # (D, C, p, p)
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        num_patches = state_dict["pos_embed"].shape[1]
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        out_ch = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    except KeyError as e:
        raise ValueError(f"not a DiT state dict: key {e} is missing") from e
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    heads = num_heads if num_heads is not None else _PRESET_HEADS.get(hidden)
    if heads is None:
        presets = ", ".join(f"{h}: {n}" for h, n in sorted(_PRESET_HEADS.items()))
        raise ValueError(
            f"cannot tell the number of attention heads of a DiT of width (hidden_size) {hidden}: the weights do "
            f"not record it, and only the paper's presets have a known one (width: heads = {presets}). Load it "
            "with its model config (our checkpoints and MLflow models carry model_config; or build DiT(config) "
            "and load the weights into it), or pass num_heads explicitly"
        )
    learn_sigma = out_ch == 2 * in_ch
    interval_embed = "interval_embedder.mlp.0.weight" in state_dict
    return DiTConfig(
        input_size=int(round(num_patches ** 0.5)) * patch,
        patch_size=patch,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_hidden / hidden,
        class_dropout_prob=0.1,
        num_classes=rows - 1,
        learn_sigma=learn_sigma,
        interval_embed=interval_embed,
    )


def preset_name(config: DiTConfig) -> str | None:
    """The paper's name of a config's architecture, or None for a custom one."""
    for name, fields in PRESETS.items():
        if all(getattr(config, k) == v for k, v in fields.items()):
            return name
    return None


def load_checkpoint(path: str | Path, model: DiT | None = None, prefer: str = "ema", num_heads: int | None = None) -> DiT:
    """Load an official DiT ``.pt`` or one of ours into ``model``. Without a model, ours are built
    from the ``model_config`` they carry and a bare state dict from its shapes (``num_heads``: its
    number of attention heads, needed unless its width is a paper preset's).

    The file is read with ``weights_only=True``; keys and shapes are checked before any weight is copied.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = extract_state_dict(obj, prefer=prefer)
    if model is None:
        if isinstance(obj, Mapping) and isinstance(obj.get("model_config"), Mapping):
            config = DiTConfig(**obj["model_config"])
        else:
            try:
                config = config_from_state_dict(sd, num_heads)
            except ValueError as e:
                raise ValueError(f"checkpoint {path}: {e}") from e
        model = DiT(config)
    check_state_dict(model, sd, source=f"checkpoint {path}")
    model.load_state_dict(sd, strict=True)
    return model


__all__ = [
    "DiT",
    "DiTConfig",
    "IntervalEmbedder",
    "DiT_models",
    "PRESETS",
    "check_state_dict",
    "config_from_state_dict",
    "create_model",
    "extract_state_dict",
    "load_checkpoint",
    "preset_config",
    "preset_name",
    "timestep_embedding",
]
