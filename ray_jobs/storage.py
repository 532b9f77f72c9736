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
from typing import IO, Any, Iterator

import pyarrow.fs as pafs

from dit_core.contract import LOCATION_FILE, VERSION_KEY, VERSION_PREFIX


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


@contextlib.contextmanager
def open_output(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A local file to write ``uri`` into; it appears at ``uri`` (renamed, or uploaded in chunks to
    S3) only when the block ends without an error: readers see the old content or the whole new
    content, never a part. Memory: none beyond the copy buffer."""
    import shutil

    fs, path = resolve(uri)
    if is_s3(uri):
        tmp = os.path.join(tempfile.gettempdir(), f"{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"   # remove_temporaries clears it if the writer is killed
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if is_s3(uri):
            with open(tmp, "rb") as src, fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write atomically: readers see the old content or the whole new content, never a part (an S3
    object appears whole when its upload completes)."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    with open_output(uri) as f:
        f.write(data)


@contextlib.contextmanager
def publishing(out: str, record: str) -> Iterator[str]:
    """A new version folder of the published folder ``out`` (local or s3://) to write into, the
    record file ``record`` last: committed (``out`` then reads as the new version) when the block
    ends, removed when it raises; readers of ``out`` never see a part of it."""
    staging = begin_output(out, record)
    try:
        yield staging
        commit_output(staging, out, record)
    except BaseException:
        abort_output(staging, out)
        raise


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


# Folder outputs, published atomically (prepare, train_autoencoder, encode, train_classifier).
#
# <out>/<marker>        the stage's record (manifest.json, stats.json, ...) plus "version": the commit point,
#                       written last in one write (a rename locally, one PUT on S3)
# <out>/v-<n>/          the files of that publish, its own copy of the record included (n: one more
#                       than the published version's; v-1 in a fresh folder)
#
# A run writes a fresh version folder, then the record that names it; then the versions it does
# not name are deleted. So a failed or killed run never touches the output readers see, and the
# next run removes what it left. Readers resolve the folder through ``current`` (or
# ``version_folder`` when they hold the record already); an output written before versions existed
# (no "version" in its record) is its own folder.


def version_folder(uri: str | os.PathLike, record: dict[str, Any]) -> str:
    """The folder holding the files of the output ``uri`` whose top-level record is ``record``."""
    version = record.get(VERSION_KEY)
    return join(uri, version) if version else str(uri)


def current(uri: str | os.PathLike, marker: str) -> str:
    """The folder of the published content of the folder output ``uri``: the version its ``marker``
    names, or ``uri`` itself for an output written before versions (and for a version folder)."""
    record_uri = join(uri, marker)
    try:
        record = read_json(record_uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{record_uri} not found: {uri} holds no published output (its stage never "
                                "finished there); run the stage that writes it") from None
    return version_folder(uri, record)


def _entries(uri: str | os.PathLike) -> list[str]:
    """The names directly under a folder or prefix ([] when it does not exist)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted({i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos} - {""})


def _next_version(committed: str | None) -> str:
    """``v-<n+1>`` after the committed ``v-<n>`` (``v-1`` first). A fresh output is always ``v-1``:
    DVC deletes a stage's outputs before it runs it, so the same content gives the same folder
    and hash, and the stages after it are not re-run."""
    number = committed[len(VERSION_PREFIX):] if committed else ""
    return f"{VERSION_PREFIX}{int(number) + 1 if number.isdigit() else 1}"


def _committed_version(uri: str | os.PathLike, marker: str) -> str | None:
    try:
        return read_json(join(uri, marker)).get(VERSION_KEY)
    except (FileNotFoundError, ValueError):  # none yet, or a half-written record of code before versions
        return None


def remove_temporaries(uri: str | os.PathLike) -> int:
    """Delete what killed writers left under ``uri`` (``*.tmp-*`` files of ``write_bytes``);
    returns how many. Only local folders have them: an S3 upload is never visible half done."""
    if is_s3(uri):
        return 0
    stale = [f for f in list_files(uri) if ".tmp-" in os.path.basename(f)]
    for f in stale:
        delete(f)
    return len(stale)


def begin_output(uri: str | os.PathLike, marker: str) -> str:
    """Start publishing the folder output ``uri`` whose record is ``marker``; returns the fresh
    version folder to write into (the record last). First removes what killed runs left: version
    folders the record does not name, temporary files, and the staging siblings
    (``.<name>.tmp-*``) of the code before versions. The published output stays as it is."""
    uri = absolute(uri)
    keep = _committed_version(uri, marker)
    for name in _entries(uri):
        if (name.startswith(VERSION_PREFIX) and name != keep) or ".tmp-" in name:
            delete(join(uri, name))
    if not is_s3(uri):
        import shutil

        for stale in Path(uri).parent.glob(f".{Path(uri).name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = join(uri, _next_version(keep))
    makedirs(staging)
    return staging


def commit_output(staging: str, uri: str | os.PathLike, marker: str) -> dict[str, Any]:
    """Publish the version ``staging`` (from ``begin_output``, its ``marker`` written): write the
    top-level record naming it (the commit point), then delete everything else under ``uri``
    (older versions, files of an output written before versions). Returns the published record."""
    uri = absolute(uri)
    version = staging.rstrip("/").rsplit("/", 1)[-1]
    if join(uri, version) != staging.rstrip("/"):
        raise ValueError(f"{staging} is not a version folder of {uri}: pass what begin_output({uri!r}) returned")
    try:
        record = read_json(join(staging, marker))
    except FileNotFoundError:
        raise FileNotFoundError(f"{join(staging, marker)} not found: write the record into the version folder "
                                "before committing it") from None
    published = {**record, VERSION_KEY: version}
    write_json(join(uri, marker), published)
    for name in _entries(uri):
        if name not in (marker, version):
            delete(join(uri, name))
    return published


def abort_output(staging: str, uri: str | os.PathLike) -> None:
    """Remove the version folder of a failed run; the published output stays. Locally, a folder
    left empty (no earlier output) goes too."""
    delete(staging)
    if not is_s3(uri) and os.path.isdir(uri) and not os.listdir(uri):
        os.rmdir(uri)


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
    """A local folder with the published content of the folder output ``uri`` (``current``): the
    version folder itself when local, else a temporary download of it from ``s3://``. A local
    path without ``marker`` (or no path at all, e.g. a Hugging Face id) is given as it is."""
    if not is_s3(uri):
        yield current(uri, marker) if os.path.isfile(join(uri, marker)) else str(uri)
        return
    folder = current(uri, marker)
    with tempfile.TemporaryDirectory() as tmp:
        yield download_folder(folder, tmp)


def located(path: str | None) -> str | None:
    """The URI of a stage's output: what its pointer (``<path>/location.json``, written when
    ``store.root`` is set) names, else the path itself."""
    if path and not is_s3(path):
        pointer = os.path.join(path, LOCATION_FILE)
        if os.path.isfile(pointer):
            return str(read_json(pointer)["uri"])
    return path


def publish_folder(local_dir: str | os.PathLike, uri: str | os.PathLike, last: str) -> None:
    """Replace the folder ``uri`` (local or s3://) with a copy of ``local_dir`` whose file ``last`` is
    written last: locally a sibling renamed into place (readers see the old folder or the whole
    new one), on S3 the old objects deleted and ``last`` (the record that lists the rest) put after them."""
    if not is_s3(uri):
        import shutil

        dest = Path(uri).absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, staging)
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    delete(uri)
    files = sorted(Path(local_dir).rglob("*"), key=lambda f: (f.name == last, str(f)))
    for f in files:
        if f.is_file():
            write_bytes(join(uri, str(f.relative_to(local_dir))), f.read_bytes())


def upload_folder(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy every file under a local folder to ``uri`` (local or s3://)."""
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            write_bytes(join(uri, str(f.relative_to(local_dir))), f.read_bytes())
