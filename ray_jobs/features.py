"""Feature statistics of image sets on a Ray Data actor pool, for the field's table of metrics at any
sample count.

Each work item is a slice of images in the store: a parquet shard (the sample job's, or a prepared
split's; PNG ``image`` column, ``label`` when present) or rows of an ``.npz``'s ``arr_0`` (the ADM
suite's layout); with ``reconstruct`` set, the autoencoder's reconstructions of those images. An
actor (``FeatureBlock``: the networks loaded once, on a GPU when the cluster has them) reads its
item and sends back only mergeable summaries (``SetFeatures``): float64 moments of the feature
network's pool features (FID), of its spatial map (sFID) and of label-free pixel features
(``fd_label_free``), the sums of the Inception Score, colour statistics, how many images the
classifier assigns to their label, and a seeded subsample of at most ``pr_max_images`` pool
features (precision and recall). The driver merges them as they stream in: no process holds a
whole set's features beyond that cap, and the result equals the single-process computation up to
float rounding (tests/test_evaluate.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dit_core.classifier import Classifier
from dit_core.contract import IMAGE_COLUMN, LABEL_COLUMN
from dit_core.data import pngs_to_uint8
from dit_core.image_stats import HISTOGRAM_LEVELS, PIXEL_POOL, ColourStats, pixel_features
from dit_core.metrics import (
    FID_INCEPTION_FILE,
    FeatureMoments,
    FeatureSample,
    PR_MAX_IMAGES,
    PR_NEIGHBOURS,
    InceptionFeatures,
    ScoreMoments,
    npz_array_shape,
    read_npz_rows,
    reconstructions,
    sample_keys,
    torch_hub_checkpoints,
    uint8_to_float,
)

from . import storage
from .runtime import init_ray, map_with_actor_pool, use_assigned_cpus

NETWORKS = ("classifier", "inception")
PR_MIN_IMAGES = PR_NEIGHBOURS + 1   # a k-NN ball needs k other vectors


def parquet_items(name: str, uris: Sequence[str]) -> list[dict[str, Any]]:
    """Work items of set ``name``: one per parquet shard."""
    return [{"set": name, "uri": str(u), "kind": "parquet", "start": 0, "stop": -1, "reconstruct": False} for u in uris]


def npz_items(name: str, uri: str, rows_per_item: int = 1000) -> list[dict[str, Any]]:
    """Work items of set ``name``: slices of ``rows_per_item`` rows of the ``.npz``'s ``arr_0``."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        shape = npz_array_shape(f)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{uri}: arr_0 has shape {shape}; the ADM layout is uint8 (N, H, W, 3)")
    return [{"set": name, "uri": uri, "kind": "npz", "start": a, "stop": min(a + rows_per_item, shape[0]), "reconstruct": False}
            for a in range(0, shape[0], rows_per_item)]


def reconstruction_items(name: str, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``name``: the autoencoder's reconstructions of the images of ``items``."""
    return [{**item, "set": name, "reconstruct": True} for item in items]


def read_item(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The item's uint8 NHWC images and, for a parquet shard with a ``label`` column, the labels."""
    fs, path = storage.resolve(item["uri"])
    if item["kind"] == "npz":
        with fs.open_input_file(path) as f:
            return read_npz_rows(f, int(item["start"]), int(item["stop"])), None
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        columns = pq.read_schema(f).names
        table = pq.read_table(f, columns=[c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c in columns])
    if IMAGE_COLUMN not in columns:
        raise ValueError(f"{item['uri']} has no {IMAGE_COLUMN} column (columns {columns}); give sample or prepared parquet shards")
    labels = np.asarray(table.column(LABEL_COLUMN).to_pylist(), dtype=np.int64) if LABEL_COLUMN in columns else None
    return pngs_to_uint8(table.column(IMAGE_COLUMN).to_pylist()), labels


def inception_cache_path(uri: str) -> Path:
    """Where an actor keeps its copy of the weights at ``uri``: the torch hub cache, a folder per URI."""
    return torch_hub_checkpoints() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(uri).name


def local_inception_weights(weights: str | None) -> str | None:
    """A local file for ``evaluate.inception_weights``: a local path as it is; an ``s3://`` URI
    downloaded once into the torch hub cache (a folder named after the URI, written under a
    temporary name and renamed, so that actors on one host never read half a file)."""
    if not weights or not storage.is_s3(weights):
        return weights
    target = inception_cache_path(weights)
    folder = target.parent
    if not target.is_file():
        if not storage.exists(weights):
            raise FileNotFoundError(f"evaluate.inception_weights={weights!r} does not exist; upload {FID_INCEPTION_FILE} there")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.name}.{os.getpid()}.tmp"
        tmp.write_bytes(storage.read_bytes(weights))
        tmp.replace(target)
    return str(target)


@dataclass(frozen=True)
class PassSettings:
    """What the actors compute."""

    network: str = "classifier"            # feature network of FID, sFID, IS, precision/recall
    inception_weights: str | None = None   # local path or s3://; None: the torch hub cache
    batch_size: int = 256
    pr_max_images: int = PR_MAX_IMAGES     # per set: the subsample precision and recall use
    seed: int = 0                          # of that subsample
    pixel_pool: int = PIXEL_POOL           # label-free features: average-pooled cells per side
    histogram_levels: int = HISTOGRAM_LEVELS


@dataclass
class SetFeatures:
    """What the pass found for one set of images; blocks merge exactly (``merge``)."""

    moments: FeatureMoments      # pool features: FID
    spatial: FeatureMoments      # spatial map: sFID
    pixels: FeatureMoments       # label-free pixel features: fd_label_free
    scores: ScoreMoments         # Inception Score
    colour: ColourStats
    sample: FeatureSample        # capped seeded subsample of pool features: precision, recall
    labelled: int = 0            # images with a label
    correct: int = 0             # of those, how many the classifier assigns to their label

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def merge(self, other: "SetFeatures") -> "SetFeatures":
        return SetFeatures(self.moments.merge(other.moments), self.spatial.merge(other.spatial), self.pixels.merge(other.pixels),
                           self.scores.merge(other.scores), self.colour.merge(other.colour), self.sample.merge(other.sample),
                           self.labelled + other.labelled, self.correct + other.correct)


@torch.no_grad()
def network_outputs(net: Any, images: np.ndarray, batch_size: int, device: torch.device | str = "cpu") -> tuple[np.ndarray, ...]:
    """(pool features, logits, spatial features) of uint8 NHWC images through ``net.outputs``."""
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, len(images), batch_size):
        x = uint8_to_float(images[start:start + batch_size]).to(device)
        parts.append(tuple(t.float().cpu().numpy() for t in net.outputs(x)))
    return tuple(np.concatenate(p) for p in zip(*parts))


def set_features(images: np.ndarray, labels: np.ndarray | None, net: Any, classifier: Classifier | None, settings: PassSettings,
                 block: str, device: torch.device | str = "cpu") -> SetFeatures:
    """The summaries of one block of images (``block`` names it for the subsample's keys)."""
    pool, logits, spatial = network_outputs(net, images, settings.batch_size, device)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    correct = 0
    if labels is not None:
        clf_logits = logits if net is classifier else network_outputs(classifier, images, settings.batch_size, device)[1]
        correct = int((clf_logits.argmax(1) == labels).sum())
    keys = sample_keys(settings.seed, block, len(images))
    return SetFeatures(
        moments=FeatureMoments.of(pool), spatial=FeatureMoments.of(spatial),
        pixels=FeatureMoments.of(pixel_features(images, settings.pixel_pool, settings.histogram_levels)),
        scores=ScoreMoments.of(probs), colour=ColourStats.of(images),
        sample=FeatureSample.of(pool, keys, settings.pr_max_images),
        labelled=0 if labels is None else len(labels), correct=correct)


class FeatureBlock:
    """Ray Data callable class: the feature network, the classifier and (for reconstruction items)
    the autoencoder loaded once per actor; each work item in, its pickled ``SetFeatures`` out."""

    def __init__(self, classifier: Any, autoencoder: Any, settings: PassSettings):
        import ray

        classifier, autoencoder = (ray.get(o) if isinstance(o, ray.ObjectRef) else o for o in (classifier, autoencoder))
        use_assigned_cpus()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.classifier = classifier.eval().to(self.device)
        self.autoencoder = autoencoder.to(self.device) if autoencoder is not None else None
        self.settings = settings
        self.net = (self.classifier if settings.network == "classifier"
                    else InceptionFeatures(local_inception_weights(settings.inception_weights)).to(self.device))

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sets, blobs = [], []
        for i in range(len(rows["uri"])):
            item = {k: rows[k][i].item() if hasattr(rows[k][i], "item") else rows[k][i] for k in rows}
            images, labels = read_item(item)
            if len(images) == 0:
                continue
            if item["reconstruct"]:
                if self.autoencoder is None:
                    raise ValueError(f"set {item['set']!r} asks for reconstructions but the feature pass got no autoencoder")
                images = reconstructions(self.autoencoder, images, self.settings.batch_size)
            block = f"{item['uri']}:{item['start']}"
            found = set_features(images, labels, self.net, self.classifier, self.settings, block, self.device)
            sets.append(item["set"])
            blobs.append(pickle.dumps(found))
        return {"set": np.array(sets, dtype=object), "found": np.array(blobs, dtype=object)}


def feature_pass(items: list[dict[str, Any]], classifier: Classifier, settings: PassSettings = PassSettings(),
                 autoencoder: Any = None, num_actors: int | None = None, actor_num_cpus: float | None = None,
                 progress: bool = False) -> dict[str, SetFeatures]:
    """The summaries of each set (the items' ``set`` names) from a Ray Data actor pool; the driver
    holds one block's summaries at a time, plus each set's capped subsample."""
    import ray

    if settings.network not in NETWORKS:
        raise ValueError(f"feature network {settings.network!r}; choose one of {NETWORKS}")
    if not items:
        raise ValueError("no images to compute features of")
    if settings.pr_max_images < PR_MIN_IMAGES:
        raise ValueError(f"evaluate.pr_max_images={settings.pr_max_images}: precision and recall need at least {PR_MIN_IMAGES}")
    init_ray()
    ds = map_with_actor_pool(ray.data.from_items(items, override_num_blocks=len(items)), FeatureBlock,
                             (ray.put(classifier.cpu()), ray.put(autoencoder) if autoencoder is not None else None, settings),
                             work=len(items),
                             batch_size=1,   # one item (a shard, or a slice of an npz) per call
                             num_actors=num_actors, actor_num_cpus=actor_num_cpus, progress=progress)
    merged: dict[str, SetFeatures] = {}
    for row in ds.iter_rows():   # streamed: the driver merges block by block
        name, found = str(row["set"]), pickle.loads(row["found"])
        merged[name] = merged[name].merge(found) if name in merged else found
    return merged

