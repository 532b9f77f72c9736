"""The Ray Data encode job: on the shared two-node cluster (latents equal a direct encode, flips,
labels, stats.json true to the shards), and as a stage subprocess with its own local Ray reading
and writing S3 while the test cluster keeps working."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder, save_autoencoder
from dit_core.data import pngs_to_batch
from pipelines.prepare import PrepareConfig, prepare
from pipelines.common import read_manifest, read_split
from tests.fixtures_latents import publish_autoencoder as publish
from ray_jobs import storage
from ray_jobs.encode import EncodeBatch, config_from, encode, latents_fingerprint
from tests.fixtures_data import IMAGE_SIZE, REPO, planted_folder, prepare_params, repo_params, run, stage_env

SCALE = 0.5  # an arbitrary record value: stats.json must carry the autoencoder's, whatever it is
ALL_COLUMNS = ("mean", "std", "mean_flip", "std_flip")  # both views (flip_views: true)


def tiny_autoencoder() -> Autoencoder:
    p = repo_params()["train_autoencoder"]
    cfg = SmallAutoencoderConfig(p["latent_channels"], tuple(p["block_channels"]), p["layers_per_block"], p["norm_num_groups"])
    torch.manual_seed(0)
    return Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE), AutoencoderRecord("tiny", SCALE, cfg.latent_channels, cfg.downsample))


def encode_params(**overrides) -> dict:
    p = dict(repo_params()["encode"])
    p.update(batch_size=8)  # several batches per block, even on the small planted set
    p.update(overrides)
    return p


def read_latents(out: str, stats: dict, split: str) -> pa.Table:
    fs, _ = storage.resolve(out)
    folder = storage.version_folder(out, stats)   # the published version stats.json names
    return pa.concat_tables(pq.read_table(storage.resolve(storage.join(folder, s))[1], filesystem=fs)
                            for s in stats["shards"][split])


def row_groups(path: str) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    images = planted_folder(per_class=10).write_local(root / "images")
    prepared = str(root / "prepared")
    prepare(PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(images), max_skipped_fraction=0.5)),
            prepared, log=lambda _: None)
    ae = tiny_autoencoder()
    save_autoencoder(ae, root / "ae")
    return {"root": root, "prepared": prepared, "ae_path": str(root / "ae"), "ae": ae}


def test_encode_on_ray_cluster(ray_cluster, inputs, tmp_path):
    out = str(tmp_path / "latents")
    stats = encode(config_from(inputs["prepared"], inputs["ae_path"], out, encode_params(flip_views=True)))
    manifest = read_manifest(inputs["prepared"])
    assert stats["counts"] == {s: manifest["splits"][s]["count"] for s in ("train", "val")}
    assert stats["latent_shape"] == [4, 8, 8] and stats["scale_factor"] == SCALE
    assert stats["autoencoder_id"] == "tiny" and stats["input_fingerprint"] == manifest["fingerprint"]
    assert stats["views"] == ["image", "flip"]
    assert storage.read_json(f"{out}/stats.json") == stats
    # the reader's rows are split into several blocks, so every actor of the pool gets work (one
    # block per split, as Ray's parquet reader returns them, would leave the second actor idle)
    assert len(stats["shards"]["train"]) >= 2, stats["shards"]

    train = read_latents(out, stats, "train")
    for col in ALL_COLUMNS:
        assert train.schema.field(col).type == pa.list_(pa.float32())
    assert train.schema.field("label").type == pa.int32()
    latents = {c: np.stack(train.column(c).to_numpy(zero_copy_only=False)).reshape(-1, *stats["latent_shape"])
               for c in ALL_COLUMNS}

    # the job's latents are what the autoencoder gives for the same images (and their flips)
    prepared = read_split(inputs["prepared"], manifest, "train")
    by_key = {k: i for i, k in enumerate(prepared.column("key").to_pylist())}
    rows = [by_key[k] for k in train.column("key").to_pylist()]
    x = pngs_to_batch([prepared.column("image")[i].as_py() for i in rows])
    mean, std = inputs["ae"].encode(x)
    mean_flip, _ = inputs["ae"].encode(x.flip(-1))
    assert np.allclose(latents["mean"], mean.numpy(), atol=1e-4)
    assert np.allclose(latents["std"], std.numpy(), atol=1e-4)
    assert np.allclose(latents["mean_flip"], mean_flip.numpy(), atol=1e-4)
    assert not np.allclose(latents["mean_flip"], latents["mean"], atol=1e-3)
    assert train.column("label").to_pylist() == [prepared.column("label")[i].as_py() for i in rows]

    # stats.json states the channel statistics of the train means it wrote
    assert np.allclose(stats["channel_mean"], latents["mean"].mean(axis=(0, 2, 3)), atol=1e-5)
    assert np.allclose(stats["channel_std"], latents["mean"].std(axis=(0, 2, 3)), atol=1e-4)

    # a re-encode writes the same rows to the same shards and row groups (the pool keeps the input
    # order), so a training run resumed after it reads its data in the order it started with
    again = encode(config_from(inputs["prepared"], inputs["ae_path"], str(tmp_path / "again"), encode_params(flip_views=True)))
    assert again["shards"] == stats["shards"]
    for name in stats["shards"]["train"]:
        first = storage.join(storage.version_folder(out, stats), name)
        second = storage.join(storage.version_folder(str(tmp_path / "again"), again), name)
        assert row_groups(first) == row_groups(second)
        assert pq.read_table(first, columns=["key"]).equals(pq.read_table(second, columns=["key"]))

    # the fingerprint identifies data + autoencoder + settings: batching does not change it
    fingerprint = lambda **o: latents_fingerprint(manifest["fingerprint"], inputs["ae"], config_from("p", "a", "o", encode_params(**o)))
    assert fingerprint(batch_size=3, flip_views=True) == stats["fingerprint"]
    assert fingerprint(mode="sample", flip_views=True) != stats["fingerprint"]
    assert fingerprint(flip_views=False) != stats["fingerprint"]


def test_sample_mode_is_seeded_per_key(inputs):
    """The actor's batch function, called directly: in sample mode each row's noise comes from its
    key, so a row gets the same sample in any batch, on any actor; std is stored as 0."""
    manifest = read_manifest(inputs["prepared"])
    shard = storage.join(storage.version_folder(inputs["prepared"], manifest), manifest["splits"]["train"]["shards"][0])
    table = pq.read_table(shard)
    table = table.append_column("path", pa.array([shard] * table.num_rows))
    sampler = EncodeBatch(inputs["ae"], "sample", seed=0)
    whole = sampler(table)
    pieces = pa.concat_tables([sampler(table.slice(0, 3)), sampler(table.slice(3))])
    assert np.allclose(np.stack(whole.column("mean").to_numpy(zero_copy_only=False)),
                       np.stack(pieces.column("mean").to_numpy(zero_copy_only=False)), atol=1e-5)
    assert np.all(np.stack(whole.column("std").to_numpy(zero_copy_only=False)) == 0)
    assert set(whole.column("split").to_pylist()) == {"train"}
    posterior = EncodeBatch(inputs["ae"], "posterior", seed=0)(table)
    mean = np.stack(posterior.column("mean").to_numpy(zero_copy_only=False))
    std = np.stack(posterior.column("std").to_numpy(zero_copy_only=False))
    z = (np.stack(whole.column("mean").to_numpy(zero_copy_only=False)) - mean) / std
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2  # a draw from N(mean, std^2)
    other_seed = EncodeBatch(inputs["ae"], "sample", seed=1)(table)
    assert not np.allclose(np.stack(other_seed.column("mean").to_numpy(zero_copy_only=False)),
                           np.stack(whole.column("mean").to_numpy(zero_copy_only=False)))


def test_encode_refuses_incomplete_prepared_data(inputs, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        encode(config_from(str(tmp_path / "half"), inputs["ae_path"], str(tmp_path / "out"), encode_params()))
    assert not (tmp_path / "out").exists()


def test_stage_subprocess_on_s3_beside_the_test_cluster(ray_cluster, inputs, s3_bucket, s3_server):
    """`python -m pipelines.encode` with s3:// in and out starts its own local Ray while the
    session's cluster runs; both keep working."""
    import ray

    bucket = f"s3://{s3_bucket}"
    storage.upload_folder(inputs["prepared"], f"{bucket}/prepared")
    publish(inputs["ae"], f"{bucket}/autoencoder")
    run([sys.executable, "-m", "pipelines.encode", "--prepared", f"{bucket}/prepared", "--autoencoder",
         f"{bucket}/autoencoder", "--out", f"{bucket}/latents"], REPO, stage_env(s3_server), timeout=300)
    stats = storage.read_json(f"{bucket}/latents/stats.json")
    manifest = storage.read_json(f"{bucket}/prepared/manifest.json")
    assert stats["counts"]["train"] == manifest["splits"]["train"]["count"]
    assert stats["autoencoder_path"] == f"{bucket}/autoencoder" and stats["latent_shape"] == [4, 8, 8]
    train = read_latents(f"{bucket}/latents", stats, "train")
    assert train.num_rows == stats["counts"]["train"]
    # params.yaml's default (train.random_flip: false): the image view only
    assert stats["views"] == ["image"] and "mean_flip" not in train.column_names and "std_flip" not in train.column_names
    assert len(train.column("mean")[0].as_py()) == int(np.prod(stats["latent_shape"]))
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42  # the test cluster is still there
