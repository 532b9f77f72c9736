"""Bad input refused before any work starts, each with a message naming the input and the fix
(issue 14, point 7): an autoencoder that does not fit the model's latents or the prepared images, a
missing or empty train pointer, an unknown sample format, an output bucket that does not exist, S3
credentials the server refuses, and a truncated checkpoint (to resume training, or to sample)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder, save_autoencoder
from ray_jobs import storage
from ray_jobs.encode import config_from as encode_config, encode
from ray_jobs.model_source import load_bundle
from ray_jobs.sample import run
from tests.conftest import free_port, wait_for_port
from tests.test_sample import IMAGE_SIZE, config, sample_model  # noqa: F401,F811  (a module fixture)


def autoencoder(path: Path, latent_channels: int = 4, image_size: int | None = IMAGE_SIZE, in_channels: int = 3) -> str:
    """A tiny autoencoder of ours (with its record), downsample 2."""
    cfg = SmallAutoencoderConfig(latent_channels=latent_channels, block_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    vae = build_small_autoencoder(cfg, image_size or IMAGE_SIZE)
    if in_channels != 3:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config({**vae.config, "in_channels": in_channels})
    save_autoencoder(Autoencoder(vae, AutoencoderRecord("bad", 0.7, latent_channels, cfg.downsample, image_size)), path)
    return str(path)


def nothing_under(path: Path) -> bool:
    return not path.exists() or not any(path.rglob("*.parquet"))


# --------------------------------------------------------------------------------------------
# An autoencoder that does not fit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, image_size, says", [
    (8, IMAGE_SIZE, r"the model takes 4-channel latents but autoencoder '.*ae' makes 8; use the autoencoder the model was trained with"),
    (4, 2 * IMAGE_SIZE, r"the model makes 4x4 latents, which autoencoder '.*ae' \(downsample 2\) decodes to 8px images, "
                        r"but it was trained on 16px images; use the autoencoder the model was trained with"),
])
def test_sample_refuses_an_autoencoder_that_does_not_fit_the_model(sample_model, tmp_path, channels, image_size, says):
    ae = autoencoder(tmp_path / "ae", latent_channels=channels, image_size=image_size)
    with pytest.raises(ValueError, match=says):
        run(config(sample_model, tmp_path / "out", autoencoder=ae))
    assert nothing_under(tmp_path / "out")


def fake_prepared(path: Path, image_size: int) -> str:
    """Only what encode reads before any work: the manifest."""
    storage.write_json(path / "manifest.json", {"image_size": image_size, "num_classes": 2, "class_names": ["a", "b"],
                                                "fingerprint": "f", "splits": {"train": {"shards": [], "count": 0},
                                                                               "val": {"shards": [], "count": 0}}})
    return str(path)


@pytest.mark.parametrize("image_size, ae_kw, says", [
    (2 * IMAGE_SIZE, {}, r"autoencoder '.*ae' was trained on 8px images, and the prepared images are 16px; "
                         r"re-run train_autoencoder on these images, or prepare at 8px"),
    (IMAGE_SIZE, {"in_channels": 1}, r"autoencoder '.*ae' takes 1-channel images, and the prepared images are RGB"),
    (IMAGE_SIZE + 1, {"image_size": None}, r"image_size=9 is not a multiple of autoencoder 'bad''s downsample factor 2"),
])
def test_encode_refuses_an_autoencoder_that_does_not_fit_the_images(tmp_path, image_size, ae_kw, says):
    ae = autoencoder(tmp_path / "ae", **ae_kw)
    prepared = fake_prepared(tmp_path / "prepared", image_size)
    with pytest.raises(ValueError, match=says):
        encode(encode_config(prepared, ae, str(tmp_path / "latents"), {}))
    assert not (tmp_path / "latents").exists()


# --------------------------------------------------------------------------------------------
# The sample stage's inputs: the train pointer, the formats
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [None, {}, {"trained.json": "{}"}, {"autoencoder/x": ""}])
def test_a_missing_or_empty_model_folder_is_named(tmp_path, files):
    """The train stage's model folder absent, empty, or without the bundle's dit.json (a cut-short copy)."""
    from pipelines.sample import model_uri

    folder = tmp_path / "models" / "dit"
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    if files is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with pytest.raises(FileNotFoundError, match=r"sample\.model is null and the train stage's model folder .*models/dit "
                                                r"holds no model; run the train stage .*dvc pull.*or set sample\.model"):
        model_uri({"model": None}, str(folder))


def test_a_damaged_model_folder_is_named(tmp_path):
    """dit.json present but the weights gone: the bundle check names the part and the fix."""
    from ray_jobs.mlflow_model import BrokenBundle
    from ray_jobs.model_source import load_bundle

    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "dit.json").write_text(json.dumps({"format": 1, "model_config": {}, "files": {"dit.safetensors": 10}}))
    with pytest.raises(BrokenBundle, match=r"is missing dit.safetensors \(the weights\)"):
        load_bundle(str(folder))


def test_an_unknown_sample_format_is_refused_by_the_job_the_cli_and_the_stage(sample_model, tmp_path, capsys):
    from pipelines.sample import main

    with pytest.raises(ValueError, match=r"formats \['gif'\] not understood; choose from \('png', 'parquet', 'npz'\)"):
        run(config(sample_model, tmp_path / "out", formats=["parquet", "gif"]))
    cli = subprocess.run([sys.executable, "-m", "ray_jobs.sample", "--model", sample_model["checkpoint"], "--out",
                          str(tmp_path / "out"), "--formats", "png,gif"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert cli.returncode == 2 and "formats ['gif'] not understood" in cli.stderr
    params = tmp_path / "params.yaml"
    params.write_text("sample:\n  formats: [webp]\n")
    with pytest.raises(SystemExit) as refused:   # before the pointer is even read: one line, exit status 2
        main(["--trained", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--params", str(params)])
    assert refused.value.code == 2 and "formats ['webp'] not understood" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# S3: a bucket that does not exist, credentials that are refused
# --------------------------------------------------------------------------------------------

def _tiny_train_params(storage_path: str) -> dict:
    return {"model": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}, "steps": 2, "batch_size": 8,
            "warmup_steps": 0, "checkpoint_every": 2, "log_every": 1, "num_workers": 1, "cpus_per_worker": 1,
            "max_failures": 0, "tracking": False, "storage_path": storage_path}


@pytest.mark.timeout(300)
def test_an_output_bucket_that_does_not_exist_is_named(ray_cluster, s3_server, sample_model, tmp_path):
    from fixtures_latents import write_synthetic_latents
    from ray_jobs.train import config_from as train_config, train

    bucket = f"no-such-bucket-{free_port()}"
    says = rf"cannot write to s3://{bucket}/(samples|latents|checkpoints): .*The specified bucket does not exist.*Check the path, bucket"
    with pytest.raises(PermissionError, match=says):
        run(config(sample_model, f"s3://{bucket}/samples"))
    with pytest.raises(PermissionError, match=says):   # before the prepared data is even read
        encode(encode_config(str(tmp_path / "no-prepared"), str(tmp_path / "no-ae"), f"s3://{bucket}/latents", {}))
    latents = tmp_path / "latents"
    write_synthetic_latents(latents, n=16, num_classes=2, shape=(4, 4, 4), views=("image",))
    with pytest.raises(PermissionError, match=says):
        train(train_config(str(latents), _tiny_train_params(f"s3://{bucket}/checkpoints")))


@pytest.fixture()
def refusing_s3(s3_server, tmp_path, monkeypatch) -> Iterator[str]:
    """A second S3 server that enforces authentication (moto's IAM checks from its first request),
    where the session's credentials do not exist; the endpoint points at it for the test."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    with open(tmp_path / "moto-auth.log", "w") as log:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
        try:
            wait_for_port(port)
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_refused_s3_credentials_are_named(refusing_s3, sample_model, tmp_path):
    says = r"cannot write to s3://team-bucket/(samples|latents): .*(Access Key Id|ACCESS_DENIED).*AWS credentials"
    with pytest.raises(PermissionError, match=says):
        run(config(sample_model, "s3://team-bucket/samples"))
    with pytest.raises(PermissionError, match=says):
        encode(encode_config(str(tmp_path / "no-prepared"), str(tmp_path / "no-ae"), "s3://team-bucket/latents", {}))


# --------------------------------------------------------------------------------------------
# A truncated checkpoint
# --------------------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_sampling_a_truncated_checkpoint_is_refused(sample_model, tmp_path):
    ckpt = tmp_path / "checkpoint_000100"
    ckpt.mkdir()
    (ckpt / "state.pt").write_bytes(Path(sample_model["checkpoint"], "state.pt").read_bytes())
    truncate(ckpt / "state.pt")
    says = r"checkpoint_000100/state\.pt is not a readable PyTorch checkpoint \(truncated or corrupt\?.*sample an earlier checkpoint"
    with pytest.raises(ValueError, match=says):
        load_bundle(str(ckpt))
    with pytest.raises(ValueError, match=says):
        run(config(sample_model, tmp_path / "out", model=str(ckpt)))
    assert nothing_under(tmp_path / "out")


@pytest.mark.timeout(300)
def test_resuming_from_a_truncated_checkpoint_is_refused(ray_cluster, tmp_path):
    """A run's latest checkpoint cut short (a disk that filled up): resuming the run names the file
    and the fix, rather than starting over or failing somewhere in torch."""
    from fixtures_latents import write_synthetic_latents
    from ray_jobs.train import config_from as train_config, train

    latents = tmp_path / "latents"
    write_synthetic_latents(latents, n=16, num_classes=2, shape=(4, 4, 4), views=("image",))
    params = {**_tiny_train_params(str(tmp_path / "ckpt")), "name": "cut"}
    first = train(train_config(str(latents), params))
    state = Path(first.checkpoint, "state.pt")
    truncate(state)
    # (Ray Train shortens the worker's error in the middle: the file, the reason and the fix stay.)
    with pytest.raises(Exception, match=rf"{first.checkpoint.rsplit('/', 1)[-1]}/state\.pt cannot be read "
                                        r"\(.*\); delete that checkpoint folder to resume from the one before, or use a new train\.name"):
        train(train_config(str(latents), {**params, "steps": 4}))
