"""ray_jobs.storage against the local filesystem and a real S3-compatible server."""

from __future__ import annotations

import os

import pytest

from ray_jobs import storage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_round_trip_and_listing(kind, tmp_path, request):
    root = str(tmp_path / "root") if kind == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/prefix"
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"abc")
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert storage.read_bytes(storage.join(root, "a", "b", "y.bin")) == b"abc"
    assert storage.exists(storage.join(root, "a", "x.json"))
    assert not storage.exists(storage.join(root, "nope"))
    files = storage.list_files(root)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["y.bin", "x.json"] or len(files) == 2
    assert storage.list_files(root, suffix=".json") == [storage.join(root, "a", "x.json")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_bytes(storage.join(root, "missing.bin"))
    storage.check_writable(root)


def test_local_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out.bin"
    storage.write_bytes(target, b"1")
    storage.write_bytes(target, b"22")
    assert target.read_bytes() == b"22"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_unwritable_destinations_are_named(tmp_path, s3_server):
    with pytest.raises(PermissionError, match="cannot write to s3://no-such-bucket-xyz"):
        storage.check_writable("s3://no-such-bucket-xyz/out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permission bits
        with pytest.raises(PermissionError, match="cannot write to"):
            storage.check_writable(ro)
