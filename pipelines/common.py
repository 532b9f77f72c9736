"""Helpers every stage module uses: params, parquet on local/S3 storage, the prepared-data contract.

A stage reads its section of ``params.yaml`` (stage name = module name = section) and takes its
input/output paths from the command line that ``dvc.yaml`` gives it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from dit_core import settings
from dit_core.data import pngs_to_batch

from ray_jobs import storage

PARAMS_FILE = "params.yaml"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def load_params(section: str | None = None, path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """One section of params.yaml (or all of it), read as DVC reads it (YAML 1.2: ``1e-3`` is a
    number). The same file DVC tracks, read directly so a stage also runs outside ``dvc repro``."""
    return settings.read_yaml(path) if section is None else settings.read_section(path, section)


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a table atomically to a local path or an s3:// URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_manifest(prepared: str) -> dict[str, Any]:
    """The prepared data's manifest; its presence is what marks the folder complete."""
    uri = storage.join(prepared, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: {prepared} is not a complete prepared data set; run the prepare stage")
    return storage.read_json(uri)


def read_split(prepared: str, manifest: dict[str, Any], split: str, columns: list[str] | None = None) -> pa.Table:
    """All shards of one split, in manifest order."""
    shards = manifest["splits"][split]["shards"]
    tables = [read_parquet(storage.join(prepared, s), columns) for s in shards]
    if not tables:
        raise ValueError(f"split {split!r} of {prepared} is empty; lower prepare.val_fraction or add data")
    return pa.concat_tables(tables)


def load_images(prepared: str, manifest: dict[str, Any], split: str, max_images: int, seed: int) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]; a seeded subset of at most ``max_images`` (all in memory: the
    caps keep large data sets, e.g. ImageNet at 256, within RAM)."""
    pngs = read_split(prepared, manifest, split, ["image"]).column("image").to_pylist()
    if len(pngs) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(pngs), max_images, replace=False))
        pngs = [pngs[i] for i in keep]
    return pngs_to_batch(pngs)
