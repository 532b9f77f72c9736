"""Autoencoders: the small trained one (shape, scale factor = 1/std, save/load), a pretrained
folder keeping its own scale factor, the train_autoencoder stage, and a clear error offline."""

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
    save_autoencoder,
    train_small_autoencoder,
)
from pipelines.prepare import PrepareConfig, prepare
from pipelines.train_autoencoder import build_autoencoder
from tests.fixtures_latents import publish_autoencoder as publish
from ray_jobs import storage
from tests.fixtures_data import IMAGE_SIZE, prepare_params, repo_params

SD_SCALE = 0.18215  # the SD VAE's config value: what a pretrained folder must keep


def small_config() -> SmallAutoencoderConfig:
    p = repo_params()["train_autoencoder"]
    return SmallAutoencoderConfig(p["latent_channels"], tuple(p["block_channels"]), p["layers_per_block"])


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
    ae, metrics = build_autoencoder(prepared, quick_params(), log=lambda _: None)
    assert ae.id == "small-kl-f2c4" and metrics["latent_shape"] == [4, 8, 8]
    assert metrics["val_reconstruction_mse"] > 0
    out = f"s3://{s3_bucket}/models/autoencoder"
    publish(ae, out)
    record = storage.read_json(f"{out}/autoencoder.json")
    assert record["scale_factor"] == pytest.approx(ae.scale_factor) and record["image_size"] == IMAGE_SIZE
    local = storage.download_folder(out, tmp_path / "fetched")
    assert json.loads((tmp_path / "fetched/autoencoder.json").read_text()) == record
    assert load_autoencoder(local).record == ae.record
