"""DiT model: presets, adaLN-Zero init, the official checkpoint layout and outputs, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_core.models import (
    PRESETS,
    DiT,
    DiTConfig,
    DiT_models,
    config_from_state_dict,
    create_model,
    load_checkpoint,
    preset_name,
)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny(**kw) -> DiT:
    return DiT(DiTConfig(**{**TINY, **kw}))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (a fresh adaLN-Zero model would make most comparisons trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# --------------------------------------------------------------------------------------------
# The official layout, written out from facebookresearch/DiT models.py (timm PatchEmbed,
# Attention and Mlp), independently of dit_core.
# --------------------------------------------------------------------------------------------

def official_state_dict_shapes(depth, hidden, patch, in_ch, input_size, num_classes, learn_sigma=True):
    out_ch = in_ch * 2 if learn_sigma else in_ch
    tokens = (input_size // patch) ** 2
    mlp = int(hidden * 4.0)
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp, hidden),
            b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (hidden, mlp),
            b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return shapes


def reference_forward(sd, x, t, y, patch, heads):
    """DiT's forward written out as plain tensor algebra over an official state dict, with explicit
    softmax attention, following the reference code line by line."""
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    n = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    d = h.shape[-1]
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6)  # noqa: E731
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        sm, scm, gm, sp, scp, gp = (m[:, None] for m in mod)
        z = ln(h) * (1 + scm) + sm
        qkv = lin(z, b + "attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        z = lin((attn @ v).transpose(1, 2).reshape(n, -1, d), b + "attn.proj")
        h = h + gm * z
        z = ln(h) * (1 + scp) + sp
        z = lin(F.gelu(lin(z, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gp * z
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    gs = int(h.shape[1] ** 0.5)
    out_c = h.shape[-1] // (patch * patch)
    h = h.reshape(n, gs, gs, patch, patch, out_c).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(n, out_c, gs * patch, gs * patch)


def test_presets_named_as_in_the_paper():
    expected = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert set(DiT_models) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_shapes_and_official_layout(name):
    # Meta device: the full-size presets cost no memory; shapes and keys are still real.
    input_size = 16
    with torch.device("meta"):
        model = DiT_models[name](input_size=input_size, in_channels=4, num_classes=7, learn_sigma=True, class_dropout_prob=0.1)
        out = model(torch.zeros(3, 4, input_size, input_size), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 8, input_size, input_size)
    cfg = model.config
    official = official_state_dict_shapes(cfg.depth, cfg.hidden_size, cfg.patch_size, 4, input_size, 7)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


def test_parameter_counts_match_the_paper():
    # Table 4 of the DiT paper: XL/2 675M, S/2 33M (256x256 images, 32x32x4 latents, 1000 classes).
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"](input_size=32)
        s = DiT_models["DiT-S/2"](input_size=32)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert abs(count(xl) / 1e6 - 675) < 1
    assert abs(count(s) / 1e6 - 33) < 1


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4", "DiT-S/8"])
def test_fresh_model_outputs_zeros(name):
    model = DiT_models[name](input_size=16, num_classes=10)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([3, 900]), torch.tensor([1, 10]))
    assert out.shape == (2, 8, 16, 16)
    assert torch.count_nonzero(out) == 0


def test_official_checkpoint_loads_strict_and_matches_reference(tmp_path):
    cfg = dict(depth=2, hidden=96, patch=2, in_ch=4, input_size=8, num_classes=10)
    shapes = official_state_dict_shapes(**cfg)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    # Official checkpoints hold the sin-cos table in pos_embed.
    model = DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=96, depth=2, num_heads=4, num_classes=10))
    sd["pos_embed"] = model.pos_embed.detach().clone()
    path = tmp_path / "DiT-tiny-official.pt"
    torch.save(sd, path)  # an official release is a bare state dict

    loaded = load_checkpoint(path, model)
    with pytest.raises(ValueError, match="96"):
        load_checkpoint(path)  # not a preset width: the head count is not guessed
    inferred = load_checkpoint(path, num_heads=4)  # the rest of the architecture inferred from the shapes
    assert inferred.config.hidden_size == 96 and inferred.config.depth == 2 and inferred.config.num_classes == 10
    assert inferred.config.num_heads == 4

    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 9, 10])  # 10 = null class
    ref = reference_forward(sd, x, t, y, patch=2, heads=4)
    with torch.no_grad():
        ours = loaded.eval()(x, t, y)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_reference_pos_embed_layout():
    # The first half of each token's embedding encodes its column, the second its row (as the reference).
    m = tiny()
    pe = m.pos_embed[0].numpy().reshape(4, 4, 64)
    assert np.allclose(pe[0, :, :32], pe[3, :, :32])        # same column -> same first half
    assert np.allclose(pe[:, 0, 32:], pe[:, 3, 32:])        # same row -> same second half
    assert not np.allclose(pe[0, 0], pe[1, 1])


def test_checkpoint_mismatch_is_named_before_loading(tmp_path):
    src = randomize(tiny(hidden_size=64))
    path = tmp_path / "ck.pt"
    torch.save({"model": src.state_dict(), "ema": src.state_dict()}, path)
    other = tiny(hidden_size=32, num_heads=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    deeper = tiny(depth=3)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(path, deeper)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_is_loaded_weights_only(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": argparse.Namespace(payload=1)}}, path)  # an arbitrary pickled object
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path, tiny())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown DiT preset 'DiT-M/2'"):
        create_model("DiT-M/2")
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        DiT_models["DiT-S/4"](input_size=10)
    m = tiny()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        m(x, torch.tensor([1, 2]), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="out of range"):
        m(x, torch.tensor([1, 2]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_gradients_flow_to_every_trainable_parameter():
    m = tiny()
    m.train()
    out = m(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    out.square().mean().backward()  # after one backward through zero-init, only the last layers get gradient
    m.zero_grad()
    randomize(m)
    out = m(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 10, 3]))
    out.square().mean().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.pos_embed.grad is None


def test_gradient_checkpointing_gives_the_same_gradients():
    a = randomize(tiny())
    b = tiny(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    a.y_embedder.dropout_prob = b.y_embedder.dropout_prob = 0.0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 2])
    a(x, t, y).sum().backward()
    b(x, t, y).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_cfg_in_one_batched_pass_matches_two_passes():
    m = randomize(tiny()).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 20, 30]), torch.tensor([1, 5, 9])
    calls = []
    m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        guided = m.forward_with_cfg(x, t, y, cfg_scale=4.0)
        assert calls == [6]  # one pass over the doubled batch
        cond = m(x, t, y)
        uncond = m(x, t, torch.full_like(y, 10))
        official = m.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=3)
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])
    torch.testing.assert_close(official[:, 3:4], cond[:, 3:4])  # official variant leaves channel 3 unguided
    torch.testing.assert_close(official[:, :3], guided[:, :3])


def test_block_cache_runs_the_blocks_once_per_interval_per_sample():
    from dit_core.diffusion import create_diffusion, make_sampler, sample_loop
    from dit_core.pipeline import make_model_fn
    from dit_core.models import BlockCache

    m = randomize(tiny()).eval()
    block_calls = []
    m.blocks[0].register_forward_hook(lambda mod, inp, out: block_calls.append(1))
    sampler = make_sampler("ddim", create_diffusion(None), 9)
    y = torch.tensor([1, 5, 9])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(labels, x, interval):
        with torch.no_grad():
            return sample_loop(sampler, make_model_fn(m, labels, 3.0, cache_interval=interval), x)

    plain = sample(y, noise, 1)
    assert len(block_calls) == 9
    block_calls.clear()
    cached = sample(y, noise, 3)
    assert len(block_calls) == 3  # evaluations 0, 3 and 6; the six between reuse the residual
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    # the residual is kept per sample: a batch gives what its parts give alone (so samples do not
    # depend on the batch size with caching either)
    parts = torch.cat([sample(y[:1], noise[:1], 3), sample(y[1:], noise[1:], 3)])
    torch.testing.assert_close(parts, cached, rtol=1e-4, atol=1e-5)
    # a cached step still sees its own timestep and input: the output differs from the last full one
    cache = BlockCache(2)
    x, t = noise, torch.tensor([500, 500, 500])
    with torch.no_grad():
        first = m(x, t, y, cache)
        second = m(x, torch.tensor([400, 400, 400]), y, cache)
    assert cache.calls == 2 and not torch.equal(first, second)
    with pytest.raises(ValueError, match="cache interval 0 must be at least 1"):
        BlockCache(0)


def test_bf16_autocast():
    m = randomize(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = m(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, t, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)


def test_torch_compile_matches_eager():
    m = randomize(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    compiled = torch.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), m(x, t, y), rtol=1e-4, atol=1e-5)


def test_config_inference_and_preset_name():
    m = DiT_models["DiT-S/4"](input_size=16, num_classes=10)
    cfg = config_from_state_dict(m.state_dict())
    assert cfg == m.config
    assert preset_name(cfg) == "DiT-S/4"
