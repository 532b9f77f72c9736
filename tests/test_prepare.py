"""The prepare stage and the image helpers: modes, ADM centre crop, bad input, the three sources,
the skip threshold, atomic output, S3 in and out against the session's moto server, and the Ray
Data reader against what the earlier thread-pool reader produced."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dit_core.data import BACKGROUND, BadImage, center_crop, prepare_image, to_rgb
from pipelines.common import read_manifest, read_split
from pipelines.prepare import PrepareConfig, _reason_kind, assign_splits, list_imagefolder, prepare
from ray_jobs import storage
from tests.fixtures_data import IMAGE_SIZE, encode_image, planted_folder, prepare_params, random_rgb


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def read_shards(out: str, manifest: dict, split: str) -> pa.Table:
    folder = storage.version_folder(out, manifest)   # the published version the manifest names
    return pa.concat_tables(pq.read_table(storage.resolve(storage.join(folder, s))[1], filesystem=storage.resolve(out)[0])
                            for s in manifest["splits"][split]["shards"])


def content(manifest: dict) -> dict:
    """A manifest without the name of its version folder (fresh on every run)."""
    return {k: v for k, v in manifest.items() if k != storage.VERSION_KEY}


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module", autouse=True)
def one_ray_start():
    """The imagefolder and parquet tests share the Ray runtime the first of them starts (through
    prepare's own init_ray); it stops with this module unless it was running before."""
    import ray

    running = ray.is_initialized()
    yield
    if not running and ray.is_initialized():
        ray.shutdown()


# What the thread-pool reader (before prepare ran on Ray Data) wrote for planted_folder() with the
# test params (rows_per_shard 1000): the reader on Ray Data must give the same, whatever its number
# of workers. (Memory addresses in exception texts, "<_io.BytesIO object at 0x...>", are dropped.)
UNDECODABLE = "not a decodable image (UnidentifiedImageError: cannot identify image file <_io.BytesIO object>)"
THREAD_POOL_PLANTED = {
    "num_inputs": 35,
    "splits": {"train": {"count": 24, "per_class": {"0": 12, "1": 12}, "shards": ["train/part-00000.parquet"]},
               "val": {"count": 4, "per_class": {"0": 2, "1": 2}, "shards": ["val/part-00000.parquet"]}},
    "skipped": [
        {"key": "README.txt", "reason": "file is not inside a class folder"},
        {"key": "bird/", "reason": "empty class folder"},
        {"key": "dog/empty.jpg", "reason": "empty file"},
        {"key": "dog/tiny.png", "reason": "smaller than image_size (8x8 < 16)"},
        {"key": "cat/truncated.png", "reason": "not a decodable image (OSError: image file is truncated)"},
        {"key": "dog/notes.txt", "reason": UNDECODABLE},
        {"key": "cat/corrupt.png", "reason": UNDECODABLE},
    ],
    "skipped_reasons": {"file is not inside a class folder": 1, "empty class folder": 1, "empty file": 1,
                        "smaller than image_size": 1, "not a decodable image": 3},
    "converted": {"count": 4, "by_reason": {"RGBA composited on white": 1, "I;16 to RGB": 1, "L to RGB": 1,
                                            "P to RGB": 1}},
    "fingerprint": "0c9bc0b50e4f608d2cc68a11b435dc939b8d4ed984c25f3f537c53f2962f1b23",
}
THREAD_POOL_DIGITS = "425db8f8ba06a311563609e8ec475ac0a36ab5542df161288c920b8b1db820f0"  # default params
THREAD_POOL_PARQUET = "a87cb9e8bdd3c1b5385dd4c777d8865dd3cf3e49584bcfcc0dfe5efc391718c1"  # test_parquet_source


def recorded_part(manifest: dict) -> dict:
    return {k: manifest[k] for k in THREAD_POOL_PLANTED}


# ---------------------------------------------------------------------------------------------
# Helpers in dit_core.data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,note", [
    ("RGB", None), ("L", "L to RGB"), ("P", "P to RGB"), ("RGBA", "RGBA composited on white"),
    ("I;16", "I;16 to RGB"), ("CMYK", "CMYK to RGB"),
])
def test_every_mode_becomes_an_rgb_square(mode, note):
    rgb = random_rgb(np.random.default_rng(0), 30, 20)
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 30), 65535, np.uint16))
    else:
        img = rgb.convert(mode)
    png, got = prepare_image(encode_image(img, "TIFF" if mode == "CMYK" else "PNG"), IMAGE_SIZE)
    out = decode_png(png)
    assert (out.mode, out.size, got) == ("RGB", (IMAGE_SIZE, IMAGE_SIZE), note)
    if mode == "I;16":  # full-scale 16-bit white stays white instead of clipping/overflowing
        assert np.asarray(out).min() == 255


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (255, 0, 0, 0))  # fully transparent red
    png, _ = prepare_image(encode_image(img), IMAGE_SIZE)
    assert np.all(np.asarray(decode_png(png)) == 255)


def _halves(png: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The centre pixel of the left and of the right half of a prepared IMAGE_SIZE square."""
    arr = np.asarray(decode_png(png)).astype(int)
    mid = IMAGE_SIZE // 2
    return arr[mid, IMAGE_SIZE // 4], arr[mid, 3 * IMAGE_SIZE // 4]


def test_transparent_png_shows_the_background_and_blends_semi_transparent_pixels():
    # left half fully transparent over black (what convert("RGB") would show), right half red at
    # alpha 128: a viewer shows the background on the left and pink on the right
    arr = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 4), np.uint8)
    arr[:, IMAGE_SIZE // 2:] = (255, 0, 0, 128)
    png, note = prepare_image(encode_image(Image.fromarray(arr, "RGBA")), IMAGE_SIZE)
    left, right = _halves(png)
    a = 128 / 255
    blend = np.round(np.array([255, 0, 0]) * a + np.array(BACKGROUND) * (1 - a))
    assert note == "RGBA composited on white"
    assert left.tolist() == list(BACKGROUND)
    assert np.abs(right - blend).max() <= 1


@pytest.mark.parametrize("mode", ["LA", "P", "RGB", "L"])
def test_every_kind_of_png_transparency_shows_the_background(mode):
    # LA: an alpha channel; P: a transparent palette entry; RGB and L: a tRNS colour key (black),
    # which PIL's convert("RGB") ignores, so the keyed black would show
    arr = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    arr[:, IMAGE_SIZE // 2:] = 200
    if mode == "LA":
        img, extra = Image.fromarray(np.stack([arr, (arr > 0).astype(np.uint8) * 255], -1), "LA"), {}
    elif mode == "P":
        img = Image.fromarray(arr, "L").convert("P")
        extra = {"transparency": 0}
    elif mode == "RGB":
        img, extra = Image.fromarray(np.stack([arr] * 3, -1), "RGB"), {"transparency": (0, 0, 0)}
    else:
        img, extra = Image.fromarray(arr, "L"), {"transparency": 0}
    buf = io.BytesIO()
    img.save(buf, format="PNG", **extra)
    png, note = prepare_image(buf.getvalue(), IMAGE_SIZE)
    left, right = _halves(png)
    assert note == f"{mode} composited on white"
    assert left.tolist() == list(BACKGROUND)
    assert right.tolist() == [200, 200, 200]


def test_background_colour_is_a_parameter():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out, note = to_rgb(img, background=(10, 20, 30))
    assert np.asarray(out)[0, 0].tolist() == [10, 20, 30]
    assert note == "RGBA composited on background (10, 20, 30)"


def test_centre_crop_keeps_the_middle_square():
    # a wide image: blue margins, a red centre square; ADM keeps the centre, drops the margins
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[..., 2] = 255
    arr[:, 64:128] = (255, 0, 0)
    out = np.asarray(center_crop(Image.fromarray(arr), IMAGE_SIZE)).astype(int)
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(out - [255, 0, 0]).max() <= 2


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"GIF89a not really", "not a decodable image"),
    (encode_image(Image.new("RGB", (40, 40)))[:60], "not a decodable image"),  # truncated
    (encode_image(Image.new("RGB", (8, 40))), "smaller than image_size"),
])
def test_bad_bytes_raise_bad_image_with_reason(data, reason):
    with pytest.raises(BadImage) as e:
        prepare_image(data, IMAGE_SIZE)
    assert e.value.reason.startswith(reason)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def test_digits_default(tmp_path):
    cfg = PrepareConfig.from_params(prepare_params())
    out = str(tmp_path / "prepared")
    manifest = prepare(cfg, out)
    assert manifest["fingerprint"] == THREAD_POOL_DIGITS
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["count"] + val["count"] == 1797 and manifest["num_classes"] == 10
    assert val["count"] == pytest.approx(1797 * cfg.val_fraction, abs=10)
    assert all(val["per_class"][str(c)] > 0 for c in range(10))  # stratified
    assert manifest["skipped"] == []
    table = read_shards(out, manifest, "train")
    assert table.schema.field("label").type == pa.int32() and table.num_rows == train["count"]
    assert dict(Counter(table.column("label").to_pylist())) == {int(k): v for k, v in train["per_class"].items()}
    img = decode_png(table.column("image")[0].as_py())
    assert (img.mode, img.size) == ("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # 8x8 upsampled by design
    keys = set(table.column("key").to_pylist()) | set(read_shards(out, manifest, "val").column("key").to_pylist())
    assert len(keys) == 1797  # every digit exactly once across the splits
    # same params -> same content; another seed -> another split
    assert prepare(cfg, str(tmp_path / "again"))["fingerprint"] == manifest["fingerprint"]
    other = PrepareConfig.from_params(prepare_params(seed=cfg.seed + 1))
    assert prepare(other, str(tmp_path / "other"))["fingerprint"] != manifest["fingerprint"]


def test_imagefolder_with_planted_bad_files(tmp_path):
    planted = planted_folder()
    root = planted.write_local(tmp_path / "images")
    cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(root), max_skipped_fraction=0.5))
    out = str(tmp_path / "prepared")
    manifest = prepare(cfg, out)
    assert manifest["class_names"] == ["cat", "dog"]  # the empty "bird" folder is no class
    assert manifest["skipped_reasons"] == planted.skipped_reasons
    assert len(manifest["skipped"]) == planted.num_skipped
    assert {s["key"] for s in manifest["skipped"]} >= {"cat/corrupt.png", "dog/empty.jpg", "bird/", "README.txt"}
    assert manifest["converted"]["by_reason"] == planted.converted
    assert manifest["num_inputs"] == planted.num_inputs
    per_class = Counter()
    for split in ("train", "val"):
        for k, v in manifest["splits"][split]["per_class"].items():
            per_class[manifest["class_names"][int(k)]] += v
    assert dict(per_class) == planted.good
    assert recorded_part(manifest) == THREAD_POOL_PLANTED
    assert no_leftovers(tmp_path)


def test_ray_workers_give_the_same_manifest_and_shards(tmp_path):
    """1 and 2 Ray workers, several shards each: the same manifest (counts, reasons, shards,
    fingerprint) and the same shard files, and the thread-pool reader's accounting and fingerprint."""
    root = planted_folder().write_local(tmp_path / "images")
    runs = {}
    for workers in (1, 2):
        cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(root), max_skipped_fraction=0.5,
                                                       rows_per_shard=4, num_workers=workers))
        out = tmp_path / f"prepared-{workers}"
        manifest = prepare(cfg, str(out))
        shards = {s: pq.read_table(storage.join(storage.version_folder(out, manifest), s)).to_pydict() for split in ("train", "val")
                  for s in manifest["splits"][split]["shards"]}
        runs[workers] = content(manifest), shards
    (one, one_shards), (two, two_shards) = runs[1], runs[2]
    assert one == two and one_shards == two_shards
    assert len(one["splits"]["train"]["shards"]) == 8  # 29 listed train inputs (5 of them unusable), 4 a shard
    assert all(len(t["key"]) <= 4 for t in one_shards.values())
    assert sum(len(t["key"]) for t in one_shards.values()) == 28
    expected = {k: v for k, v in THREAD_POOL_PLANTED.items() if k != "splits"}
    assert {k: one[k] for k in expected} == expected  # the fingerprint does not depend on shard sizes
    assert {s: {k: v for k, v in one["splits"][s].items() if k != "shards"} for s in ("train", "val")} == \
        {s: {k: v for k, v in THREAD_POOL_PLANTED["splits"][s].items() if k != "shards"} for s in ("train", "val")}


def test_split_assignment_is_stratified_and_seeded():
    from pipelines.prepare import Item

    items = [Item(f"c{c}/{i:03d}", c, "") for c in range(3) for i in range(50 * (c + 1))]
    splits = assign_splits(items, 0.2, seed=7)
    assert splits == assign_splits(list(reversed(items)), 0.2, seed=7)  # independent of the listing order
    assert splits != assign_splits(items, 0.2, seed=8)
    val = Counter(it.label for it in items if splits[it.key] == "val")
    assert val == {0: 10, 1: 20, 2: 30}


def test_too_many_skipped_fails_and_leaves_nothing(tmp_path):
    planted = planted_folder()
    root = planted.write_local(tmp_path / "images")
    cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(root)))  # default 1%
    with pytest.raises(RuntimeError, match="max_skipped_fraction") as e:
        prepare(cfg, str(tmp_path / "prepared"))
    assert "cat/corrupt.png" in str(e.value) or "README.txt" in str(e.value)
    assert not (tmp_path / "prepared").exists()
    assert no_leftovers(tmp_path)


def test_failed_rerun_keeps_no_half_output(tmp_path):
    """A run that fails after an earlier success must not leave a folder that mixes the two."""
    planted = planted_folder()
    root = planted.write_local(tmp_path / "images")
    out = tmp_path / "prepared"
    prepare(PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(root), max_skipped_fraction=0.5)), str(out))
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError):
        prepare(PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(root))), str(out))
    assert (out / "manifest.json").read_bytes() == before  # the old, complete output is untouched
    assert no_leftovers(tmp_path)


def test_parquet_source(tmp_path):
    rng = np.random.default_rng(1)
    big = IMAGE_SIZE + 4
    images = [{"bytes": encode_image(random_rgb(rng, big, big)), "path": None} for _ in range(20)]
    images[3] = {"bytes": None, "path": None}  # a missing image
    labels = ["zebra" if i % 2 else "ant" for i in range(20)]
    labels[5] = None  # a missing label
    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(2):  # two files, as a Hugging Face dataset export would have
        sl = slice(part * 10, part * 10 + 10)
        pq.write_table(pa.table({"img": images[sl], "class": labels[sl]}), folder / f"data-{part}.parquet",
                       row_group_size=3)  # workers read only the row groups of their rows
    cfg = PrepareConfig.from_params(prepare_params(
        source="parquet", path=str(folder), image_column="img", label_column="class", max_skipped_fraction=0.2,
        rows_per_shard=5))
    out = str(tmp_path / "prepared")
    manifest = prepare(cfg, out)
    assert manifest["fingerprint"] == THREAD_POOL_PARQUET
    assert manifest["class_names"] == ["ant", "zebra"]
    assert manifest["skipped_reasons"] == {"empty file": 1, "missing label": 1}
    assert {s["key"] for s in manifest["skipped"]} == {"data-0.parquet#3", "data-0.parquet#5"}
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 18
    table = read_shards(out, manifest, "train")
    assert set(table.column("label").to_pylist()) <= {0, 1}


def test_parquet_source_missing_column_names_it(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), tmp_path / "d.parquet")
    cfg = PrepareConfig.from_params(prepare_params(source="parquet", path=str(tmp_path / "d.parquet")))
    with pytest.raises(ValueError, match=r"no column 'image'.*image_column"):
        prepare(cfg, str(tmp_path / "prepared"))


@pytest.mark.parametrize("layout,says", [
    ("missing", "does not exist"),
    ("empty", "has nothing in it"),
    ("flat", "2 files directly under it and no class folder"),
    ("empty_classes", "only empty class folders (a, b)"),
    ("file", "is a file"),
])
def test_path_without_class_folders_is_refused_before_work(tmp_path, layout, says):
    root = tmp_path / "images"
    if layout == "flat":
        root.mkdir()
        (root / "a.png").write_bytes(encode_image(Image.new("RGB", (20, 20))))
        (root / "b.png").write_bytes(encode_image(Image.new("RGB", (20, 20))))
    elif layout == "empty":
        root.mkdir()
    elif layout == "empty_classes":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    elif layout == "file":
        root.write_bytes(b"x")
    cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(root)))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        prepare(cfg, str(tmp_path / "prepared"))
    message = str(e.value)
    assert f"prepare.path={root}" in message and says in message
    assert "<class name>" in message  # the layout it expects: the fix
    assert not (tmp_path / "prepared").exists() and no_leftovers(tmp_path)


def test_missing_s3_prefix_is_refused_before_work(s3_bucket, tmp_path):
    cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path=f"s3://{s3_bucket}/no/such/prefix"))
    with pytest.raises(FileNotFoundError, match=rf"prepare.path=s3://{s3_bucket}/no/such/prefix does not exist"):
        list_imagefolder(cfg.path)
    with pytest.raises(FileNotFoundError):
        prepare(cfg, str(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="prepare.source"):
        PrepareConfig.from_params(prepare_params(source="flickr"))
    with pytest.raises(ValueError, match="prepare.path"):
        PrepareConfig.from_params(prepare_params(source="imagefolder", path=None))
    with pytest.raises(ValueError, match="imagesize"):
        PrepareConfig.from_params(prepare_params(imagesize=32))
    with pytest.raises(ValueError, match="prepare.num_workers"):
        PrepareConfig.from_params(prepare_params(num_workers=0))


def test_reason_kind_strips_details():
    assert _reason_kind("not a decodable image (OSError: x, y)") == "not a decodable image"


# ---------------------------------------------------------------------------------------------
# S3 (moto_server on 127.0.0.1)
# ---------------------------------------------------------------------------------------------

def test_s3_imagefolder_to_s3(s3_bucket, tmp_path):
    planted = planted_folder(per_class=6)
    src = planted.write_s3(f"s3://{s3_bucket}/raw/images")
    out = f"s3://{s3_bucket}/prepared"
    cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path=src, max_skipped_fraction=0.5))
    manifest = prepare(cfg, out)
    assert manifest["skipped_reasons"] == planted.skipped_reasons
    assert manifest["converted"]["by_reason"] == planted.converted
    assert storage.read_json(f"{out}/manifest.json")["fingerprint"] == manifest["fingerprint"]
    table = read_shards(out, manifest, "train")
    assert table.num_rows == manifest["splits"]["train"]["count"]
    # the same source prepared locally gives the same content
    local = planted.write_local(tmp_path / "images")
    cfg_local = PrepareConfig.from_params(prepare_params(source="imagefolder", path=str(local), max_skipped_fraction=0.5))
    assert prepare(cfg_local, str(tmp_path / "prepared"))["fingerprint"] == manifest["fingerprint"]


def test_unreadable_bucket_is_a_clear_error(s3_server, tmp_path):
    cfg = PrepareConfig.from_params(prepare_params(source="imagefolder", path="s3://no-such-bucket-here/images"))
    with pytest.raises((PermissionError, FileNotFoundError), match="no-such-bucket-here"):
        prepare(cfg, str(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    """SIGKILL the stage once it has written shards: no manifest anywhere, so nothing reads as
    prepared data; the next run removes the killed run's version folder."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.fixtures_data import REPO, repo_params, stage_env

    params = repo_params()
    params["prepare"]["rows_per_shard"] = 10  # many small shards: a long window with partial output
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.prepare", "--out", str(out), "--params",
                             str(tmp_path / "params.yaml")], cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("v-*/train/*.parquet")):
            assert proc.poll() is None, "prepare finished before it could be killed"
            assert time.time() < deadline, "prepare wrote no shard in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not list(tmp_path.rglob("manifest.json"))
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        read_manifest(str(out))
    leftover = [p.name for p in out.glob("v-*")]
    assert leftover
    subprocess.run([sys.executable, "-m", "pipelines.prepare", "--out", str(out), "--params", str(tmp_path / "params.yaml")],
                   cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL, check=True)
    manifest = read_manifest(str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", manifest["version"]])
    assert read_split(str(out), manifest, "train").num_rows == manifest["splits"]["train"]["count"]


@pytest.mark.timeout(300)
def test_stage_command_reads_an_imagefolder_with_ray_workers(tmp_path):
    """`python -m pipelines.prepare` as `dvc repro` runs it, on an imagefolder, with its own local
    Ray: the shard tasks must reach the workers by module. Defined in the script's __main__ they
    were pickled by value and failed to unpickle there ("Can't get attribute ... on __main__")."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.fixtures_data import REPO, stage_env

    root = planted_folder().write_local(tmp_path / "images")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": prepare_params(source="imagefolder", path=str(root), max_skipped_fraction=0.5)}))
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "pipelines.prepare", "--out", str(out), "--params", str(params)],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog"] and recorded_part(manifest) == THREAD_POOL_PLANTED


@pytest.mark.parametrize("source, path, name", [
    ("digits", None, "digits"),
    ("imagefolder", "/data/images/flowers", "flowers"),
    ("imagefolder", "s3://bucket/sets/Flowers 102/", "flowers-102"),
    ("parquet", "s3://bucket/pets.parquet", "pets"),
])
def test_the_data_sets_name_follows_its_source(source, path, name):
    """The name the registered model's default follows (dit-<name>)."""
    from pipelines.prepare import PrepareConfig, dataset_name
    from ray_jobs.train_config import TrainConfig, registered_name

    assert dataset_name(PrepareConfig(source=source, path=path)) == name
    assert registered_name(TrainConfig(latents="x"), {"dataset": name}) == f"dit-{name}"
    assert registered_name(TrainConfig(latents="x", registered_model="mine"), {"dataset": name}) == "mine"
