"""Atomic publishing (issue 14, point 4): SIGKILL each stage that publishes a folder while it writes,
locally and on the S3 server, then check that (a) the previous good output still reads whole and
unchanged, and (b) the next run removes what the killed one left and publishes.

The killed runs are subprocesses; the Ray stages connect to the session's test cluster (cheap)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import yaml

from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder, load_autoencoder
from dit_core.contract import AUTOENCODER_RECORD_FILE, LATENT_STATS_FILE, MANIFEST_FILE
from pipelines.common import read_manifest, read_split
from pipelines.prepare import PrepareConfig, prepare
from ray_jobs import storage
from tests.fixtures_data import IMAGE_SIZE, REPO, prepare_params, repo_params, stage_env
from tests.test_sample import sample_model  # noqa: F401,F811  (a fixture: a tiny checkpoint and its autoencoder)

KINDS = ["local", "s3"]


def where(kind: str, tmp_path: Path, request) -> str:
    """A folder that holds one test's outputs: local, or a prefix of a fresh bucket."""
    return str(tmp_path / "run") if kind == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/run"


def paths_under(root: str) -> set[str]:
    """Every file and folder under ``root`` (hidden staging siblings included)."""
    fs, path = storage.resolve(root)
    return {i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))}


def published(out: str, marker: str) -> dict[str, bytes]:
    """The published content of a folder output: each file of its current version, by name."""
    folder = storage.current(out, marker)
    return {f[len(folder) + 1:]: storage.read_bytes(f) for f in storage.list_files(folder)}


def leftovers(out: str, marker: str) -> list[str]:
    """What lies beside the published record and its version: should be nothing."""
    version = storage.read_json(storage.join(out, marker)).get(storage.VERSION_KEY)
    fs, path = storage.resolve(out)
    names = {i.path.rstrip("/").rsplit("/", 1)[-1] for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
    stale = sorted(names - {marker, version})
    if not storage.is_s3(out):
        stale += sorted(p.name for p in Path(out).parent.glob(f".{Path(out).name}.tmp-*"))
    return stale


def kill_while_writing(cmd: list[str], env: dict[str, str], watch: str, settle: float = 0.0, timeout: float = 180,
                       suffix: str | None = None) -> None:
    """Start ``cmd`` and SIGKILL it (its whole process group) once anything under ``watch`` appears
    or vanishes (with ``suffix``: once a new file of that suffix appears): the stage has begun
    writing its output. ``settle``: seconds to let it write on."""
    before = paths_under(watch)
    begun = (lambda now: now != before) if suffix is None else (lambda now: any(p.endswith(suffix) for p in now - before))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not begun(paths_under(watch)):
            if proc.poll() is not None:
                raise AssertionError(f"{' '.join(cmd)} ended ({proc.returncode}) before it wrote anything:\n"
                                     f"{proc.stderr.read().decode()[-3000:]}")
            assert time.time() < deadline, f"{' '.join(cmd)} wrote nothing under {watch} in {timeout} s"
            time.sleep(0.05)
        time.sleep(settle)
        assert proc.poll() is None, "the stage finished before it could be killed: make it slower"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def params_file(tmp_path: Path, **sections: dict) -> str:
    params = repo_params()
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    path = tmp_path / f"params-{len(list(tmp_path.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def split_keys(prepared: str) -> list[str]:
    return read_split(prepared, read_manifest(prepared), "train", ["key"]).column("key").to_pylist()


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("atomic") / "prepared")
    prepare(PrepareConfig.from_params(prepare_params(rows_per_shard=200)), out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def prepared_small(prepared_digits, tmp_path_factory) -> str:
    """64 training and 16 validation digits: enough for the Ray stages to run a few blocks."""
    from pipelines.common import write_parquet

    out = str(tmp_path_factory.mktemp("atomic") / "prepared-small")
    manifest = read_manifest(prepared_digits)
    staging = storage.begin_output(out, MANIFEST_FILE)
    for split, rows in (("train", 64), ("val", 16)):
        table = read_split(prepared_digits, manifest, split).slice(0, rows)
        write_parquet(storage.join(staging, split, "part-00000.parquet"), table)
        labels = table.column("label").to_pylist()
        manifest["splits"][split] = {"count": rows, "shards": [f"{split}/part-00000.parquet"],
                                     "per_class": {str(k): labels.count(k) for k in sorted(set(labels))}}
    manifest.pop(storage.VERSION_KEY)
    storage.write_json(storage.join(staging, MANIFEST_FILE), {**manifest, "fingerprint": "small-" + manifest["fingerprint"]})
    storage.commit_output(staging, out, MANIFEST_FILE)
    return out


def tiny_autoencoder(seed: int) -> Autoencoder:
    p = repo_params()["train_autoencoder"]
    cfg = SmallAutoencoderConfig(p["latent_channels"], tuple(p["block_channels"]), p["layers_per_block"], p["norm_num_groups"])
    torch.manual_seed(seed)
    return Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE),
                       AutoencoderRecord(f"tiny-{seed}", 0.5, cfg.latent_channels, cfg.downsample, IMAGE_SIZE))


# ---------------------------------------------------------------------------------------------
# prepare (no Ray for the digits)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_killed_prepare_keeps_the_previous_output(kind, tmp_path, request):
    root = where(kind, tmp_path, request)
    out = storage.join(root, "prepared")
    good = prepare(PrepareConfig.from_params(prepare_params(rows_per_shard=200)), out, log=lambda _: None)
    before, keys = published(out, MANIFEST_FILE), split_keys(out)

    # other content, in 900 shards: the kill lands after the first shard and well before the
    # manifest (a fixed delay raced with the whole digits prepare, which can take under 0.5 s)
    slow = params_file(tmp_path, prepare={"seed": 1, "rows_per_shard": 2})
    kill_while_writing([sys.executable, "-m", "pipelines.prepare", "--out", out, "--params", slow], stage_env(), root,
                       suffix=".parquet")
    assert read_manifest(out) == good and published(out, MANIFEST_FILE) == before    # (a) whole and unchanged
    assert split_keys(out) == keys

    again = prepare(PrepareConfig.from_params(prepare_params(seed=1, rows_per_shard=200)), out, log=lambda _: None)
    assert leftovers(out, MANIFEST_FILE) == []                                       # (b) cleaned and published
    assert read_manifest(out) == again and again["fingerprint"] != good["fingerprint"]
    assert len(split_keys(out)) == again["splits"]["train"]["count"]


# ---------------------------------------------------------------------------------------------
# train_autoencoder
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_killed_train_autoencoder_keeps_the_previous_output(kind, prepared_digits, tmp_path, request):
    from pipelines.train_autoencoder import main
    from tests.fixtures_latents import publish_autoencoder as publish

    root = where(kind, tmp_path, request)
    out = storage.join(root, "autoencoder")
    publish(tiny_autoencoder(0), out)
    before = published(out, AUTOENCODER_RECORD_FILE)

    slow = params_file(tmp_path, train_autoencoder={"steps": 100000, "batch_size": 16, "max_images": 64})
    kill_while_writing([sys.executable, "-m", "pipelines.train_autoencoder", "--prepared", prepared_digits, "--out", out,
                        "--params", slow], stage_env(), root, settle=1.0)
    assert published(out, AUTOENCODER_RECORD_FILE) == before                         # (a)
    with storage.local_copy(out, AUTOENCODER_RECORD_FILE) as folder:
        assert load_autoencoder(folder).id == "tiny-0"

    quick = params_file(tmp_path, train_autoencoder={"steps": 2, "batch_size": 16, "max_images": 64, "eval_max_images": 32})
    main(["--prepared", prepared_digits, "--out", out, "--params", quick])
    assert leftovers(out, AUTOENCODER_RECORD_FILE) == []                             # (b)
    with storage.local_copy(out, AUTOENCODER_RECORD_FILE) as folder:
        assert load_autoencoder(folder).id == "small-kl-f2c4"


# ---------------------------------------------------------------------------------------------
# encode (Ray: the killed run connects to the test cluster)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_killed_encode_keeps_the_previous_output(kind, ray_cluster, prepared_small, tmp_path, request):
    from tests.fixtures_latents import publish_autoencoder as publish
    from ray_jobs.encode import config_from, encode
    from ray_jobs.train import read_stats, train_shards

    root = where(kind, tmp_path, request)
    out, ae_a, ae_b = (storage.join(root, n) for n in ("latents", "ae-a", "ae-b"))
    publish(tiny_autoencoder(0), ae_a)
    publish(tiny_autoencoder(1), ae_b)
    params = {**repo_params()["encode"], "batch_size": 16, "cpu_actors": 1}
    good = encode(config_from(prepared_small, ae_a, out, params))
    before = published(out, LATENT_STATS_FILE)

    env = {**stage_env(), "RAY_ADDRESS": ray_cluster.address}
    kill_while_writing([sys.executable, "-m", "ray_jobs.encode", "--prepared", prepared_small, "--autoencoder", ae_b,
                        "--out", out, "--set", "batch_size=4", "cpu_actors=1"], env, root, settle=0.5)
    time.sleep(2)  # the cluster reaps the dead driver's actors
    assert read_stats(out) == good and published(out, LATENT_STATS_FILE) == before   # (a)
    assert len(train_shards(out, good)) == len(good["shards"]["train"])

    again = encode(config_from(prepared_small, ae_b, out, params))
    assert leftovers(out, LATENT_STATS_FILE) == []                                   # (b)
    assert read_stats(out) == again and again["autoencoder_id"] == "tiny-1"
    assert again["counts"] == good["counts"] and again["fingerprint"] != good["fingerprint"]


# ---------------------------------------------------------------------------------------------
# sample: per-shard files, resumed (never versions): no shard is ever visible half-written
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["s3"])   # locally: test_sample.py::test_killed_job_resumes_to_the_same_files
def test_killed_sample_shows_only_whole_shards_and_resumes(kind, ray_cluster, sample_model, tmp_path, request):
    from ray_jobs.sample import missing_shards, read_images, read_shard, run
    from tests.test_sample import config, kill_once_a_shard_exists, sample_cli

    root = where(kind, tmp_path, request)
    cfg = config(sample_model, storage.join(root, "samples"), num_images=10,
                 images_per_shard=2, num_steps=20, num_actors=1, formats=["parquet", "npz"])
    env = {**stage_env(), "RAY_ADDRESS": ray_cluster.address}
    parquet = storage.join(cfg.output, "parquet")
    kill_once_a_shard_exists(sample_cli(cfg), env, parquet)
    time.sleep(2)  # the cluster reaps the dead driver's actors
    left = missing_shards(cfg)
    assert 0 < len(left) < 5, f"the kill came too late: {len(left)} of 5 shards missing"
    before = {}
    for shard in sorted(set(range(5)) - set(left)):                                 # (a) every visible shard whole
        index, _, images = read_shard(cfg.output, shard)
        np.testing.assert_array_equal(index, np.arange(2 * shard, 2 * shard + 2))
        before[shard] = storage.read_bytes(storage.join(parquet, f"shard-{shard:06d}.parquet"))
    assert not storage.exists(storage.join(cfg.output, "samples.npz"))

    summary = run(cfg, progress=False)
    assert summary["shards_generated_now"] == len(left) and missing_shards(cfg) == []   # (b) resumed
    assert not [f for f in storage.list_files(cfg.output) if ".tmp-" in f]
    for shard, data in before.items():  # the shards written before the kill were kept, not redone
        assert storage.read_bytes(storage.join(parquet, f"shard-{shard:06d}.parquet")) == data
    images, labels = read_images(cfg.output, cfg.num_images)
    assert images.shape[0] == 10 and labels.shape == (10,)
