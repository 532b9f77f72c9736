"""The field's table of sample metrics: FID, sFID, Inception Score, improved precision and recall.

FID is the Frechet distance between Gaussians fitted to image features (Heusel et al. 2017), with
features from the FID Inception network (pytorch-fid's weights, the ADM evaluation protocol) or from
any network that maps images to vectors (e.g. a classifier trained on the data set). sFID is the
same distance on spatial features (Nash et al. 2021: ADM takes the first 7 channels of a 17x17
Inception map). The Inception Score (Salimans et al. 2016) is exp E_x KL(p(y|x) || p(y)); precision
and recall (Kynkaanniemi et al. 2019) ask which share of one set falls inside the other's k-NN balls.

    FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

Tr((S_1 S_2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the symmetric
matrix S_1^{1/2} S_2 S_1^{1/2} (same spectrum as S_1 S_2): stable, real, no complex sqrtm.

Large sets are never held whole: each block of features becomes ``FeatureMoments`` (count, mean and
centred second-moment sum, float64), and blocks computed apart merge exactly (Chan et al.'s
pairwise update), in any order. The ADM suite's ``.npz`` batches are written and read a block of
images at a time (``AdmNpzWriter``, ``read_npz_rows``).
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np
import torch

from .contract import NPZ_IMAGES, NPZ_LABELS

# pytorch-fid's FID Inception weights, as the torch hub cache names them.
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_DIMS = 2048
FID_INCEPTION_SIZE = 299  # the network's input resolution


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a set of feature vectors (the sufficient statistics of FID)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def save_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        return buf.getvalue()


def feature_stats(features: np.ndarray) -> FeatureStats:
    """(N, D) features -> their mean and (unbiased) covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features of shape {f.shape}: need (N, D) with N >= 2")
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), count=f.shape[0])


@dataclass(frozen=True)
class FeatureMoments:
    """Count, mean and centred second-moment sum M2 = sum (f - mean)(f - mean)^T of a block of
    feature vectors, in float64: what a worker sends back instead of its features."""

    count: int
    mean: np.ndarray    # (D,)
    m2: np.ndarray      # (D, D)

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureMoments":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 1:
            raise ValueError(f"features of shape {f.shape}: need (N, D) with N >= 1")
        mean = f.mean(axis=0)
        centred = f - mean
        return cls(count=f.shape[0], mean=mean, m2=centred.T @ centred)

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        """The moments of both blocks together (Chan, Golub and LeVeque's pairwise update)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge features of dimension {self.mean.shape} and {other.mean.shape}")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return FeatureMoments(count=n, mean=mean, m2=m2)

    def stats(self) -> FeatureStats:
        """Mean and unbiased covariance, as ``feature_stats`` gives for all the features at once."""
        if self.count < 2:
            raise ValueError(f"{self.count} feature vectors: need at least 2 for a covariance")
        return FeatureStats(mu=self.mean, sigma=self.m2 / (self.count - 1), count=self.count)


def merge_moments(blocks: Iterable[FeatureMoments]) -> FeatureMoments | None:
    total = None
    for block in blocks:
        total = block if total is None else total.merge(block)
    return total


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def load_reference_npz(data: bytes, features: Callable[[np.ndarray], np.ndarray] | None = None) -> FeatureStats:
    """Reference statistics from an ADM evaluation-suite ``.npz``: its ``mu``/``sigma`` (Inception
    pool features) when present, else the features of its ``arr_0`` images (uint8 NHWC)."""
    with np.load(io.BytesIO(data)) as z:
        if "mu" in z and "sigma" in z:
            return FeatureStats(mu=z["mu"], sigma=z["sigma"], count=int(z["count"]) if "count" in z else 0)
        if NPZ_IMAGES in z and features is not None:
            return feature_stats(features(z[NPZ_IMAGES]))
        raise ValueError(f"reference .npz has {sorted(z.files)}; expected mu and sigma, or arr_0 images")


# ---------------------------------------------------------------------------------------------
# The ADM evaluation suite's .npz batches (arr_0: uint8 N x H x W x 3), a block at a time
# ---------------------------------------------------------------------------------------------

class AdmNpzWriter:
    """Writes ``arr_0`` (uint8 images, N x H x W x 3) and ``arr_1`` (int64 labels) into an
    uncompressed zip, as ``np.savez`` does, one block of images at a time: the writer holds only
    the labels. ``f`` may be unseekable (an S3 upload stream): the zip then uses data descriptors."""

    def __init__(self, f: IO[bytes], num_images: int, image_shape: tuple[int, int, int]):
        self.zip = zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.num_images, self.shape, self.written, self.labels = num_images, tuple(image_shape), 0, []
        self.member = self.zip.open(f"{NPZ_IMAGES}.npy", "w", force_zip64=True)   # size unknown to zipfile up front
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (num_images, *self.shape)}
        np.lib.format.write_array_header_1_0(self.member, header)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape[1:] != self.shape:
            raise ValueError(f"images {images.dtype} {images.shape[1:]}: this npz holds uint8 {self.shape}")
        if self.written + len(images) > self.num_images:
            raise ValueError(f"{self.written + len(images)} images written to an npz declared for {self.num_images}")
        self.member.write(np.ascontiguousarray(images).tobytes())
        self.labels.append(np.asarray(labels, dtype=np.int64))
        self.written += len(images)

    def close(self) -> None:
        self.member.close()
        if self.written != self.num_images:
            raise ValueError(f"{self.written} of the {self.num_images} images declared were written to the npz")
        with self.zip.open(f"{NPZ_LABELS}.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array(m, np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64))
        self.zip.close()


def _npy_member(z: zipfile.ZipFile, name: str) -> tuple[IO[bytes], tuple[int, ...], np.dtype]:
    member = z.open(f"{name}.npy")
    major = np.lib.format.read_magic(member)[0]
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(member)
    if fortran:
        raise ValueError(f"{name} is stored in Fortran order; write it in C order (np.savez of a C-contiguous array)")
    return member, shape, dtype


def npz_array_shape(f: IO[bytes], name: str = NPZ_IMAGES) -> tuple[int, ...]:
    """The shape of array ``name`` of an ``.npz`` (a seekable binary file), reading only its header."""
    with zipfile.ZipFile(f) as z:
        if f"{name}.npy" not in z.namelist():
            raise KeyError(f"the .npz holds {sorted(n[:-4] for n in z.namelist())}, not {name}")
        member, shape, _ = _npy_member(z, name)
        member.close()
        return shape


def read_npz_rows(f: IO[bytes], start: int, stop: int, name: str = NPZ_IMAGES) -> np.ndarray:
    """Rows ``start:stop`` of array ``name`` of an ``.npz`` without reading the others."""
    with zipfile.ZipFile(f) as z:
        member, shape, dtype = _npy_member(z, name)
        with member:
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            stop = min(stop, shape[0])
            member.seek(member.tell() + start * row)
            data = member.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def batched_features(
    net: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Features of uint8 NHWC images through ``net`` (which takes NCHW floats in [-1, 1])."""
    out = []
    for start in range(0, len(images), batch_size):
        x = uint8_to_float(images[start:start + batch_size]).to(device)
        out.append(net(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def reconstructions(autoencoder: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 NHWC images through ``autoencoder`` (``encode`` -> posterior mean -> ``decode``), back
    to uint8 as the sampler rounds its images: what the autoencoder alone keeps of them."""
    from .data import to_uint8

    out = []
    for start in range(0, len(images), batch_size):
        mean, _ = autoencoder.encode(uint8_to_float(images[start:start + batch_size]))
        out.append(to_uint8(autoencoder.decode(mean)))
    return np.concatenate(out) if out else np.asarray(images)[:0]


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Inception Score, from mergeable sums
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreMoments:
    """What the Inception Score of a set needs, as sums over its images: the count, the sum of the
    class probabilities p(y|x) and the sum of sum_y p log p. Blocks merge by adding."""

    count: int
    prob_sum: np.ndarray      # (K,)
    plogp_sum: float

    @classmethod
    def of(cls, probs: np.ndarray) -> "ScoreMoments":
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] < 1:
            raise ValueError(f"class probabilities of shape {p.shape}: need (N, K) with N >= 1")
        from scipy.special import xlogy

        return cls(count=p.shape[0], prob_sum=p.sum(axis=0), plogp_sum=float(xlogy(p, p).sum()))

    def merge(self, other: "ScoreMoments") -> "ScoreMoments":
        if self.prob_sum.shape != other.prob_sum.shape:
            raise ValueError(f"cannot merge scores over {self.prob_sum.shape} and {other.prob_sum.shape} classes")
        return ScoreMoments(self.count + other.count, self.prob_sum + other.prob_sum, self.plogp_sum + other.plogp_sum)

    def inception_score(self) -> float:
        """exp(E_x KL(p(y|x) || p(y))) with p(y) = E_x p(y|x): since the marginal is the mean of the
        conditionals, E_x sum_y p log p(y) = sum_y p(y) log p(y), so the sums above suffice. Over
        the whole set at once (ADM averages splits of 5,000 images; on 50,000 the two differ by
        well under 1%)."""
        from scipy.special import xlogy

        if not self.count:
            raise ValueError("no images: the Inception Score needs at least one")
        marginal = self.prob_sum / self.count
        return float(np.exp(self.plogp_sum / self.count - xlogy(marginal, marginal).sum()))


def inception_score(probs: np.ndarray) -> float:
    """The Inception Score of (N, K) class probabilities."""
    return ScoreMoments.of(probs).inception_score()


# ---------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019), on a capped seeded subsample
# ---------------------------------------------------------------------------------------------

PR_NEIGHBOURS = 3   # k of the k-NN balls (the paper's and ADM's choice)
PR_MAX_IMAGES = 10000   # the subsample per set that precision and recall use by default (ADM's reference batch size)


def sample_keys(seed: int, name: str, n: int) -> np.ndarray:
    """n random keys in [0, 1) for the images of one block, a pure function of (seed, name): the
    subsample a set keeps (its smallest keys) depends on neither the actors nor the merge order."""
    import hashlib

    stream = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, stream]).random(n)


@dataclass(frozen=True)
class FeatureSample:
    """At most ``cap`` feature vectors of a set, those with the smallest keys: a uniform random
    subsample (bottom-k), mergeable in any order with the same result. Sorted by key."""

    keys: np.ndarray        # (n,)
    features: np.ndarray    # (n, D) float32
    cap: int

    @classmethod
    def of(cls, features: np.ndarray, keys: np.ndarray, cap: int) -> "FeatureSample":
        if cap < 1:
            raise ValueError(f"a feature sample of at most {cap} vectors: the cap must be at least 1")
        if len(keys) != len(features):
            raise ValueError(f"{len(keys)} keys for {len(features)} feature vectors")
        order = np.argsort(keys, kind="stable")[:cap]
        return cls(np.asarray(keys)[order], np.asarray(features, dtype=np.float32)[order], cap)

    def merge(self, other: "FeatureSample") -> "FeatureSample":
        return FeatureSample.of(np.concatenate([self.features, other.features]), np.concatenate([self.keys, other.keys]),
                                min(self.cap, other.cap))


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def knn_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, batch_size: int = 1024) -> np.ndarray:
    """Each vector's distance to its k-th nearest other vector of the set: (N,) float64."""
    f = torch.from_numpy(np.asarray(features, dtype=np.float64))
    if len(f) <= k:
        raise ValueError(f"{len(f)} feature vectors: k-NN balls with k={k} need more than {k}")
    out = []
    for s in range(0, len(f), batch_size):
        d = _pairwise_sq(f[s:s + batch_size], f)
        out.append(d.kthvalue(k + 1, dim=1).values.sqrt())      # the (k+1)-th smallest counts the vector itself
    return torch.cat(out).numpy()


def manifold_share(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int = 1024) -> float:
    """The share of ``points`` that lie in at least one ball (``centres``, ``radii``)."""
    p = torch.from_numpy(np.asarray(points, dtype=np.float64))
    c = torch.from_numpy(np.asarray(centres, dtype=np.float64))
    r2 = torch.from_numpy(np.asarray(radii, dtype=np.float64)) ** 2
    inside = 0
    for s in range(0, len(p), batch_size):
        inside += int((_pairwise_sq(p[s:s + batch_size], c) <= r2[None, :]).any(dim=1).sum())
    return inside / len(p)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision (the share of ``fake`` inside the real set's k-NN balls: fidelity) and
    recall (the share of ``real`` inside the fake set's balls: diversity)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features {real.shape} and fake features {fake.shape}: need (N, D) and (M, D)")
    precision = manifold_share(fake, real, knn_radii(real, k, batch_size), batch_size)
    recall = manifold_share(real, fake, knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# The FID Inception network: pool features (FID, precision/recall), logits (IS), a spatial map (sFID)
# ---------------------------------------------------------------------------------------------

SFID_CHANNELS = 7   # ADM's sFID: the first 7 channels of a spatial map, flattened


def build_fid_inception() -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3 (torchvision's layout with the TF network's blocks and its
    1008-way fc), without weights."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = pf.FIDInceptionA(192, 32), pf.FIDInceptionA(256, 64), pf.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = pf.FIDInceptionC(768, 128), pf.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = pf.FIDInceptionC(768, 160), pf.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
    return net


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The local weights file: ``weights`` as given, or the torch hub cache's copy."""
    path = Path(weights).expanduser() if weights else torch_hub_checkpoints() / FID_INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the FID Inception weights are not at {path}. Download {FID_INCEPTION_FILE} (pytorch-fid's "
            f"release, docs/sampling.md) on a machine with internet and either copy it to {torch_hub_checkpoints()}/ "
            "(or set TORCH_HOME) or give its path or s3:// URI as evaluate.inception_weights; "
            "or use the classifier feature network (evaluate.features: classifier)"
        )
    if path.name != FID_INCEPTION_FILE:
        raise ValueError(f"{path}: the FID Inception weights are the file named {FID_INCEPTION_FILE} (pytorch-fid's "
                         "release); other Inception weights give FIDs that compare with no published number")
    return path


class InceptionFeatures(torch.nn.Module):
    """The FID Inception-v3 (pytorch-fid's port of the TF network) with its weights: ``forward``
    gives the 2048-d pool features; ``outputs`` also the 1008 logits and the sFID map.

    sFID follows ADM, which reads the TF graph's ``mixed_6/conv``: the 1x1 branch of its seventh
    mixed block (torchvision's ``Mixed_6d.branch1x1``, 192 x 17 x 17 after ReLU), first 7 channels.
    pytorch-fid's own block 2 ends later, at ``Mixed_6e``'s concatenated 768 channels, and is not
    used. Nothing is downloaded: ``weights`` is a local file (default: the torch hub cache's).
    """

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = inception_weights_path(weights)
        net = build_fid_inception()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is not pytorch-fid's FID Inception state dict ({type(e).__name__}: {e}); "
                             f"download {FID_INCEPTION_FILE} again") from e
        self.net = net.eval()
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, H, W) in [-1, 1] -> pool (N, 2048), logits (N, 1008), spatial (N, 7 * 17 * 17)."""
        n = self.net
        x = torch.nn.functional.interpolate(x, size=(FID_INCEPTION_SIZE, FID_INCEPTION_SIZE), mode="bilinear",
                                            align_corners=False)   # as pytorch-fid: bilinear to 299
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                      n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                      n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)                                    # (N, 2048, 8, 8) at the end
        pool = x.mean(dim=(2, 3))                           # (N, 2048)
        spatial = self._spatial[:, :SFID_CHANNELS].flatten(1)
        return pool, n.fc(pool), spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) in [-1, 1] -> (N, 2048) pool features."""
        return self.outputs(x)[0]


def stats_of_images(
    net: Callable[[torch.Tensor], torch.Tensor], image_batches: Iterable[np.ndarray], device: torch.device | str = "cpu"
) -> FeatureStats:
    feats = [batched_features(net, b, device=device) for b in image_batches]
    return feature_stats(np.concatenate(feats))
