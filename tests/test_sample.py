"""Bulk sampling on Ray Data (ray_jobs/sample.py): images independent of the number of actors and
the batch size, the untrained baseline sampled by the same job, resume after a killed job, S3
output, the ADM .npz layout and a grid of bounded size built shard by shard, and bad input refused
before any sampling starts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder, save_autoencoder
from dit_core.models import DiTConfig
from dit_core.pipeline import ImagePipeline, image_seed
from ray_jobs import storage
from dit_core.contract import SAMPLE_BASELINE_DIR, SAMPLE_CONFIG_FILE, SAMPLE_GRID_FILE, SAMPLES_NPZ_FILE
from ray_jobs.model_source import load_autoencoder_for, load_bundle
from ray_jobs.sample import GRID_MAX_CLASSES, SampleConfig, finish, missing_shards, read_images, run, shard_files, untrained_model
from tests.conftest import REPO
from tests.fixtures_registry import random_dit

IMAGE_SIZE = 8
NUM_CLASSES = 3
TINY = DiTConfig(input_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)


def kill_once_a_shard_exists(cmd: list[str], env: dict[str, str], parquet: str, timeout: float = 300) -> None:
    """Start the sample job ``cmd`` and SIGKILL its whole process group as soon as a first shard
    is visible under ``parquet`` (a folder or s3:// prefix)."""
    deadline = time.time() + timeout
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not storage.list_files(parquet, ".parquet"):
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, f"no shard appeared in {timeout:.0f} s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def sample_model(tmp_path_factory) -> dict[str, str]:
    """One of our checkpoints (a random tiny DiT) and the small autoencoder it names."""
    root = tmp_path_factory.mktemp("sample_model")
    cfg = SmallAutoencoderConfig(latent_channels=4, block_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    ae = Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE), AutoencoderRecord("tiny", 0.7, 4, cfg.downsample, IMAGE_SIZE))
    save_autoencoder(ae, root / "autoencoder")
    model = random_dit(TINY)
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "step": 1, "model_config": TINY.to_dict(),
                "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
                "latents": {"autoencoder_path": str(root / "autoencoder"), "scale_factor": 0.7, "num_classes": NUM_CLASSES}},
               ckpt / "state.pt")
    return {"checkpoint": str(ckpt), "autoencoder": str(root / "autoencoder"), "root": str(root)}


def config(sample_model, output, **kw) -> SampleConfig:
    base = dict(model=sample_model["checkpoint"], output=str(output), num_images=12, sampler="ddim", num_steps=8,
                batch_size=4, images_per_shard=5, formats=["png", "parquet", "npz"], guidance_scale=2.0, grid_per_class=2,
                baseline_images=0)
    return SampleConfig(**{**base, **kw})


def files_under(root: str) -> set[str]:
    return {f[len(root.rstrip("/")) + 1:] for f in storage.list_files(root)}


@pytest.mark.timeout(600)
def test_images_do_not_depend_on_actors_or_batch_size(ray_cluster, sample_model, tmp_path):
    one = config(sample_model, tmp_path / "one", num_actors=1, batch_size=5)
    two = config(sample_model, tmp_path / "two", num_actors=2, batch_size=2, actor_num_cpus=0.5, baseline_images=7)
    s1, s2 = run(one, progress=False), run(two, progress=False)
    assert s1["generated_now"] == s2["generated_now"] == 12
    assert s2["baseline_generated_now"] == 7 and s1["baseline_generated_now"] == 0
    a, la = read_images(one.output)
    b, lb = read_images(two.output)
    assert a.shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(la, np.arange(12) % NUM_CLASSES)  # "all": cycle through the classes
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, "batched arithmetic may round differently, by 1 at most"
    assert a.std() > 5, "a random model's samples are not constant images"
    assert len({im.tobytes() for im in a}) == 12, "every image has its own noise"
    # shard layout: ceil(12 / 5) = 3 shards of each kind, plus the npz, config, summary and grid
    expected = {f"png/shard-{s:06d}.tar" for s in range(3)} | {f"parquet/shard-{s:06d}.parquet" for s in range(3)}
    assert files_under(one.output) == expected | {SAMPLES_NPZ_FILE, SAMPLE_CONFIG_FILE, "summary.json", SAMPLE_GRID_FILE}
    # the ADM evaluation suite's layout
    with np.load(Path(one.output, SAMPLES_NPZ_FILE)) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(z["arr_0"], a)
        np.testing.assert_array_equal(z["arr_1"], la)
    # the PNG shards hold the same images, named by index, with their labels
    with tarfile.open(Path(one.output, "png", "shard-000001.tar")) as tar:
        names = sorted(tar.getnames())
        assert names[:2] == ["00000005.cls", "00000005.png"] and len(names) == 10
        from PIL import Image

        png = np.asarray(Image.open(io.BytesIO(tar.extractfile("00000007.png").read())))
        np.testing.assert_array_equal(png, a[7])
        assert tar.extractfile("00000007.cls").read() == str(7 % NUM_CLASSES).encode()
    # the same job sampled the untrained baseline: the samples an untrained model of the same
    # architecture gives with the same sampler, labels and per-image seeds
    assert {f for f in files_under(two.output) if f.startswith(SAMPLE_BASELINE_DIR)} == {
        f"{SAMPLE_BASELINE_DIR}/parquet/shard-000000.parquet", f"{SAMPLE_BASELINE_DIR}/parquet/shard-000001.parquet"}
    base, lbase = read_images(str(Path(two.output, SAMPLE_BASELINE_DIR)))
    bundle = load_bundle(two.model)
    autoencoder, scale = load_autoencoder_for(bundle)
    expected = ImagePipeline(untrained_model(bundle, two.seed), autoencoder, scale, bundle.diffusion, device="cpu").generate(
        lbase, [image_seed(two.seed, i) for i in range(7)], two, two.batch_size)
    np.testing.assert_array_equal(lbase, np.arange(7) % NUM_CLASSES)
    assert np.abs(base.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(base.astype(int) - b[:7].astype(int)).max() > 1, "the baseline is not the trained model's samples"


def fake_shards(cfg: SampleConfig, images: np.ndarray, labels: np.ndarray) -> None:
    """Sample shards as the actors write them, from given images (no model)."""
    import pyarrow as pa

    from dit_core.data import png_bytes
    from pipelines.common import write_parquet

    for shard, start in enumerate(range(0, len(images), cfg.images_per_shard)):
        idx = np.arange(start, min(start + cfg.images_per_shard, len(images)))[::-1]   # any order within a shard
        write_parquet(shard_files(cfg.output, shard, ["parquet"])["parquet"], pa.table({
            "index": pa.array(idx, pa.int64()), "label": pa.array(labels[idx], pa.int32()),
            "seed": pa.array(idx.astype(np.uint64), pa.uint64()), "image": pa.array([png_bytes(images[i]) for i in idx], pa.binary())}))


def test_npz_and_grid_are_built_shard_by_shard(tmp_path, monkeypatch):
    """samples.npz equals the images in index order (np.load reads it); grid.png has one row per
    chosen class, or at most GRID_MAX_CLASSES evenly spaced ones, whatever the number of classes;
    the driver never reads more than one shard at a time, and for a grid alone stops once it is full."""
    import ray_jobs.sample as job
    from PIL import Image

    rng = np.random.default_rng(0)
    n, classes = 23, 40
    images, labels = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.permutation(np.arange(n) % classes)
    cfg = SampleConfig(model="unused", output=str(tmp_path), num_images=n, images_per_shard=5, formats=["parquet", "npz"],
                       grid_per_class=3, class_labels=labels.tolist())
    fake_shards(cfg, images, labels)
    reads = []
    read_shard = job.read_shard
    monkeypatch.setattr(job, "read_shard", lambda out, shard: reads.append(shard) or read_shard(out, shard))
    finish(cfg, labels)
    assert reads == [0, 1, 2, 3, 4]
    with np.load(tmp_path / SAMPLES_NPZ_FILE) as z:
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    grid = np.asarray(Image.open(tmp_path / SAMPLE_GRID_FILE))
    rows = min(GRID_MAX_CLASSES, len(np.unique(labels)))
    assert grid.shape == (4 * (rows * 5 + 1), 4 * (3 * 5 + 1), 3)   # 4x4 images, 1-pixel gaps, drawn 4x

    reads.clear()
    chosen = [int(labels[0]), int(labels[1])]
    finish(replace(cfg, formats=["parquet"], grid_classes=chosen, grid_per_class=1), labels)
    assert reads == [0], "a grid of one image per chosen class is full after the first shard"
    grid = np.asarray(Image.open(tmp_path / SAMPLE_GRID_FILE))[::4, ::4]
    assert grid.shape == (2 * 5 + 1, 5 + 1, 3)
    np.testing.assert_array_equal(grid[1:5, 1:5], images[0])
    np.testing.assert_array_equal(grid[6:10, 1:5], images[1])
    with pytest.raises(ValueError, match=r"grid_classes \[99\] are not among the sampled classes"):
        finish(replace(cfg, grid_classes=[chosen[0], 99]), labels)


def sample_cli(cfg: SampleConfig) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.sample", "--model", cfg.model, "--out", cfg.output,
            "--num-images", str(cfg.num_images), "--sampler", cfg.sampler, "--num-steps", str(cfg.num_steps),
            "--batch-size", str(cfg.batch_size), "--images-per-shard", str(cfg.images_per_shard),
            "--formats", ",".join(cfg.formats), "--guidance-scale", str(cfg.guidance_scale),
            "--num-actors", str(cfg.num_actors), "--grid-per-class", str(cfg.grid_per_class),
            "--baseline-images", str(cfg.baseline_images)]


@pytest.mark.timeout(600)
def test_killed_job_resumes_to_the_same_files(ray_cluster, sample_model, tmp_path):
    """Kill the job (its driver process, on the shared cluster) once some shards exist; running it
    again generates only the missing shards, and the result equals an uninterrupted run."""
    killed = config(sample_model, tmp_path / "killed", num_images=30, images_per_shard=2, num_steps=60, num_actors=1)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(REPO)}
    kill_once_a_shard_exists(sample_cli(killed), env, str(Path(killed.output, "parquet")))
    time.sleep(3)  # the cluster reaps the dead driver's actors
    left = missing_shards(killed)
    assert 0 < len(left) < 15, f"the kill came too late or too early: {len(left)} of 15 shards missing"

    summary = run(killed, progress=False)
    assert summary["shards_generated_now"] == len(left)
    assert missing_shards(killed) == []

    whole = replace(killed, output=str(tmp_path / "whole"))
    run(whole, progress=False)
    assert files_under(killed.output) == files_under(whole.output)
    a, la = read_images(killed.output)
    b, lb = read_images(whole.output)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.timeout(600)
def test_s3_output(ray_cluster, sample_model, s3_bucket, tmp_path):
    cfg = config(sample_model, f"s3://{s3_bucket}/samples/run1", num_actors=2, num_images=6, images_per_shard=3)
    run(cfg, progress=False)
    files = files_under(cfg.output)
    assert {"parquet/shard-000000.parquet", "parquet/shard-000001.parquet", "png/shard-000001.tar", SAMPLES_NPZ_FILE, SAMPLE_GRID_FILE} <= files
    images, labels = read_images(cfg.output)
    assert images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    local = run(replace(cfg, output=str(tmp_path / "local"), num_actors=1), progress=False)
    assert local["images"] == 6
    assert np.abs(read_images(str(tmp_path / "local"))[0].astype(int) - images.astype(int)).max() <= 1


def test_official_release_layout_loads_with_a_given_autoencoder(sample_model, tmp_path):
    """An official ``.pt`` is a bare state dict: the architecture comes from its shapes, and the
    autoencoder must be given."""
    official = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6, num_classes=5)  # DiT-S width
    model = random_dit(official)
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    bundle = load_bundle(str(tmp_path / "DiT-tiny.pt"))
    assert bundle.config == official
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.tensor([0, 4])
    torch.testing.assert_close(bundle.build_model()(x, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="--autoencoder"):
        run(config(sample_model, tmp_path / "o", model=str(tmp_path / "DiT-tiny.pt")))


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"model": "models:/no-such-model/1"}, ValueError, "could not be resolved in MLflow"),
        ({"model": "/nonexistent/checkpoint"}, FileNotFoundError, "not found"),
        ({"expect_preset": "DiT-S/2"}, ValueError, "not DiT-S/2"),
        ({"class_labels": [0, 7]}, ValueError, r"class labels \[7\] are out of range"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale=-1.0 must be >= 0"),
        ({"sampler": "lms"}, ValueError, "sampler 'lms' is unknown"),
        ({"sampler": "euler"}, ValueError, "sampler 'euler' does not fit this model: it was trained with objective 'eps'"),
        ({"actor_num_cpus": 0.0}, ValueError, "actor_num_cpus=0.0 must be > 0"),
        ({"cache_interval": 0}, ValueError, "cache_interval=0 must be at least 1"),
        ({"baseline_images": -1}, ValueError, "baseline_images=-1 must be >= 0"),
        ({"grid_per_class": 100}, ValueError, "grid_per_class=100 must be within 0..32"),
        ({"grid_classes": [0, 5]}, ValueError, r"grid_classes \[5\] are not among the sampled classes"),
        ({"output": "under a file"}, PermissionError, "cannot write to"),
    ],
)
def test_bad_input_is_refused_before_sampling(sample_model, tmp_path, mlflow_sqlite, change, error, match):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = str(blocker / "samples") if change.pop("output", None) else tmp_path / "out"
    with pytest.raises(error, match=match):   # when the settings are made, or when the job starts
        run(config(sample_model, output, **change))
    assert not storage.list_files(tmp_path / "out", ".parquet"), "nothing is generated"


def test_cli_rejects_malformed_class_labels(sample_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.sample", "--model", sample_model["checkpoint"],
                           "--out", str(tmp_path), "--class-labels", "1,two"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "class_labels='1,two'" in proc.stderr


def test_resuming_with_other_settings_is_refused(sample_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    storage.write_json(out / SAMPLE_CONFIG_FILE, json.loads(json.dumps(config(sample_model, out, seed=1).identity())))
    with pytest.raises(ValueError, match="other settings"):
        run(config(sample_model, out, seed=2))
