"""Which views the latents hold (docs/CONTRACTS.md, ``data/latents/``): encode stores the flipped view
only with ``encode.flip_views``, stats.json says which views exist, the fingerprint tells them
apart, and training reads only the stored views and refuses ``train.random_flip`` on latents that
have no flipped view, on the driver, before any work. Latents written before ``views`` existed
hold both views and still load as such."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dit_core.training import noisy_latents
from pipelines.common import read_manifest
from ray_jobs import storage
from ray_jobs.encode import EncodeBatch, config_from as encode_config, encode, latents_fingerprint
from ray_jobs.latent_input import LatentStream, StreamPlan, scan_units
from ray_jobs.train import config_from, diffusion_settings, model_config, read_stats, train_shards
from tests.fixtures_latents import write_synthetic_latents
from tests.test_encode import encode_params, inputs, read_latents  # noqa: F401 - `inputs` is a fixture

FLIP_COLUMNS = {"mean_flip", "std_flip"}
SHAPE = (4, 8, 8)


def refusal(folder: str) -> str:
    """The message of a random_flip the latents cannot serve: the setting, the folder, both fixes."""
    return rf"train\.random_flip.*{re.escape(folder)}.*encode\.flip_views: true.*re-run the encode stage.*train\.random_flip: false"


def prepared_rows(inputs: dict) -> pa.Table:
    """The first prepared train shard as the encode actor gets it (with each row's file path)."""
    manifest = read_manifest(inputs["prepared"])
    shard = storage.join(storage.version_folder(inputs["prepared"], manifest), manifest["splits"]["train"]["shards"][0])
    table = pq.read_table(shard)
    return table.append_column("path", pa.array([shard] * table.num_rows))


def stacked(table: pa.Table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_numpy(zero_copy_only=False))


def first_batches(latents: str, n: int, per_rank: int = 8, flip_prob: float = 0.0) -> list:
    """The training input's first ``n`` micro-batches of one worker (ray_jobs/latent_input.py)."""
    stats = read_stats(latents)
    units = scan_units(train_shards(latents, stats))
    stream = LatentStream(StreamPlan(tuple(u.rows for u in units), per_rank, 1, 0, 64, flip_prob), units,
                          stats["latent_shape"], 0)
    out = [b for _, b in zip(range(n), stream)]
    stream.close()
    return out


# ---------------------------------------------------------------------------------------------
# Encode: the stored views, stats.json, the fingerprint
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["posterior", "sample"])
def test_encode_actor_computes_only_the_stored_views(inputs, mode):
    """Without the flip view the actor writes no flip columns, and the image view is the same
    values (in sample mode the same seeded draw) as when the flip view is stored beside it."""
    table = prepared_rows(inputs)
    image_only = EncodeBatch(inputs["ae"], mode, seed=0, views=("image",))(table)
    both = EncodeBatch(inputs["ae"], mode, seed=0, views=("image", "flip"))(table)
    assert not FLIP_COLUMNS & set(image_only.column_names)
    assert FLIP_COLUMNS <= set(both.column_names)
    for column in ("mean", "std"):
        assert np.allclose(stacked(image_only, column), stacked(both, column), atol=1e-6)
    assert not np.allclose(stacked(both, "mean_flip"), stacked(both, "mean"), atol=1e-3)
    with pytest.raises(ValueError, match="'image'"):
        EncodeBatch(inputs["ae"], mode, seed=0, views=("flip",))


def test_fingerprint_tells_the_views_apart(inputs):
    fingerprint = lambda **o: latents_fingerprint("data", inputs["ae"], encode_config("p", "a", "o", encode_params(**o)))
    assert fingerprint(flip_views=False) != fingerprint(flip_views=True)
    assert fingerprint(flip_views=False, batch_size=3) == fingerprint(flip_views=False)  # batching still does not count
    assert encode_config("p", "a", "o", {}).flip_views is False  # the default matches train.random_flip's (false)


def test_encode_without_flip_views_on_ray_cluster(ray_cluster, inputs, tmp_path):
    """The job with flip_views false: no flip columns in any shard, stats.json says ["image"], its
    fingerprint is not the one of both views, and training reads these latents as they are."""
    out = str(tmp_path / "latents")
    stats = encode(encode_config(inputs["prepared"], inputs["ae_path"], out, encode_params(flip_views=False)))
    assert stats["views"] == ["image"] and storage.read_json(f"{out}/stats.json") == stats
    for split in ("train", "val"):
        for shard in stats["shards"][split]:
            assert not FLIP_COLUMNS & set(pq.read_schema(storage.join(storage.version_folder(out, stats), shard)).names), shard
    manifest = read_manifest(inputs["prepared"])
    fingerprint = lambda flip: latents_fingerprint(manifest["fingerprint"], inputs["ae"],
                                                   encode_config("p", "a", "o", encode_params(flip_views=flip)))
    assert stats["fingerprint"] == fingerprint(False) != fingerprint(True)

    # the train job's reader on the job's own output
    assert read_stats(out) == stats
    stored = stacked(read_latents(out, stats, "train"), "mean")
    for batch in first_batches(out, 3, per_rank=4):
        assert np.allclose(batch.mean.reshape(4, -1), stored[batch.rows])
    model_config(config_from(out, {"random_flip": False}), stats)
    with pytest.raises(ValueError, match=refusal(out)):
        model_config(config_from(out, {"random_flip": True}), stats)


# ---------------------------------------------------------------------------------------------
# Train: reads the stored views, refuses flips the latents cannot serve
# ---------------------------------------------------------------------------------------------

def test_image_only_latents_train_without_flips(tmp_path):
    """The worker's data path (read_stats, the stream without flips, noisy_latents) on latents with
    no flip columns gives the batches the same rows give with both views, and a DiT trains on them."""
    from dit_core.diffusion import make_objective
    from dit_core.models import DiT

    image_only, both = str(tmp_path / "image"), str(tmp_path / "both")
    write_synthetic_latents(image_only, n=32, num_classes=2, shape=SHAPE, views=("image",))
    write_synthetic_latents(both, n=32, num_classes=2, shape=SHAPE)
    assert not FLIP_COLUMNS & set(pq.read_schema(f"{image_only}/train/part-00000.parquet").names)

    stats = read_stats(image_only)
    assert stats["views"] == ["image"] and stats["fingerprint"] != read_stats(both)["fingerprint"]
    cfg = config_from(image_only, {"model": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}})
    assert cfg.random_flip is False
    (batch,), (reference,) = first_batches(image_only, 1), first_batches(both, 1)
    assert np.array_equal(batch.rows, reference.rows) and not batch.flips.any()
    x = noisy_latents(batch.mean, batch.std, float(stats["scale_factor"]), torch.Generator().manual_seed(1))
    x_ref = noisy_latents(reference.mean, reference.std, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    y = torch.from_numpy(batch.labels)
    assert np.array_equal(batch.labels, reference.labels) and x.shape == (8, *SHAPE)

    torch.manual_seed(0)
    model = DiT(model_config(cfg, stats))
    objective = make_objective(diffusion_settings(cfg))   # the default recipe's, as the train job builds it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t = objective.sample_t(x.shape[0], "cpu")
    loss = objective.losses(lambda xt, tt: model(xt, tt, y), x, t)["loss"].mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_random_flip_on_image_only_latents_is_refused_before_any_work(tmp_path, monkeypatch):
    """On the driver, before Ray starts or anything is written: the message names the setting, the
    folder and both fixes."""
    import ray_jobs.train as train_job

    latents = str(tmp_path / "latents")
    stats = write_synthetic_latents(latents, n=16, num_classes=2, shape=SHAPE, views=("image",))
    with pytest.raises(ValueError, match=refusal(latents)):
        model_config(config_from(latents, {"random_flip": True}), stats)

    def no_ray() -> None:
        raise AssertionError("Ray was started before the flip setting was checked")

    monkeypatch.setattr(train_job.runtime, "init_ray", no_ray)
    checkpoints = tmp_path / "checkpoints"
    cfg = config_from(latents, {"random_flip": True, "storage_path": str(checkpoints), "tracking": False})
    with pytest.raises(ValueError, match=refusal(latents)):
        train_job.train(cfg)
    assert not checkpoints.exists()


def test_latents_from_before_views_load_with_both_views(tmp_path):
    """stats.json without "views" (encode before flip_views) and all four columns: both views load,
    random_flip is accepted, and a flipped row reads the stored mirror."""
    latents = str(tmp_path / "latents")
    write_synthetic_latents(latents, n=16, num_classes=2, shape=SHAPE, views=None)
    assert "views" not in json.loads(Path(latents, "stats.json").read_text())

    stats = read_stats(latents)
    model_config(config_from(latents, {"random_flip": True}), stats)
    stored = pa.concat_tables(pq.read_table(f"{latents}/{f}") for f in stats["shards"]["train"])
    mean, mirror = stacked(stored, "mean").reshape(-1, *SHAPE), stacked(stored, "mean_flip").reshape(-1, *SHAPE)
    assert np.array_equal(mirror, mean[..., ::-1])
    (batch,) = first_batches(latents, 1, per_rank=4, flip_prob=1.0)
    assert batch.flips.all() and np.array_equal(batch.mean, mirror[batch.rows])


def test_noisy_latents_is_scale_times_a_posterior_draw():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((6, *SHAPE)).astype(np.float32)
    std = np.full_like(mean, 0.5)
    x = noisy_latents(mean, std, 2.0, torch.Generator().manual_seed(3))
    eps = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(3)).numpy()
    assert np.allclose(x.numpy(), 2.0 * (mean + std * eps), atol=1e-6)
    assert torch.equal(noisy_latents(mean, np.zeros_like(mean), 1.0, torch.Generator()), torch.from_numpy(mean))
