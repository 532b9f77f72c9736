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


# ---------------------------------------------------------------------------------------------
# Inception Score, precision and recall, the capped subsample, the sFID maps
# ---------------------------------------------------------------------------------------------

def test_inception_score_in_closed_form_and_merged():
    """Uniform p(y|x): every image says nothing, IS = 1. One-hot over K classes used equally: IS = K.
    One-hot all on one class: 1. Random probabilities: the textbook exp(mean KL(p(y|x) || p(y)))."""
    from dit_core.metrics import ScoreMoments, inception_score

    assert inception_score(np.full((12, 5), 0.2)) == pytest.approx(1.0)
    assert inception_score(np.eye(5)[np.arange(20) % 5]) == pytest.approx(5.0)
    assert inception_score(np.eye(5)[np.zeros(7, int)]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(6, 0.3), size=50)
    marginal = p.mean(0)
    direct = np.exp(np.mean([np.sum(q * (np.log(q) - np.log(marginal))) for q in p]))
    assert inception_score(p) == pytest.approx(direct, rel=1e-12)
    merged = ScoreMoments.of(p[:13]).merge(ScoreMoments.of(p[13:31])).merge(ScoreMoments.of(p[31:]))
    assert merged.inception_score() == pytest.approx(direct, rel=1e-12)


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.'s definition, written out with full distance matrices."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]                      # column 0 is the point itself
    def share(points, centres, r):
        d = np.linalg.norm(points[:, None] - centres[None], axis=-1)
        return float((d <= r[None]).any(axis=1).mean())
    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_precision_recall_against_brute_force_and_extremes():
    from dit_core.metrics import precision_recall

    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 5))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 1000.0
    assert precision_recall(real, far) == (0.0, 0.0)
    for shift, scale in ((0.0, 1.0), (0.7, 1.0), (0.0, 0.3), (0.3, 2.0)):
        fake = rng.standard_normal((45, 5)) * scale + shift
        got = precision_recall(real, fake, k=3, batch_size=7)          # batches that do not divide the sets
        assert got == pytest.approx(brute_precision_recall(real, fake, 3), abs=1e-12), (shift, scale)
    narrow = rng.standard_normal((60, 5)) * 0.2                         # inside the real manifold, covering little
    p, r = precision_recall(real, narrow)
    assert p > 0.9 and r < 0.5, (p, r)
    with pytest.raises(ValueError, match="need .N, D. and .M, D."):
        precision_recall(real, rng.standard_normal((5, 4)))


def test_feature_sample_keeps_the_smallest_keys_in_any_merge_order():
    from dit_core.metrics import FeatureSample, sample_keys

    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 3)).astype(np.float32) for n in (7, 12, 5, 9)]
    keys = [sample_keys(4, f"shard-{i}", len(b)) for i, b in enumerate(blocks)]
    assert np.array_equal(sample_keys(4, "shard-0", 7), keys[0]) and not np.array_equal(sample_keys(5, "shard-0", 7), keys[0])
    parts = [FeatureSample.of(b, k, 10) for b, k in zip(blocks, keys)]
    forward = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    backward = parts[3].merge(parts[2].merge(parts[1])).merge(parts[0])
    all_keys, all_feats = np.concatenate(keys), np.concatenate(blocks)
    want = np.argsort(all_keys)[:10]
    for got in (forward, backward):
        assert len(got.features) == 10
        np.testing.assert_array_equal(got.features, all_feats[want])
    assert len(FeatureSample.of(blocks[0], keys[0], 100).features) == 7


def test_pixel_features_pool_like_torch_and_weigh_the_histogram():
    from dit_core.image_stats import colour_histograms, pixel_features

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    f = pixel_features(images, pool=8, levels=4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, 8)
    np.testing.assert_allclose(f[:, :192], pooled.permute(0, 2, 3, 1).reshape(3, -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(f[:, 192:], np.sqrt(colour_histograms(images, 4)) * 8, atol=1e-6)
    np.testing.assert_allclose((f[:, 192:] ** 2).sum(1), 64.0, rtol=1e-5)     # the block's squared norm: pool**2
    with pytest.raises(ValueError, match="lower evaluate.pixel_pool"):
        pixel_features(images[:, :6, :6], pool=8)


def test_classifier_outputs_give_features_logits_and_an_8x8_map():
    from dit_core.classifier import SPATIAL_CHANNELS, SPATIAL_SIDE, Classifier, ClassifierConfig

    torch.manual_seed(0)
    for architecture, size in (("pyramid", 16), ("pyramid", 32), ("two-stage", 16), ("two-stage", 8)):
        clf = Classifier(ClassifierConfig(num_classes=3, image_size=size, width=8, feature_dim=16, architecture=architecture)).eval()
        x = torch.randn(2, 3, size, size)
        feats, logits, spatial = clf.outputs(x)
        torch.testing.assert_close(feats, clf.features(x))
        torch.testing.assert_close(logits, clf(x))
        assert spatial.shape == (2, SPATIAL_CHANNELS * SPATIAL_SIDE ** 2), (architecture, size)
    first_block = clf.body[:6](x)                      # two-stage at 8px: its first block is the 8x8 map
    torch.testing.assert_close(spatial, first_block[:, :SPATIAL_CHANNELS].flatten(1))


def random_fid_inception(path) -> None:
    """pytorch-fid's FID Inception layout with random weights, saved as the real file is named."""
    from dit_core.metrics import build_fid_inception

    torch.manual_seed(0)
    net = build_fid_inception()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_inception_outputs_from_a_local_weights_file(tmp_path):
    """Pool features (2048), the 1008 logits (IS) and ADM's sFID map (first 7 channels of the
    17x17 map of Mixed_6d's 1x1 branch): from a weights file anywhere, named as pytorch-fid's."""
    from dit_core.metrics import SFID_CHANNELS, InceptionFeatures

    weights = tmp_path / "anywhere" / FID_INCEPTION_FILE
    random_fid_inception(weights)
    net = InceptionFeatures(weights)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16))).float()
    with torch.no_grad():
        pool, logits, spatial = net.outputs(x)
        inner = net.net.Mixed_6d.branch1x1
        seen = []
        hook = inner.register_forward_hook(lambda m, i, o: seen.append(o))
        net(x)
        hook.remove()
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, SFID_CHANNELS * 17 * 17)
    torch.testing.assert_close(logits, net.net.fc(pool))
    torch.testing.assert_close(spatial, seen[0][:, :SFID_CHANNELS].flatten(1))
    assert torch.isfinite(pool).all() and not torch.allclose(pool[0], pool[1])
    (tmp_path / "other.pth").write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match=f"file named {FID_INCEPTION_FILE}"):
        InceptionFeatures(tmp_path / "other.pth")
    bad = tmp_path / "bad" / FID_INCEPTION_FILE
    bad.parent.mkdir()
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not pytorch-fid's FID Inception state dict"):
        InceptionFeatures(bad)
