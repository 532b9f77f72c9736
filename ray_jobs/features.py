"""Feature statistics of image sets on a Ray Data actor pool, for FID at any sample count.

Each work item is a slice of images in the store: a parquet shard (the sample job's, or a prepared
split's; PNG ``image`` column, ``label`` when present) or rows of an ``.npz``'s ``arr_0`` (the ADM
suite's layout). An actor (``FeatureBlock``: the feature network loaded once, on a GPU when the
cluster has them) reads its item, computes the features and sends back only their float64
moments and how many images the classifier assigns to their label. The driver merges the moments
as they stream in: no process ever holds a whole set, and the result equals the single-process
computation up to float rounding (tests/test_evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dit_core.classifier import Classifier
from dit_core.data import pngs_to_uint8
from dit_core.metrics import FeatureMoments, InceptionFeatures, batched_features, npz_array_shape, read_npz_rows

from . import storage
from .runtime import init_ray, map_with_actor_pool, use_assigned_cpus

NETWORKS = ("classifier", "inception")


def parquet_items(name: str, uris: Sequence[str]) -> list[dict[str, Any]]:
    """Work items of set ``name``: one per parquet shard."""
    return [{"set": name, "uri": str(u), "kind": "parquet", "start": 0, "stop": -1} for u in uris]


def npz_items(name: str, uri: str, rows_per_item: int = 1000) -> list[dict[str, Any]]:
    """Work items of set ``name``: slices of ``rows_per_item`` rows of the ``.npz``'s ``arr_0``."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        shape = npz_array_shape(f)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{uri}: arr_0 has shape {shape}; the ADM layout is uint8 (N, H, W, 3)")
    return [{"set": name, "uri": uri, "kind": "npz", "start": a, "stop": min(a + rows_per_item, shape[0])}
            for a in range(0, shape[0], rows_per_item)]


def read_item(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The item's uint8 NHWC images and, for a parquet shard with a ``label`` column, the labels."""
    fs, path = storage.resolve(item["uri"])
    if item["kind"] == "npz":
        with fs.open_input_file(path) as f:
            return read_npz_rows(f, int(item["start"]), int(item["stop"])), None
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        columns = pq.read_schema(f).names
        table = pq.read_table(f, columns=[c for c in ("image", "label") if c in columns])
    if "image" not in columns:
        raise ValueError(f"{item['uri']} has no image column (columns {columns}); give sample or prepared parquet shards")
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64) if "label" in columns else None
    return pngs_to_uint8(table.column("image").to_pylist()), labels


class FeatureBlock:
    """Ray Data callable class: the feature network and the classifier loaded once per actor;
    each work item in, its feature moments and classifier hits out."""

    def __init__(self, classifier: Any, network: str, batch_size: int):
        import ray

        if isinstance(classifier, ray.ObjectRef):
            classifier = ray.get(classifier)
        use_assigned_cpus()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.classifier = classifier.eval().to(self.device)
        self.net = self.classifier.features if network == "classifier" else InceptionFeatures().to(self.device)
        self.batch_size = batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"set": [], "count": [], "mean": [], "m2": [], "labelled": [], "correct": []}
        for i in range(len(rows["uri"])):
            item = {k: rows[k][i].item() if hasattr(rows[k][i], "item") else rows[k][i] for k in rows}
            images, labels = read_item(item)
            if len(images) == 0:
                continue
            moments = FeatureMoments.of(batched_features(self.net, images, self.batch_size, self.device))
            correct = 0
            if labels is not None:
                logits = batched_features(self.classifier, images, self.batch_size, self.device)
                correct = int((logits.argmax(1) == labels).sum())
            out["set"].append(item["set"])
            out["count"].append(moments.count)
            out["mean"].append(moments.mean)
            out["m2"].append(moments.m2)
            out["labelled"].append(0 if labels is None else len(labels))
            out["correct"].append(correct)
        if not out["count"]:
            return {k: np.zeros(0) for k in out}
        return {k: np.array(v) if k in ("set", "count", "labelled", "correct") else np.stack(v) for k, v in out.items()}


@dataclass(frozen=True)
class SetFeatures:
    """What the pass found for one set of images."""

    moments: FeatureMoments
    labelled: int          # images with a label
    correct: int           # of those, how many the classifier assigns to their label

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def feature_pass(items: list[dict[str, Any]], network: str, classifier: Classifier, batch_size: int = 256,
                 num_actors: int | None = None, actor_num_cpus: float | None = None,
                 progress: bool = False) -> dict[str, SetFeatures]:
    """Feature moments per set (the items' ``set`` names) from a Ray Data actor pool; the driver
    holds one block's moments at a time."""
    import ray

    if network not in NETWORKS:
        raise ValueError(f"feature network {network!r}; choose one of {NETWORKS}")
    if not items:
        raise ValueError("no images to compute features of")
    init_ray()
    ds = map_with_actor_pool(ray.data.from_items(items, override_num_blocks=len(items)), FeatureBlock,
                             (ray.put(classifier.cpu()), network, batch_size), work=len(items),
                             batch_size=1,   # one item (a shard, or a slice of an npz) per call
                             num_actors=num_actors, actor_num_cpus=actor_num_cpus, progress=progress)
    merged: dict[str, SetFeatures] = {}
    for row in ds.iter_rows():   # streamed: the driver merges block by block
        block = FeatureMoments(count=int(row["count"]), mean=np.asarray(row["mean"]), m2=np.asarray(row["m2"]))
        name = str(row["set"])
        if name in merged:
            old = merged[name]
            merged[name] = SetFeatures(old.moments.merge(block), old.labelled + int(row["labelled"]), old.correct + int(row["correct"]))
        else:
            merged[name] = SetFeatures(block, int(row["labelled"]), int(row["correct"]))
    return merged
