"""diffusers interop: export to a DiTPipeline folder, import back, and what must then be equal.

Every test builds a tiny random model (depth 2, width 64, 8x8 latents with 4 channels, patch 2) and
a tiny AutoencoderKL; nothing is downloaded. Random weights everywhere (adaLN-Zero's zeros too), so
that equal outputs are not trivially zero.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import dit_core.models  # noqa: E402
from dit_core.diffusers_interop import (  # noqa: E402
    DiffusersDDIMSampler,
    export_pipeline,
    from_diffusers_transformer,
    import_transformer,
    key_pairs,
    leading_timesteps,
    load_pipeline,
    main,
    scheduler_config,
    to_diffusers_state_dict,
    to_diffusers_transformer,
    use_official_timestep_embedding,
)
from dit_core.diffusion import DDIMSampler, create_diffusion, make_betas, sample_loop  # noqa: E402
from dit_core.pipeline import make_model_fn  # noqa: E402
from dit_core.models import DiT, DiTConfig, load_checkpoint  # noqa: E402
from tests.test_models import randomize  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
CLASS_NAMES = [f"class {i}" for i in range(10)]
FORWARD_ATOL = 1e-5   # fp32 transformer outputs of scale ~1 (measured ~3e-7)
LATENT_RTOL = 1e-5    # final latents, relative to their largest magnitude (measured ~5e-7)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    """A random tiny DiT in eval mode; every parameter but the fixed pos_embed is N(0, 0.05^2)."""
    return randomize(DiT(DiTConfig(**{**TINY, **overrides})).eval(), seed)


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=8, scaling_factor=scaling_factor,
    ).eval()


def inputs(model: DiT, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, y) spanning the timestep range and including the null class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.config.in_channels, model.config.input_size, model.config.input_size, generator=g)
    t = torch.tensor([0, 1, 37, 250, 500, 999][:n])
    y = torch.tensor([0, 3, model.config.num_classes, 5, 1, 9][:n])
    return x, t, y


def export(model: DiT, folder: Path, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the null-class warning of models of != 1000 classes
        return export_pipeline(model, folder, tiny_vae(), **{"class_names": CLASS_NAMES, **kwargs})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[DiT, Path]:
    model = tiny_dit()
    return model, export(model, tmp_path_factory.mktemp("interop") / "pipe", scale_factor=0.5)


# ----------------------------------------------------------------------------------------------
# Mapping and round trip
# ----------------------------------------------------------------------------------------------

def test_key_map_covers_both_state_dicts_exactly() -> None:
    """Every key of ours (but the fixed pos_embed) and every key of an instantiated diffusers DiT
    appears in the mapping exactly once, with the shapes diffusers expects."""
    model = tiny_dit()
    pairs = key_pairs(model.config.depth)
    ours = [p.ours for p in pairs]
    theirs = [k for p in pairs for k in p.theirs]
    assert len(ours) == len(set(ours)) and len(theirs) == len(set(theirs))
    assert set(ours) | {"pos_embed"} == set(model.state_dict())
    reference = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).state_dict()
    mapped = to_diffusers_state_dict(model.state_dict(), model.config.depth)
    assert set(theirs) == set(reference) == set(mapped)
    assert all(mapped[k].shape == reference[k].shape for k in reference)


def test_import_of_export_is_the_same_model(exported) -> None:
    """import(export(m)) == m exactly: every state-dict tensor bit-equal, the config's architecture
    the same, the forward outputs bit-equal; from the pipeline folder and from its transformer/."""
    model, folder = exported
    for source in (folder, folder / "transformer"):
        back = import_transformer(source)
        assert back.config == DiTConfig(**{**TINY, "class_embed_init_std": back.config.class_embed_init_std})
        theirs, ours = back.state_dict(), model.state_dict()
        assert set(theirs) == set(ours)
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), [k for k in ours if not torch.equal(theirs[k], ours[k])]
        x, t, y = inputs(model)
        with torch.no_grad():
            assert torch.equal(back(x, t, y), model(x, t, y))
    # In memory as well, and for a fixed-variance model (out_channels = in_channels).
    fixed = tiny_dit(learn_sigma=False)
    back = from_diffusers_transformer(to_diffusers_transformer(fixed))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in fixed.state_dict().items())


def test_exported_transformer_forward_equals_ours(exported) -> None:
    """The saved DiTTransformer2DModel, loaded with plain from_pretrained plus the official timestep
    embedding, gives our outputs on the same (x, t, y) within FORWARD_ATOL (fp32)."""
    model, folder = exported
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        ours = model(x, t, y)
        stock = transformer(x, timestep=t, class_labels=y).sample
        theirs = use_official_timestep_embedding(transformer)(x, timestep=t, class_labels=y).sample
    assert ours.abs().max() > 0.1                     # not trivially zero
    assert (theirs - ours).abs().max() < FORWARD_ATOL
    assert (stock - ours).abs().max() > 1e-3          # diffusers' own timestep features differ (next test)


def test_stock_diffusers_differs_only_in_timestep_frequencies(exported) -> None:
    """Plain diffusers embeds timesteps with frequencies 10000^(-i/(half-1)) (downscale_freq_shift=1),
    the official DiT with 10000^(-i/half): our model with the former equals stock diffusers, so that
    is the only difference."""
    model, folder = exported
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    original = dit_core.models.timestep_embedding

    def diffusers_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    x, t, y = inputs(model)
    with torch.no_grad(), mock.patch.object(dit_core.models, "timestep_embedding", diffusers_frequencies):
        ours = model(x, t, y)
    assert dit_core.models.timestep_embedding is original
    with torch.no_grad():
        assert (transformer(x, timestep=t, class_labels=y).sample - ours).abs().max() < FORWARD_ATOL


def test_pipeline_folder_holds_scheduler_labels_and_scale(exported) -> None:
    model, folder = exported
    pipe = load_pipeline(folder)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.labels == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert pipe.vae.config.scaling_factor == 0.5
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    # The scheduler's betas are ours (float32 rounding apart), linear and cosine alike.
    for schedule in ("linear", "cosine"):
        theirs = DDIMScheduler(**scheduler_config(schedule)).betas.double().numpy()
        np.testing.assert_allclose(theirs, make_betas(schedule, 1000), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def test_timestep_grids() -> None:
    """What each side evaluates: DiffusersDDIMSampler walks DDIMScheduler's "leading" grid; our
    DDIMSampler spreads the steps over [0, 999], which is DDIMScheduler's "linspace" grid, but there
    DDIMScheduler.step goes to t - 1000 // N, not to the next evaluated timestep, so no
    DDIMScheduler setting reproduces our default DDIM."""
    base = create_diffusion()
    for n in (1, 7, 10, 50, 250):
        leading = DDIMScheduler(**scheduler_config())
        leading.set_timesteps(n)
        assert leading.timesteps.tolist() == DiffusersDDIMSampler(base, n).model_timesteps.tolist()
        assert leading_timesteps(n)[::-1] == leading.timesteps.tolist()
        linspace = DDIMScheduler(**{**scheduler_config(), "timestep_spacing": "linspace"})
        linspace.set_timesteps(n)
        assert linspace.timesteps.tolist() == DDIMSampler(base, n).model_timesteps.tolist()


def pipeline_latents(pipe: DiTPipeline, labels: list[int], seed: int, steps: int, guidance: float) -> torch.Tensor:
    """The pipeline's final latents: DiTPipeline (diffusers 0.42.1) has no output_type="latent" and
    clamps the decoded images, so the latents are taken at the input of its VAE decode (which it
    calls with latents / scaling_factor; the export's 0.5 makes the product back exact)."""
    pipe.set_progress_bar_config(disable=True)
    with mock.patch.object(pipe.vae, "decode", wraps=pipe.vae.decode) as decode:
        pipe(labels, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
             num_inference_steps=steps, output_type="pt")
    return decode.call_args.args[0] * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("steps", [10, 7])
def test_ddim_sampler_matches_dit_pipeline(exported, steps: int) -> None:
    """Same initial noise (one torch.Generator, seed 3: the pipeline draws it with the same
    torch.randn call), class labels, 4.0 guidance and steps: our DDIM (eta 0) on DDIMScheduler's grid
    (DiffusersDDIMSampler) and the exported DiTPipeline give the same final latents within LATENT_RTOL
    of their largest magnitude. Both drop the learned-sigma half. Guidance: the installed DiTPipeline
    guides all latent channels, so our side uses guided_channels=None; guided_channels=3 (the
    official code's) visibly differs. The model has 10 classes: load_pipeline routes the pipeline's
    null label 1000 to class 10."""
    model, folder = exported
    pipe = load_pipeline(folder)
    labels = [1, 7, 9, 0]
    theirs = pipeline_latents(pipe, labels, seed=3, steps=steps, guidance=4.0)

    noise = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    y = torch.tensor(labels)
    sampler = DiffusersDDIMSampler(create_diffusion(), steps)
    ours = sample_loop(sampler, make_model_fn(model, y, 4.0, guided_channels=None), noise)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() / scale < LATENT_RTOL
    three = sample_loop(sampler, make_model_fn(model, y, 4.0, guided_channels=3), noise)
    assert (three - theirs).abs().max() / scale > 1e-3


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

def _edit_weights(folder: Path, edit) -> None:
    path = folder / "transformer" / WEIGHTS
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda w: w.pop("transformer_blocks.1.attn1.to_k.weight"), "transformer_blocks.1.attn1.to_k.weight"),
        (lambda w: w.update({"transformer_blocks.0.ff.net.2.bias": torch.zeros(65)}), "transformer_blocks.0.ff.net.2.bias"),
        (lambda w: w.update({"transformer_blocks.0.norm3.weight": torch.ones(64)}), "transformer_blocks.0.norm3.weight"),
        (lambda w: w["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"].add_(1e-3),
         "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"),
        (lambda w: w["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"][3].mul_(2),
         "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"),
    ],
    ids=["missing-key", "wrong-shape", "unexpected-key", "timestep-copies-differ", "class-copies-differ"],
)
def test_broken_weights_are_refused_by_name(tmp_path: Path, edit, named: str) -> None:
    folder = export(tiny_dit(), tmp_path / "pipe")
    _edit_weights(folder, edit)
    with pytest.raises(ValueError) as err:
        import_transformer(folder)
    assert named in str(err.value) and str(folder / "transformer") in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [("norm_type", "ada_norm"), ("activation_fn", "gelu"), ("out_channels", 5), ("attention_bias", False)],
)
def test_broken_config_is_refused_by_name(tmp_path: Path, field: str, value) -> None:
    folder = export(tiny_dit(), tmp_path / "pipe")
    config_path = folder / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), field: value}))
    with pytest.raises(ValueError) as err:
        import_transformer(folder)
    assert field in str(err.value) and str(folder / "transformer") in str(err.value)


def test_missing_folder_and_unexportable_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_transformer(tmp_path)
    with pytest.raises(ValueError, match="mlp_ratio"):
        export(tiny_dit(mlp_ratio=2.0), tmp_path / "a")
    with pytest.raises(ValueError, match="3 class names for a model of 10 classes"):
        export(tiny_dit(), tmp_path / "b", class_names=["a", "b", "c"])
    odd = tiny_dit()
    with torch.no_grad():
        odd.pos_embed.add_(1e-3)  # a learned table: diffusers would silently use the fixed one
    with pytest.raises(ValueError, match="pos_embed"):
        export(odd, tmp_path / "c")
    with pytest.warns(UserWarning, match="null class"):
        export_pipeline(tiny_dit(), tmp_path / "d", tiny_vae())
    with pytest.raises(FileExistsError, match="overwrite"):
        export(tiny_dit(), tmp_path / "d")
    with pytest.raises(ValueError, match="a meanflow model .* has no diffusers pipeline"):   # none samples u(z, r, t)
        export_pipeline(tiny_dit(interval_embed=True), tmp_path / "e", tiny_vae(), diffusion={"objective": "meanflow"})


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

# In a Python that cannot import this project (isolated mode, run from an empty folder, the project's
# packages blocked should the venv have it installed): the folder
# loads with plain diffusers through the pipeline.py it ships, and samples the given noise.
PLAIN_DIFFUSERS = """
import sys
for name in ("dit_core", "ray_jobs", "pipelines"):   # the venv may hold the project installed: block it
    sys.modules[name] = None
import torch
from diffusers import DiffusionPipeline
folder, noise, out = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True, local_files_only=True)
images = pipe(class_labels=[0, 3, 9, 3], guidance_scale=2.0, num_inference_steps=6, latents=torch.load(noise),
              output_type="np").images
torch.save({"images": torch.as_tensor(images), "class": type(pipe).__name__, "labels": pipe.get_label_ids(["class 3"])}, out)
"""


@pytest.mark.parametrize("objective", ["flow", "eps"])
def test_exported_folder_samples_with_plain_diffusers_at_guidance_above_1(tmp_path: Path, objective: str) -> None:
    """`dit export` of a flow (and an eps) model of 10 classes: plain diffusers, without this
    project, samples it at guidance 2 (the null class is the model's own, not 1000), and a flow
    model's images equal our euler sampler's from the same noise."""
    import subprocess
    import sys

    flow = objective == "flow"
    model = tiny_dit(learn_sigma=not flow)
    diffusion = ({"objective": "flow", "diffusion_steps": 1000, "learn_sigma": False, "timestep_sampling": "logit-normal"}
                 if flow else {"objective": "eps", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True})
    vae = tiny_vae(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    ckpt = tmp_path / "state.pt"
    torch.save({"ema": model.state_dict(), "model_config": model.config.to_dict(), "diffusion": diffusion,
                "latents": {"class_names": CLASS_NAMES, "scale_factor": 0.5}}, ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "pipe"), "--vae", str(tmp_path / "vae")]) == 0
    assert (tmp_path / "pipe" / "pipeline.py").is_file()
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.save(noise, tmp_path / "noise.pt")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_DIFFUSERS, str(tmp_path / "pipe"), str(tmp_path / "noise.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path / "empty", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["class"] == "ClassConditionalDiTPipeline" and got["labels"] == [3]
    images = got["images"]
    assert images.shape == (4, 8, 8, 3) and torch.isfinite(images).all()
    if flow:   # our euler sampler on the same noise, guidance on all channels, decoded by the same VAE
        from dit_core.diffusion import make_objective

        sampler = make_objective(diffusion).sampler("euler", 6)
        y = torch.tensor([0, 3, 9, 3])
        with torch.no_grad():
            latents = sample_loop(sampler, make_model_fn(model, y, 2.0, None, 1), noise.clone(), None)
            ours = (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert torch.allclose(images, ours, atol=1e-4), (images - ours).abs().max()


def test_command_line_export_then_import(tmp_path: Path) -> None:
    """export reads the checkpoint's own records (stats: class names, scale; diffusion), import
    writes a .pt that load_checkpoint reads back to the same weights."""
    model = tiny_dit()
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    ckpt = tmp_path / "state.pt"
    torch.save({"ema": model.state_dict(), "model_config": model.config.to_dict(),
                "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
                "latents": {"class_names": CLASS_NAMES, "scale_factor": 0.25, "autoencoder_path": str(vae_dir)}}, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(ckpt), str(tmp_path / "pipe")]) == 0
    assert json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())["scaling_factor"] == 0.25
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["id2label"]["3"] == "class 3"
    assert main(["import", str(tmp_path / "pipe"), str(tmp_path / "back.pt")]) == 0
    back = load_checkpoint(tmp_path / "back.pt")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    saved = torch.load(tmp_path / "back.pt", weights_only=True)
    assert saved["diffusion"] == {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
    assert main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2
