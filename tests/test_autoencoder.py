"""Autoencoders: the small trained one (shape, scale factor = 1/std, save/load), a pretrained
folder keeping its own scale factor, the train_autoencoder stage, its colour figures and warning,
and a clear error offline."""

from __future__ import annotations

import json

import pytest
import torch

from dit_core.autoencoders import (
    Autoencoder,
    AutoencoderRecord,
    SmallAutoencoderConfig,
    TrainConfig,
    build_small_autoencoder,
    load_autoencoder,
    posterior_means,
    reconstruction_quality,
    save_autoencoder,
    train_small_autoencoder,
)
from dit_core.data import to_uint8
from dit_core.image_stats import ColourStats, colour_ratios
from pipelines.prepare import PrepareConfig, prepare
from pipelines.train_autoencoder import AutoencoderSettings, build_autoencoder, colour_warnings
from tests.fixtures_latents import publish_autoencoder as publish
from ray_jobs import storage
from tests.fixtures_data import IMAGE_SIZE, prepare_params, repo_params

SD_SCALE = 0.18215  # the SD VAE's config value: what a pretrained folder must keep


def small_config() -> SmallAutoencoderConfig:
    p = repo_params()["train_autoencoder"]
    return SmallAutoencoderConfig(p["latent_channels"], tuple(p["block_channels"]), p["layers_per_block"], p["norm_num_groups"])


def quick_params(**overrides) -> dict:
    """The stage's params with a few steps: these tests check plumbing, the DVC test quality."""
    p = dict(repo_params()["train_autoencoder"])
    p.update(steps=5, batch_size=16, max_images=64)
    p.update(overrides)
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ae") / "prepared")
    prepare(PrepareConfig.from_params(prepare_params()), out, log=lambda _: None)
    return out


def test_default_latent_shape_is_4x8x8():
    cfg = small_config()
    ae = Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE), AutoencoderRecord("t", 1.0, cfg.latent_channels, cfg.downsample))
    mean, std = ae.encode(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert tuple(mean.shape[1:]) == ae.latent_shape(IMAGE_SIZE) == (4, 8, 8)
    assert (std > 0).all()
    assert ae.decode(mean).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="image_size=15"):
        ae.latent_shape(15)


def test_trained_scale_factor_is_inverse_std_and_survives_save_load(tmp_path):
    images = torch.rand(48, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    train = TrainConfig(steps=3, batch_size=8, lr=1e-3, kl_weight=1e-6, seed=0)
    ae, metrics = train_small_autoencoder(images, small_config(), train, "test-ae")
    means = posterior_means(ae, images, 16)
    assert ae.scale_factor == pytest.approx(1 / float(means.std()), rel=1e-5)
    assert (means * ae.scale_factor).std().item() == pytest.approx(1.0, rel=1e-4)
    assert metrics["scale_factor"] == ae.scale_factor
    save_autoencoder(ae, tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.record == ae.record
    assert torch.allclose(loaded.encode(images[:4])[0], ae.encode(images[:4])[0], atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # the default is the SD VAE's way: trained on posterior samples, latents with their std
    assert not loaded.record.deterministic and bool((loaded.encode(images[:4])[1] > 0).all())


def test_a_plain_autoencoder_has_std_0_and_old_records_read_as_sampled(tmp_path):
    """train_autoencoder.deterministic=true trains on the posterior mean (a plain autoencoder): its
    latents have std 0, also after a save and load. A record written before the setting existed has
    no key: it was a KL autoencoder trained on samples."""
    images = torch.rand(16, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    train = TrainConfig(steps=2, batch_size=8, lr=1e-3, kl_weight=1e-6, seed=0, deterministic=True)
    ae, _ = train_small_autoencoder(images, small_config(), train, "plain-ae")
    save_autoencoder(ae, tmp_path / "plain")
    loaded = load_autoencoder(tmp_path / "plain")
    assert loaded.record.deterministic and bool((loaded.encode(images[:2])[1] == 0).all())
    assert AutoencoderRecord.from_dict({"id": "old", "scale_factor": 0.5, "latent_channels": 4, "downsample": 2}).deterministic is False


def test_pretrained_folder_keeps_its_own_scale(tmp_path):
    vae = build_small_autoencoder(small_config(), IMAGE_SIZE)
    vae.register_to_config(scaling_factor=SD_SCALE)
    vae.save_pretrained(tmp_path / "sdlike")  # a diffusers folder without our autoencoder.json
    ae = load_autoencoder(tmp_path / "sdlike")
    assert ae.scale_factor == pytest.approx(SD_SCALE)
    assert ae.id == str(tmp_path / "sdlike") and ae.downsample == 2


def test_stage_imports_pretrained_with_auto_or_data_scale(tmp_path, prepared):
    vae = build_small_autoencoder(small_config(), IMAGE_SIZE)
    vae.register_to_config(scaling_factor=SD_SCALE)
    vae.save_pretrained(tmp_path / "sdlike")
    ae, metrics = build_autoencoder(prepared, quick_params(pretrained=str(tmp_path / "sdlike")), log=lambda _: None)
    assert ae.scale_factor == pytest.approx(SD_SCALE) and metrics["pretrained"] == str(tmp_path / "sdlike")
    ae, _ = build_autoencoder(prepared, quick_params(pretrained=str(tmp_path / "sdlike"), scale_factor="data"),
                              log=lambda _: None)
    assert ae.scale_factor != pytest.approx(SD_SCALE) and ae.scale_factor > 0


def test_missing_pretrained_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"stabilityai/sd-vae-ft-ema.*Hugging Face cache"):
        load_autoencoder("stabilityai/sd-vae-ft-ema")


def test_stage_trains_and_publishes_to_s3(prepared, s3_bucket, tmp_path):
    lines: list[str] = []
    ae, metrics = build_autoencoder(prepared, quick_params(), log=lines.append)
    assert ae.id == "small-kl-f2c4" and metrics["latent_shape"] == [4, 8, 8]
    assert metrics["val_reconstruction_mse"] > 0
    # the val reconstructions' colour beside the inputs': digits are grey, so a 5-step autoencoder
    # that has not learnt them still never warns (a ratio of grey figures means nothing)
    assert metrics["colour_input"]["saturation_bright"] == 0 and metrics["colour_input"]["luminance"] > 0
    assert set(metrics["colour_ratio"]) >= {"saturation_bright", "saturation_dark"}
    assert metrics["colour_reconstruction"].keys() == metrics["colour_input"].keys()
    assert not [line for line in lines if "WARNING" in line]
    out = f"s3://{s3_bucket}/models/autoencoder"
    publish(ae, out)
    record = storage.read_json(f"{out}/autoencoder.json")
    assert record["scale_factor"] == pytest.approx(ae.scale_factor) and record["image_size"] == IMAGE_SIZE
    local = storage.download_folder(out, tmp_path / "fetched")
    assert json.loads((tmp_path / "fetched/autoencoder.json").read_text()) == record
    assert load_autoencoder(local).record == ae.record


def colour_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Issue 22's kind of image, tiny: a light-coloured square on a dark-coloured ground, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    ground = torch.rand(n, 3, 1, 1, generator=g) * 0.4                   # dark, in colour
    light = 0.6 + torch.rand(n, 3, 1, 1, generator=g) * 0.4              # light, in colour
    x = ground.expand(n, 3, size, size).clone()
    for i, (r, c) in enumerate(torch.randint(0, size // 2, (n, 2), generator=g).tolist()):
        x[i, :, r:r + size // 2, c:c + size // 2] = light[i]
    return x * 2 - 1


def test_colour_warning_fires_on_a_grey_autoencoder_and_not_on_a_good_one():
    images = colour_images(96)
    cfg = SmallAutoencoderConfig(latent_channels=4, block_channels=(8, 16), layers_per_block=1, norm_num_groups=1)
    threshold = AutoencoderSettings().warn_saturation_ratio
    bad, _ = train_small_autoencoder(images, cfg, TrainConfig(steps=1, batch_size=16, lr=2e-3, kl_weight=1e-6, seed=0), "bad")
    quality = reconstruction_quality(bad, images, 64)
    assert quality["colour_ratio"]["saturation_bright"] < threshold
    warnings = colour_warnings(quality, threshold)
    assert warnings and all(w.startswith("train_autoencoder: WARNING") and "warn_saturation_ratio" in w for w in warnings)
    # Reconstructions a twentieth of the way to their own grey keep ~95% of the saturation (a good
    # autoencoder; a trained one takes minutes, see benchmarks/autoencoder_colour.py); halfway, half.
    grey = images.mean(1, keepdim=True).expand_as(images)
    for share, warns in ((0.05, False), (0.5, True)):
        got = ColourStats.of(to_uint8(images + share * (grey - images))).means()
        want = ColourStats.of(to_uint8(images)).means()
        figures = {"colour_input": want, "colour_reconstruction": got, "colour_ratio": colour_ratios(got, want)}
        assert bool(colour_warnings(figures, threshold)) is warns, figures


def test_bad_autoencoder_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"norm_num_groups=3 does not divide block_channels \[8, 16\].*e\.g\. 1"):
        SmallAutoencoderConfig(latent_channels=4, block_channels=(8, 16), layers_per_block=1, norm_num_groups=3)
    with pytest.raises(ValueError, match=r"norm_num_groups=0"):
        SmallAutoencoderConfig(latent_channels=4, block_channels=(8, 16), layers_per_block=1, norm_num_groups=0)
    with pytest.raises(ValueError, match=r"warn_saturation_ratio=1.5.*\[0, 1\]"):
        AutoencoderSettings(warn_saturation_ratio=1.5)


def test_autoencoder_saved_before_norm_num_groups_loads_with_its_own(tmp_path):
    """A folder saved before the setting existed holds diffusers' config.json with the groups it was
    built with (16 at [16, 32]): loading takes them from there, whatever the setting says now."""
    from diffusers import AutoencoderKL

    old = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                        sample_size=IMAGE_SIZE)
    record = AutoencoderRecord("old", 0.5, 4, 2, IMAGE_SIZE)
    save_autoencoder(Autoencoder(old, record), tmp_path / "old")
    loaded = load_autoencoder(tmp_path / "old")
    assert loaded.vae.config.norm_num_groups == 16 and loaded.record == record
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    assert torch.allclose(loaded.decode(loaded.encode(x)[0]), Autoencoder(old, record).decode(Autoencoder(old, record).encode(x)[0]), atol=1e-5)
