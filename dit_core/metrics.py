"""FID: the Frechet distance between Gaussians fitted to image features (Heusel et al. 2017), with
features from the FID Inception network (pytorch-fid's weights, the ADM evaluation protocol) or from
any network that maps images to vectors (e.g. a classifier trained on the data set).

    FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

Tr((S_1 S_2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the symmetric
matrix S_1^{1/2} S_2 S_1^{1/2} (same spectrum as S_1 S_2): stable, real, no complex sqrtm.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

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
