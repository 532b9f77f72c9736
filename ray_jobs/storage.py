"""Local paths and ``s3://`` URIs behind one small API (pyarrow.fs).

S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), never from params. Writes are atomic: a local file is written under a
temporary name and renamed; an S3 object becomes visible only when its upload completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def aws_env() -> dict[str, str]:
    """This process's ``AWS_*`` variables, for Ray workers that read or write S3: a worker gets the
    environment of the node it runs on, not the driver's. (Handed over through the runtime
    environment, never through params, tags or logs.)"""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an ``s3://bucket/key`` URI."""
    uri = str(uri)
    if is_s3(uri):
        return _s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def absolute(uri: str | os.PathLike) -> str:
    """An ``s3://`` URI as it is; a local path made absolute (Ray workers run in other folders)."""
    return str(uri) if is_s3(uri) else str(Path(uri).absolute())


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str | os.PathLike, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under a folder or prefix (as URIs of the same kind), sorted; [] if it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [f"s3://{f}" for f in files] if is_s3(uri) else files


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} does not exist") from e


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write atomically: readers see the old content or the whole new content, never a part."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def delete(uri: str | os.PathLike) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def check_writable(uri: str | os.PathLike) -> None:
    """Fail early, naming the destination, when it cannot be written (bad bucket, read-only dir)."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise PermissionError(f"cannot write to {uri}: {e}. Check the path, bucket and AWS credentials.") from e


# Folder outputs that appear whole or not at all (used by the prepare and encode stages).

def remove_temporaries(uri: str | os.PathLike) -> int:
    """Delete what killed writers left under ``uri`` (``*.tmp-*`` files of ``write_bytes``);
    returns how many. Only local folders have them: an S3 upload is never visible half done."""
    if is_s3(uri):
        return 0
    stale = [f for f in list_files(uri) if ".tmp-" in os.path.basename(f)]
    for f in stale:
        delete(f)
    return len(stale)


def begin_output(uri: str | os.PathLike) -> str:
    """Start writing a folder output; returns where to write it. Locally: a fresh temporary sibling
    folder that ``commit_output`` renames into place. On S3 (no rename): the destination itself,
    emptied first, so that stale files of an earlier run cannot pass for part of this one; there
    the marker file the stage writes last (manifest.json, stats.json) is what says "complete"."""
    uri = str(uri)
    if is_s3(uri):
        fs, path = resolve(uri)
        fs.delete_dir_contents(path, missing_dir_ok=True)  # the contents: never the bucket itself
        return uri
    path = Path(uri).absolute()
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    return str(staging)


def commit_output(staging: str, uri: str | os.PathLike) -> None:
    """Finish ``begin_output``: replace the destination folder with the staging one."""
    uri = str(uri)
    if is_s3(uri):
        return
    import shutil

    path = Path(uri).absolute()
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)


def abort_output(staging: str, uri: str | os.PathLike) -> None:
    """Remove what a failed ``begin_output`` left (locally the staging folder; on S3 the partial
    files, none of which is the completion marker)."""
    if is_s3(uri):
        fs, path = resolve(uri)
        fs.delete_dir_contents(path, missing_dir_ok=True)
    elif os.path.isdir(staging):
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


def download_folder(uri: str | os.PathLike, local_dir: str | os.PathLike) -> str:
    """Copy every file under ``uri`` (local or s3://) into ``local_dir``; returns ``local_dir``."""
    root = str(uri).rstrip("/")
    for f in list_files(root):
        rel = f[len(root):].lstrip("/")
        dest = Path(local_dir, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(f))
    return str(local_dir)


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike, marker: str) -> Iterator[str]:
    """A local folder with the content of ``uri``: the folder itself when local (or not a path at
    all, e.g. a Hugging Face id), else a temporary download of the ``s3://`` folder, which must hold
    ``marker`` (the file written last, that marks it complete)."""
    if not is_s3(uri):
        yield str(uri)
        return
    if not exists(join(uri, marker)):
        raise FileNotFoundError(f"{join(uri, marker)} not found: {uri} is not a complete folder (its stage did not finish)")
    with tempfile.TemporaryDirectory() as tmp:
        yield download_folder(uri, tmp)


def upload_folder(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy every file under a local folder to ``uri`` (local or s3://)."""
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            write_bytes(join(uri, str(f.relative_to(local_dir))), f.read_bytes())
