"""Helpers every stage module uses: params, where a stage runs and where its outputs live, parquet
on local/S3 storage, the prepared-data contract.

A stage reads its section of ``params.yaml`` (stage name = module name = section) and takes its
input/output paths from the command line that ``dvc.yaml`` gives it. ``run_stage`` decides where:
- ``store.root`` null and ``RAY_ADDRESS`` not a dashboard: here, in the project's folders (the default);
- ``store.root: s3://bucket/prefix``: every large output goes under that prefix (``data/prepared`` ->
  ``s3://bucket/prefix/data/prepared``) and the project keeps only a pointer to it
  (``data/prepared/location.json``), which later stages follow;
- ``RAY_ADDRESS=http://<head>:8265`` too: the stage runs as a Ray job on that cluster, the project
  shipped as its working dir; its small outputs (metrics, pointers) come back through the store.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shlex
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dit_core import settings
from dit_core.contract import IMAGE_COLUMN, LOCATION_FILE, MANIFEST_FILE, SHARDS_KEY, SPLITS_KEY
from dit_core.data import pngs_to_batch

from ray_jobs import runtime, storage

PARAMS_FILE = "params.yaml"
JOBS_DIR = "jobs"                 # under store.root: each submitted stage's small outputs
SPLITS = ("train", "val")


def load_params(section: str | None = None, path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """One section of params.yaml (or all of it), read as DVC reads it (YAML 1.2: ``1e-3`` is a
    number). The same file DVC tracks, read directly so a stage also runs outside ``dvc repro``."""
    return settings.read_yaml(path) if section is None else settings.read_section(path, section)


@dataclass(frozen=True)
class StoreSettings:
    """The ``store`` settings (params.yaml repeats these defaults for DVC)."""

    root: str | None = None   # null: the project's folders; s3://bucket/prefix: large outputs there, pointers here


@dataclass(frozen=True)
class StageIO:
    """The command-line arguments (argparse dests) of a stage, by what they carry."""

    inputs: tuple[str, ...] = ()     # folders of earlier stages: a local folder, a pointer to one, or a URI
    outputs: tuple[str, ...] = ()    # large folder outputs: under store.root when it is set, a pointer kept here
    files_in: tuple[str, ...] = ()   # small local files it reads (the train pointer): shipped with a job
    reports: tuple[str, ...] = ()    # small files it writes (metrics, pointers, plots): fetched back from a job
    tracking: Callable[[], str] | None = None  # the MLflow tracking URI, for stages that log or read the registry
    settings_paths: Callable[[argparse.Namespace], dict[str, str | None]] | None = None  # paths in params (prepare.path, ...)


def store_root(params_path: str | os.PathLike = PARAMS_FILE) -> str | None:
    params = settings.read_yaml(params_path)
    return settings.build(StoreSettings, params.get("store") or {}, "store").root


def in_store(path: str, root: str | None) -> str:
    """Where a project-relative output lives: under ``root`` when set (an URI stays as it is)."""
    return storage.join(root, os.path.normpath(path).lstrip("/")) if root and not storage.is_s3(path) else path


def locate(path: str | None) -> str | None:
    """The URI of an earlier stage's output: what its pointer names, else the path itself."""
    return storage.located(path)


def write_location(local: str, uri: str) -> None:
    """Replace the local output folder with a pointer to ``uri``. It holds a digest of the output's
    listing, so that DVC sees a new output when the content changed and re-runs what follows."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    listing = sorted((i.path[len(path):], i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise RuntimeError(f"the stage wrote nothing to {uri}")
    digest = hashlib.sha256(repr(listing).encode()).hexdigest()
    if os.path.isdir(local):
        shutil.rmtree(local)
    storage.write_json(os.path.join(local, LOCATION_FILE), {"uri": uri, "files": len(listing), "digest": digest})


def stage_arguments(argv: Sequence[str] | None, doc: str | None, flags: Mapping[str, str], settings_cls: type, section: str,
                    example: str, optional: Sequence[str] = (), skip: Sequence[str] = (), build: bool = False
                    ) -> tuple[settings.CommandParser, argparse.Namespace, dict[str, Any]]:
    """A stage's command line: its path flags (``flags``: flag -> help, in order; required but for
    those in ``optional``), as ``dvc.yaml`` gives them, then ``--params``/``--set`` for its params.yaml
    ``section`` with the settings list of ``settings_cls`` (``skip``: fields its flags give). Returns
    the parser (its ``refusing`` turns a refused value into one line naming the flag), the parsed
    flags and the section's settings (``settings.read_settings``; a bad one is refused that way).
    ``build``: also check them whole (``settings.build`` of ``settings_cls``) before any work."""
    p = settings.command_parser(doc)
    for flag, text in flags.items():
        p.add_argument(flag, required=flag not in optional, default=None, help=text)
    settings.add_settings_arguments(p, settings_cls, section, PARAMS_FILE, skip=skip, example=example)
    a = p.parse_args(argv)
    with p.refusing(a):
        params = settings.read_settings(a, settings_cls, section)
        if build:
            settings.build(settings_cls, params, section)
    return p, a, params


def _argv(args: argparse.Namespace) -> str:
    """The flags that give a stage ``args`` again (``--set a=1 b=2`` for a list; an empty one left out)."""
    def flag(key: str, value: Any) -> str:
        values = value if isinstance(value, list) else [value]
        return f"--{key} " + " ".join(shlex.quote(str(v)) for v in values)

    return " ".join(flag(k, v) for k, v in sorted(vars(args).items()) if v is not None and v != [])


def run_stage(stage: str, args: argparse.Namespace, spec: StageIO, core: Callable[[argparse.Namespace], Any]) -> Any:
    """Run the stage's ``core`` here, or as a Ray job on the cluster of ``RAY_ADDRESS`` (a dashboard
    address), with its large outputs in ``store.root`` when that is set (see the module docstring).
    A remote run needs the store and a tracking server: refused before any work, naming what to set."""
    root = store_root(args.params)
    address = os.environ.get("RAY_ADDRESS", "")
    remote = runtime.is_job_server(address)
    if not remote and not root:
        return core(args)
    job = argparse.Namespace(**vars(args))
    for name in spec.inputs:
        setattr(job, name, locate(getattr(args, name)))
    redirected = {name: (getattr(args, name), in_store(getattr(args, name), root)) for name in spec.outputs
                  if root and not storage.is_s3(getattr(args, name))}
    for name, (_, uri) in redirected.items():
        setattr(job, name, uri)
    if not remote:
        result = core(job)
    else:
        where = f"stage {stage} runs as a Ray job on the remote cluster at {address}, which"
        if not root:
            raise ValueError(f"store.root is null, but {where} cannot read or write this host's folders: set it to an "
                             "s3:// prefix (`dvc exp run -S store.root=s3://<bucket>/<prefix>` or in params.yaml)")
        paths = {f"{stage} --{n}": getattr(job, n) for n in spec.inputs}
        paths.update(spec.settings_paths(args) if spec.settings_paths else {})
        runtime.require_shared(paths, runtime.REMOTE, where, spec.tracking() if spec.tracking else None)
        job_dir = storage.join(root, JOBS_DIR, f"{stage}-{uuid.uuid4().hex[:12]}")
        for name in spec.files_in:
            local = getattr(args, name)
            if local and not storage.is_s3(local) and os.path.exists(local):
                setattr(job, name, storage.join(job_dir, "in", os.path.basename(local)))
                storage.write_bytes(getattr(job, name), storage.read_bytes(local))
        reports = {name: getattr(args, name) for name in spec.reports if getattr(args, name)}
        for name, local in reports.items():
            setattr(job, name, storage.join(job_dir, "out", os.path.basename(local)))
        runtime.submit_job(address, f"python -m pipelines.{stage} {_argv(job)}", stage)
        for name, local in reports.items():
            if storage.exists(getattr(job, name)):
                storage.write_bytes(local, storage.read_bytes(getattr(job, name)))
        result = None
    for local, uri in redirected.values():
        write_location(local, uri)
    return result


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a table atomically to a local path or an s3:// URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_manifest(prepared: str) -> dict[str, Any]:
    """The prepared data's published manifest (its ``version`` names the folder of the shards:
    ``read_split`` resolves it); its presence is what marks the output complete."""
    uri = storage.join(prepared, MANIFEST_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: {prepared} is not a complete prepared data set; run the prepare stage")
    return storage.read_json(uri)


def read_split(prepared: str, manifest: dict[str, Any], split: str, columns: list[str] | None = None) -> pa.Table:
    """All shards of one split, in manifest order, from the version the manifest names."""
    shards = manifest[SPLITS_KEY][split][SHARDS_KEY]
    folder = storage.version_folder(prepared, manifest)
    tables = [read_parquet(storage.join(folder, s), columns) for s in shards]
    if not tables:
        raise ValueError(f"split {split!r} of {prepared} is empty; lower prepare.val_fraction or add data")
    return pa.concat_tables(tables)


def load_images(prepared: str, manifest: dict[str, Any], split: str, max_images: int, seed: int) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]; a seeded subset of at most ``max_images`` (all in memory: the
    caps keep large data sets, e.g. ImageNet at 256, within RAM)."""
    pngs = read_split(prepared, manifest, split, [IMAGE_COLUMN]).column(IMAGE_COLUMN).to_pylist()
    if len(pngs) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(pngs), max_images, replace=False))
        pngs = [pngs[i] for i in keep]
    return pngs_to_batch(pngs)
