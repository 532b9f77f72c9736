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


def _names(uri: str) -> set[str]:
    return {f[len(uri) + 1:] for f in storage.list_files(uri)}


def _publish(out: str, files: dict[str, bytes], record: dict) -> str:
    staging = storage.begin_output(out, "rec.json")
    for name, data in files.items():
        storage.write_bytes(storage.join(staging, name), data)
    storage.write_json(storage.join(staging, "rec.json"), record)
    return storage.commit_output(staging, out, "rec.json")["version"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_folder_outputs_publish_versions_and_clean_up(kind, tmp_path, request):
    """The record names the version; a begun (killed or failed) version never shows and the next
    run removes it; a commit leaves the record and its version alone."""
    out = str(tmp_path / "out") if kind == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    with pytest.raises(FileNotFoundError, match="rec.json not found.*run the stage"):
        storage.current(out, "rec.json")
    first = _publish(out, {"a/x.bin": b"1"}, {"n": 1})
    assert _names(out) == {"rec.json", f"{first}/a/x.bin", f"{first}/rec.json"}
    assert storage.read_json(storage.join(out, "rec.json")) == {"n": 1, "version": first}
    assert storage.current(out, "rec.json") == storage.join(storage.absolute(out), first)
    assert storage.current(storage.current(out, "rec.json"), "rec.json") == storage.current(out, "rec.json")

    killed = storage.begin_output(out, "rec.json")         # a run that dies mid-write ...
    storage.write_bytes(storage.join(killed, "a/x.bin"), b"half")
    assert storage.read_bytes(storage.join(storage.current(out, "rec.json"), "a/x.bin")) == b"1"  # ... shows nothing
    failed = storage.begin_output(out, "rec.json")         # the next run removes what it wrote
    assert not storage.exists(storage.join(killed, "a/x.bin")) and storage.exists(storage.join(out, first, "a/x.bin"))
    storage.write_bytes(storage.join(failed, "a/x.bin"), b"2")
    storage.abort_output(failed, out)                      # a failure removes its own version only
    assert _names(out) == {"rec.json", f"{first}/a/x.bin", f"{first}/rec.json"}

    second = _publish(out, {"b.bin": b"2"}, {"n": 2})
    assert _names(out) == {"rec.json", f"{second}/b.bin", f"{second}/rec.json"}
    assert storage.read_bytes(storage.join(storage.current(out, "rec.json"), "b.bin")) == b"2"
    # the names: v-1 in an empty folder (so the same content under DVC, which empties a stage's
    # outputs first, hashes the same), then one more than the published version
    assert (first, second) == ("v-1", "v-2")


def test_output_written_before_versions_is_read_and_replaced(tmp_path):
    """A folder with its record at the top and no version (and the staging sibling a killed run of
    that code left) reads as itself; the next publish replaces it whole and removes the sibling."""
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "x.bin").write_bytes(b"old")
    (out / "rec.json").write_text('{"n": 0}')
    (tmp_path / ".out.tmp-1234abcd" / "a").mkdir(parents=True)
    assert storage.current(str(out), "rec.json") == str(out)
    storage.abort_output(storage.begin_output(str(out), "rec.json"), str(out))
    assert not (tmp_path / ".out.tmp-1234abcd").exists() and (out / "a" / "x.bin").read_bytes() == b"old"
    version = _publish(str(out), {"y.bin": b"new"}, {"n": 1})
    assert _names(str(out)) == {"rec.json", f"{version}/y.bin", f"{version}/rec.json"}
    with storage.local_copy(str(out), "rec.json") as folder:
        assert folder == str(out / version)


def test_first_failed_publish_leaves_no_folder(tmp_path):
    out = str(tmp_path / "out")
    storage.abort_output(storage.begin_output(out, "rec.json"), out)
    assert not os.path.exists(out)


def test_publishing_commits_a_whole_version_or_nothing(tmp_path):
    """The one publish helper both training stages use: the block's version is published when it
    ends, and a block that raises leaves the published version as it was and nothing beside it."""
    out = str(tmp_path / "out")
    with storage.publishing(out, "rec.json") as staging:
        storage.write_bytes(storage.join(staging, "x.bin"), b"1")
        storage.write_json(storage.join(staging, "rec.json"), {"n": 1})
        assert not os.path.exists(storage.join(out, "rec.json")), "nothing shows before the block ends"
    first = storage.current(out, "rec.json")
    assert storage.read_bytes(storage.join(first, "x.bin")) == b"1"
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with storage.publishing(out, "rec.json") as staging:
            storage.write_bytes(storage.join(staging, "x.bin"), b"2")
            raise RuntimeError("killed mid-write")
    assert storage.current(out, "rec.json") == first and storage.read_bytes(storage.join(first, "x.bin")) == b"1"
    assert _names(out) == {"rec.json", "v-1/x.bin", "v-1/rec.json"}


def test_open_output_shows_the_file_only_when_whole(tmp_path):
    path = tmp_path / "big" / "file.bin"
    with storage.open_output(str(path)) as f:
        f.write(b"part")
        assert not path.exists(), "a reader never sees a part"
        f.write(b" and the rest")
    assert path.read_bytes() == b"part and the rest"
    with pytest.raises(ValueError, match="broken"):
        with storage.open_output(str(path)) as f:
            f.write(b"new")
            raise ValueError("broken")
    assert path.read_bytes() == b"part and the rest" and os.listdir(path.parent) == ["file.bin"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_model_folder_written_whole_and_read_back_through_its_pointer(kind, tmp_path, request):
    """The train stage's model folder from a final checkpoint, locally or in the store with the
    project keeping location.json (store.root set): it loads to the checkpoint's EMA weights and
    names the registered version; a second write replaces the first whole."""
    import torch

    from dit_core.models import DiT, DiTConfig
    from pipelines.common import write_location
    from dit_core.contract import TRAINED_RECORD_FILE
    from ray_jobs.model_source import load_bundle, save_trained_model, state_digest

    model = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3, learn_sigma=False))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ckpt = tmp_path / "ckpt" / "state.pt"
    ckpt.parent.mkdir()
    torch.save({"ema": model.state_dict(), "model": model.state_dict(), "model_config": model.config.to_dict(),
                "diffusion": {"objective": "flow", "diffusion_steps": 1000, "learn_sigma": False},
                "latents": {"class_names": ["a", "b", "c"], "scale_factor": 1.0}}, ckpt)
    local = tmp_path / "models" / "dit"
    out = str(local) if kind == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/dit/models/dit"
    record = {"registered_model": "dit-test", "version": "4", "mlflow_run_id": "r", "model_uri": "models:/dit-test/4"}
    for _ in range(2):
        save_trained_model(str(ckpt), out, record)
    if kind == "s3":
        write_location(str(local), out)
        assert sorted(os.listdir(local)) == ["location.json"]
    else:
        assert not [p for p in os.listdir(local.parent) if p != "dit"]   # no staging left beside it
    assert storage.read_json(storage.join(out, TRAINED_RECORD_FILE)) == record
    bundle = load_bundle(str(local))
    assert bundle.weights_digest() == state_digest(model.state_dict())
    assert bundle.diffusion["objective"] == "flow" and bundle.latents["class_names"] == ["a", "b", "c"]
    assert bundle.pinned_uri == "models:/dit-test/4"


def test_a_second_start_of_the_same_run_waits_for_the_first(tmp_path):
    """Two queued experiments with the same settings share a run name: the second start waits for
    the first process's lock (then resumes from its checkpoint) instead of writing beside it."""
    import subprocess
    import sys
    import time

    from ray_jobs.checkpoints import run_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from ray_jobs.checkpoints import run_lock\n"
        f"with run_lock({str(tmp_path)!r}, 'dit-digits-abc', log=lambda m: None):\n"
        "    print('held', flush=True); time.sleep(3)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said: list[str] = []
        start = time.monotonic()
        with run_lock(str(tmp_path), "dit-digits-abc", log=said.append):
            waited = time.monotonic() - start
        assert waited > 1.5, waited   # it held the lock for 3 s
        assert len(said) == 1 and "waiting for it to finish" in said[0] and "dit-digits-abc" in said[0]
        with run_lock(str(tmp_path), "dit-digits-other", log=said.append):   # another run does not wait
            pass
        assert len(said) == 1
    finally:
        holder.wait(timeout=30)
