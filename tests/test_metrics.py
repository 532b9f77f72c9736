"""FID: the Frechet distance against an independent computation (scipy's sqrtm), 0 for a set
against itself, statistics merged from blocks, reference .npz files written and read a block at a
time, and the Inception feature network's offline loading."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch

from dit_core.metrics import (
    FID_INCEPTION_FILE,
    AdmNpzWriter,
    FeatureMoments,
    InceptionFeatures,
    batched_features,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    load_reference_npz,
    merge_moments,
    npz_array_shape,
    read_npz_rows,
)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (pytorch-fid's approach)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim) * 3, a @ a.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [1, 2, 16, 64])
def test_frechet_distance_matches_scipy(dim):
    rng = np.random.default_rng(dim)
    for _ in range(3):
        (mu1, s1), (mu2, s2) = random_stats(rng, dim), random_stats(rng, dim)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)
        assert ours > 0
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-6)  # symmetric


def test_frechet_distance_of_a_set_to_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((500, 32)) @ np.random.default_rng(1).standard_normal((32, 32))
    stats = feature_stats(feats)
    assert fid_from_stats(stats, stats) == pytest.approx(0.0, abs=1e-7)
    # a shifted copy: only the mean term remains
    shifted = feature_stats(feats + 2.0)
    assert fid_from_stats(stats, shifted) == pytest.approx(4.0 * 32, rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def test_moments_merged_from_blocks_equal_the_statistics_of_all_features():
    """Blocks of any sizes, merged in any order, give the mean and covariance of the whole set (float64;
    features with a large offset, where raw sums of squares would lose digits)."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16)) + 1e3
    whole = feature_stats(feats)
    cuts = np.sort(rng.choice(np.arange(1, 1000), 12, replace=False))
    blocks = [FeatureMoments.of(b) for b in np.split(feats, cuts)]
    for order in (blocks, blocks[::-1], [blocks[i] for i in rng.permutation(len(blocks))]):
        merged = merge_moments(order).stats()
        assert merged.count == 1000
        np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-12)
        np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-9, atol=1e-9)
    single = FeatureMoments.of(feats[:1])
    assert single.count == 1 and not single.m2.any()
    with pytest.raises(ValueError, match="at least 2"):
        single.stats()
    with pytest.raises(ValueError, match="dimension"):
        single.merge(FeatureMoments.of(np.zeros((2, 3))))


class Unseekable(io.RawIOBase):
    """An upload stream: write only, no seek, no tell."""

    def __init__(self):
        self.data = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.data.write(b)


@pytest.mark.parametrize("seekable", [True, False])
def test_npz_written_and_read_a_block_at_a_time(seekable):
    """The ADM suite's layout (what np.load reads), written block by block, also to a stream that
    cannot seek; rows read back without the rest of the array."""
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (23, 5, 6, 3), dtype=np.uint8), np.arange(23) % 4
    f = io.BytesIO() if seekable else Unseekable()
    writer = AdmNpzWriter(f, 23, (5, 6, 3))
    for start in range(0, 23, 7):
        writer.write(images[start:start + 7], labels[start:start + 7])
    writer.close()
    data = (f if seekable else f.data).getvalue()
    with np.load(io.BytesIO(data)) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"] and z["arr_0"].dtype == np.uint8 and z["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    assert npz_array_shape(io.BytesIO(data)) == (23, 5, 6, 3)
    np.testing.assert_array_equal(read_npz_rows(io.BytesIO(data), 5, 11), images[5:11])
    np.testing.assert_array_equal(read_npz_rows(io.BytesIO(data), 20, 99), images[20:])
    buf = io.BytesIO()
    np.savez_compressed(buf, arr_0=images)   # a compressed npz reads the same way
    np.testing.assert_array_equal(read_npz_rows(io.BytesIO(buf.getvalue()), 3, 9), images[3:9])
    with pytest.raises(ValueError, match=r"uint8 \(5, 6, 3\)"):
        AdmNpzWriter(io.BytesIO(), 2, (5, 6, 3)).write(np.zeros((1, 4, 4, 3), np.uint8), np.zeros(1))
    short = AdmNpzWriter(io.BytesIO(), 3, (5, 6, 3))
    short.write(images[:2], labels[:2])
    with pytest.raises(ValueError, match="2 of the 3 images"):
        short.close()


def test_reference_npz_with_statistics_or_images():
    rng = np.random.default_rng(0)
    mu, sigma = random_stats(rng, 8)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    ref = load_reference_npz(buf.getvalue())
    np.testing.assert_allclose(ref.mu, mu)
    np.testing.assert_allclose(ref.sigma, sigma)

    images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    net = lambda x: x.flatten(1)[:, :6]  # noqa: E731 - any image -> vector map will do
    ref = load_reference_npz(buf.getvalue(), lambda a: batched_features(net, a, batch_size=16))
    direct = feature_stats(images.transpose(0, 3, 1, 2).reshape(40, -1)[:, :6].astype(np.float64) / 127.5 - 1)
    np.testing.assert_allclose(ref.mu, direct.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, direct.sigma, rtol=1e-4, atol=1e-6)

    buf = io.BytesIO()
    np.savez(buf, something=np.zeros(3))
    with pytest.raises(ValueError, match="expected mu and sigma"):
        load_reference_npz(buf.getvalue())


def test_inception_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures()
    assert FID_INCEPTION_FILE in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)


@pytest.mark.slow
def test_inception_features_load_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """A state dict in the FID Inception's layout (random values: the real file cannot be fetched
    here) is read from $TORCH_HOME/hub/checkpoints without any download; features are 2048-d."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints" / FID_INCEPTION_FILE
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    layout = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(layout.state_dict(), ckpt)
    net = InceptionFeatures()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    feats = batched_features(net, images)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
