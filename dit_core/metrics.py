"""FID: the Frechet distance between Gaussians fitted to image features (Heusel et al. 2017), with
features from the FID Inception network (pytorch-fid's weights, the ADM evaluation protocol) or from
any network that maps images to vectors (e.g. a classifier trained on the data set).

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
from typing import IO, Callable, Iterable

import numpy as np
import torch

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
        if "arr_0" in z and features is not None:
            return feature_stats(features(z["arr_0"]))
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
        self.member = self.zip.open("arr_0.npy", "w", force_zip64=True)   # size unknown to zipfile up front
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
        with self.zip.open("arr_1.npy", "w", force_zip64=True) as m:
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


def npz_array_shape(f: IO[bytes], name: str = "arr_0") -> tuple[int, ...]:
    """The shape of array ``name`` of an ``.npz`` (a seekable binary file), reading only its header."""
    with zipfile.ZipFile(f) as z:
        if f"{name}.npy" not in z.namelist():
            raise KeyError(f"the .npz holds {sorted(n[:-4] for n in z.namelist())}, not {name}")
        member, shape, _ = _npy_member(z, name)
        member.close()
        return shape


def read_npz_rows(f: IO[bytes], start: int, stop: int, name: str = "arr_0") -> np.ndarray:
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


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


class InceptionFeatures(torch.nn.Module):
    """The FID Inception-v3 (pytorch-fid's port of the TF network), 2048-d pool features.

    The weights are read from the torch hub cache, never downloaded here: put
    ``pt_inception-2015-12-05-6726825d.pth`` in ``$TORCH_HOME/hub/checkpoints/``.
    """

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = Path(weights) if weights else torch_hub_checkpoints() / FID_INCEPTION_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"the FID Inception weights are not at {path}. Download {FID_INCEPTION_FILE} (pytorch-fid's "
                f"release) on a machine with internet and copy it to {torch_hub_checkpoints()}/ (or set TORCH_HOME), "
                "or use the classifier feature network (evaluate.features: classifier)"
            )
        if path.name != FID_INCEPTION_FILE or path.parent.name != "checkpoints":
            raise ValueError(f"{path}: the weights must be a file named {FID_INCEPTION_FILE} in a folder named checkpoints")
        from pytorch_fid.inception import InceptionV3

        # pytorch-fid fetches the weights through torch.hub, which reads its cache before any
        # download: point the hub at the folder that holds checkpoints/<file>.
        old = torch.hub.get_dir()
        torch.hub.set_dir(str(path.parent.parent))
        try:
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FID_INCEPTION_DIMS]], resize_input=True,
                              normalize_input=False, use_fid_inception=True)
        finally:
            torch.hub.set_dir(old)
        self.net = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) in [-1, 1] (pytorch-fid resizes to 299 bilinearly) -> (N, 2048)."""
        return self.net(x)[0].flatten(1)


def stats_of_images(
    net: Callable[[torch.Tensor], torch.Tensor], image_batches: Iterable[np.ndarray], device: torch.device | str = "cpu"
) -> FeatureStats:
    feats = [batched_features(net, b, device=device) for b in image_batches]
    return feature_stats(np.concatenate(feats))
