"""The image sets benchmarks/image_sets.py makes (no pipeline run): folder layout, class counts,
image modes and sizes, determinism for a seed; and the harness's colour report and grids on
parquet shards laid out as a run writes them."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks import image_sets
from benchmarks.image_sets import SETS, make_set, scaled_counts
from dit_core.data import png_bytes, prepare_image
from dit_core.contract import VERSION_KEY

NEW_SETS = {  # name: (class folders, images per class, PIL mode, format)
    "shapes-dark": (("circle", "square", "triangle"), (300, 300, 300), "RGB", "JPEG"),
    "badges": (("arrow", "plus", "ring", "star"), (200, 200, 200, 200), "RGB", "JPEG"),
    "scenes": (("field", "houses", "lake", "trees"), (200, 200, 200, 200), "RGB", "JPEG"),
    "icons": (("envelope", "heart", "home", "magnifier", "sun"), (120,) * 5, "RGBA", "PNG"),
    "unbalanced": (("circle", "square", "triangle"), (600, 180, 60), "RGB", "JPEG"),
}
SMALL = 60  # images per set in the layout tests (ratios kept), so the test stays fast


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_registry_holds_the_full_sizes():
    for name, (names, counts, _, _) in NEW_SETS.items():
        spec = SETS[name]
        assert (tuple(sorted(spec.names)), spec.images) == (names, sum(counts)), name
        assert dict(zip(spec.names, spec.counts)) == dict(zip(names, counts)), name
    assert max(SETS["unbalanced"].counts) == 10 * min(SETS["unbalanced"].counts)


@pytest.mark.parametrize("name", list(NEW_SETS))
def test_set_layout_counts_modes_and_sizes(name, tmp_path):
    names, counts, mode, fmt = NEW_SETS[name]
    folder = make_set(name, tmp_path, seed=0, max_images=SMALL)
    assert folder == tmp_path / name
    assert sorted(p.name for p in folder.iterdir()) == list(names)
    want = dict(zip(SETS[name].names, scaled_counts(SETS[name].counts, SMALL)))
    got = {d.name: len(list(d.iterdir())) for d in folder.iterdir()}
    assert got == want
    for path in folder.rglob("*.*"):
        with Image.open(path) as img:
            assert (img.format, img.mode) == (fmt, mode), path
            assert min(img.size) >= 40 and max(img.size) <= 96, (path, img.size)   # every image survives image_size 32


def test_unbalanced_keeps_its_ten_to_one_ratio_when_cut(tmp_path):
    folder = make_set("unbalanced", tmp_path, max_images=220)
    got = {d.name: len(list(d.iterdir())) for d in folder.iterdir()}
    assert got == {"circle": 157, "square": 47, "triangle": 16}
    assert got["circle"] / got["triangle"] == pytest.approx(10, rel=0.05)


def test_scaled_counts_refuses_fewer_images_than_classes():
    with pytest.raises(ValueError, match="max_images=2 is below the 3 classes"):
        scaled_counts((10, 10, 10), 2)


@pytest.mark.parametrize("name", list(NEW_SETS))
def test_same_seed_same_files_other_seed_other_files(name, tmp_path):
    a = _digest(make_set(name, tmp_path / "a", seed=3, max_images=20))
    b = _digest(make_set(name, tmp_path / "b", seed=3, max_images=20))
    c = _digest(make_set(name, tmp_path / "c", seed=4, max_images=20))
    assert a == b
    assert a != c


def test_unknown_set_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown image set 'shapez'; choose from shapes, "):
        make_set("shapez", tmp_path)


def test_icons_are_transparent_around_the_ink_and_prepare_puts_them_on_white(tmp_path):
    folder = make_set("icons", tmp_path, max_images=10)
    for path in sorted(folder.rglob("*.png")):
        rgba = np.asarray(Image.open(path))
        alpha = rgba[..., 3]
        assert alpha[0, 0] == 0 and (alpha == 0).mean() > 0.5          # mostly transparent ...
        assert (alpha == 255).any() and ((alpha > 0) & (alpha < 255)).any()   # ... ink, and smooth edges
        assert rgba[alpha == 0][:, :3].max() == 0                     # black under the transparency
        png, note = prepare_image(path.read_bytes(), 32)
        out = np.asarray(Image.open(io.BytesIO(png)))
        assert note == "RGBA composited on white"
        assert out[0, 0].tolist() == [255, 255, 255]                  # a corner: background, not black
        assert (out.min(axis=2) > 250).mean() > 0.4


def test_dark_shapes_are_light_on_dark(tmp_path):
    folder = make_set("shapes-dark", tmp_path, max_images=30)
    for path in sorted(folder.rglob("*.jpg")):
        arr = np.asarray(Image.open(path), np.float32)
        corner, centre_lum = arr[:3, :3].mean(), arr.max(axis=2).max()
        assert corner < 130 and centre_lum > 200, path


def _write_shards(folder: Path, images: np.ndarray, labels: np.ndarray, per_shard: int) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for k, start in enumerate(range(0, len(images), per_shard)):
        part = slice(start, start + per_shard)
        pq.write_table(pa.table({"image": [png_bytes(x) for x in images[part]], "label": labels[part].tolist()}),
                       folder / f"part-{k:05d}.parquet")
        names.append(f"part-{k:05d}.parquet")
    return names


def _write_prepared_val(prepared: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The prepare stage's layout: manifest.json naming its version folder and each split's shards."""
    names = _write_shards(prepared / "v-7" / "val", images, labels, per_shard=7)
    (prepared / "manifest.json").write_text(json.dumps({VERSION_KEY: "v-7", "splits": {"val": {"shards": [f"val/{n}" for n in names]}}}))


def test_what_a_person_sees_reports_colour_ratios_and_writes_aligned_grids(tmp_path, monkeypatch):
    # real: saturated red squares; samples: the same squares at half the saturation
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    real = np.zeros((30, 8, 8, 3), np.uint8)
    real[..., 0] = 255
    real[:, 2:6, 2:6] = rng.integers(0, 256, (30, 1, 1, 3))
    real[:, 2:6, 2:6, 0] = 255
    samples = real.copy()
    samples[..., 1:] = 128 + real[..., 1:] // 2      # half way to grey: half the saturation of the red
    work = tmp_path / "project"
    _write_prepared_val(work / image_sets.PREPARED, real, labels)
    _write_shards(work / image_sets.SAMPLE_SHARDS, samples, labels[::-1].copy(), per_shard=11)
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "results"))
    seen = image_sets.what_a_person_sees(work, "toy", "t")
    assert seen["grid_classes"] == [0, 1, 2]
    assert seen["colour_ratio_samples"]["saturation"] == pytest.approx(
        seen["colour_samples"]["saturation"] / seen["colour_real"]["saturation"])
    assert 0.3 < seen["colour_ratio_samples"]["saturation_dark"] < 0.7
    grids = {k: np.asarray(Image.open(v)) for k, v in seen["grids"].items()}
    assert Path(seen["grids"]["real"]).name == "toy-t-real.png"
    side = image_sets.GRID_SCALE
    want = (side * (3 * 9 + 1), side * (image_sets.GRID_PER_CLASS * 9 + 1), 3)   # 3 rows; 8 columns; 1-px gaps
    assert grids["real"].shape == grids["samples"].shape == want
    assert not np.array_equal(grids["real"], grids["samples"])


def test_report_row_handles_eval_json_without_the_label_free_keys():
    seen = {"colour_ratio_samples": {"saturation_bright": 0.5, "saturation_dark": 0.25}}
    run = {"eval": {"fid": 10.0, "fid_untrained": 100.0, "class_accuracy": 0.95}, "autoencoder": {},
           "seconds": 60.0, "stages": {}}
    row = image_sets.report_row("x", run, seen, 32, (5, 5))
    assert (row["fd_label_free"], row["fd_label_free_floor"], row["ae_sat_bright_ratio"]) == (None, None, None)
    assert row["goal_met"] is True
    run["eval"].update(fd_label_free=3.0, fd_label_free_floor=1.0, colour_ratio={"saturation_bright": 0.9, "saturation_dark": 0.8})
    run["autoencoder"]["colour_ratio"] = {"saturation_bright": 0.7, "saturation_dark": 0.6}
    row = image_sets.report_row("x", run, seen, 32, (5, 5))
    assert (row["fd_label_free"], row["ae_sat_bright_ratio"], row["ae_sat_dark_ratio"], row["eval_sat_dark_ratio"]) == (3.0, 0.7, 0.6, 0.8)
    text = image_sets.printed([row])
    assert "3 / 1" in text and "0.5 / 0.25" in text and "0.7 / 0.6" in text


def test_missing_outputs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="data/prepared/manifest.json not found"):
        image_sets.val_shards(tmp_path)
    with pytest.raises(SystemExit, match="no parquet shards in .*samples/parquet"):
        image_sets.sample_shards(tmp_path)
