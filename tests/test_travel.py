"""Issue 24: the trained model travels with the project. In a `git clone` of the repository under
test, one `dvc repro` on tiny settings (shared by the tests), then:
- `dvc push` to a local DVC remote and to S3; a second clone's `dvc pull` gets the model, `dvc status`
  has nothing to run, and `dit generate --model models/dit` there (no mlflow.db) writes the image
  the first clone's model writes;
- `dvc exp run --temp` of a sample-only change re-runs only sample and evaluate; two experiments
  queued and run with `dvc queue start -j 2` land in `dvc exp show` with their FIDs, and their MLflow
  runs, versions and checkpoints in the workspace's store, not in DVC's temporary copies;
- the flow model exported (`dit export --model models/dit`) samples with plain diffusers, and its
  images at guidance 2 read as their class by the project's classifier at the bulk sampler's rate;
- a model trained on an image folder named `flowers` is registered as `dit-flowers`."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fixtures_data import VENV_BIN, clone_project, run, stage_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]   # its first test also waits for the module's repro

DVC = str(VENV_BIN / "dvc")
DIT = str(VENV_BIN / "dit")
# small enough for two shared cores: the mechanics are under test here, not the quality
TINY = {
    "train_autoencoder": {"steps": 60},
    "train": {"steps": 40, "batch_size": 64, "log_every": 20, "checkpoint_every": 40, "warmup_steps": 10,
              "model": {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 4, "class_embed_init_std": 1.0}},
    "train_classifier": {"steps": 60},
    # euler: the sampler of the exported folder's pipeline (test (c) compares the two on the same noise)
    "sample": {"num_images": 100, "baseline_images": 50, "batch_size": 50, "images_per_shard": 50, "sampler": "euler",
               "num_steps": 8, "grid_per_class": 2},
}
ISOLATE = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT", "RAY_ADDRESS")  # the workspace's defaults, as a user has them


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def user_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = stage_env({"PYTHONPATH": str(root)})
    for name in ISOLATE:
        env.pop(name, None)
    return {**env, **(extra or {})}


def registry(root: Path):
    from mlflow import MlflowClient

    db = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=db, registry_uri=db)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A clone after `dvc repro` on tiny settings, its result committed as the README says."""
    root = clone_project(tmp_path_factory.mktemp("travel") / "project")
    env = user_env(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.time()
    run([DVC, "repro"], root, env, timeout=1500)
    print(f"tiny dvc repro: {time.time() - start:.0f}s")
    run(["git", "add", "params.yaml", "dvc.lock", "metrics"], root, env)
    run(["git", "commit", "-qm", "tiny run"], root, env)
    return {"root": root, "env": env}


def generate(root: Path, env: dict[str, str], out: Path) -> bytes:
    run([DIT, "generate", "--model", "models/dit", "--labels", "3", "--seeds", "0", "--out", str(out)], root, env)
    return out.read_bytes()


def test_model_is_a_cached_output_and_travels_with_push_and_pull(project, tmp_path, s3_server, s3_bucket):
    root, env = project["root"], {**project["env"], **s3_server}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["train"]["outs"]}
    assert "models/dit" in outs and outs["models/dit"]["md5"].endswith(".dir")   # cached, a folder
    trained = json.loads((root / "models/dit/trained.json").read_text())
    assert trained["registered_model"] == "dit-digits" and trained["model_uri"] == f"models:/dit-digits/{trained['version']}"
    first = generate(root, env, tmp_path / "first.png")

    remote = tmp_path / "dvc-remote"
    run([DVC, "remote", "add", "--local", "-d", "here", str(remote)], root, env)
    run([DVC, "remote", "add", "--local", "s3", f"s3://{s3_bucket}/dvcstore"], root, env)
    run([DVC, "remote", "modify", "--local", "s3", "endpointurl", s3_server["AWS_ENDPOINT_URL"]], root, env)
    run([DVC, "push"], root, env)
    run([DVC, "push", "-r", "s3"], root, env)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(root), str(second)], tmp_path, env)
    env2 = user_env(second, s3_server)
    run([DVC, "remote", "add", "--local", "-d", "here", str(remote)], second, env2)
    run([DVC, "pull"], second, env2)
    status = run([DVC, "status"], second, env2)
    assert "up to date" in status.stdout and "changed" not in status.stdout, status.stdout
    assert generate(second, env2, tmp_path / "second.png") == first
    assert not (second / "mlflow.db").exists() and not (second / "checkpoints").exists()

    # the same from the S3 remote, with an empty cache
    shutil.rmtree(second / ".dvc/cache")
    shutil.rmtree(second / "models/dit")
    run([DVC, "remote", "add", "--local", "s3", f"s3://{s3_bucket}/dvcstore"], second, env2)
    run([DVC, "remote", "modify", "--local", "s3", "endpointurl", s3_server["AWS_ENDPOINT_URL"]], second, env2)
    run([DVC, "pull", "-r", "s3"], second, env2)
    assert generate(second, env2, tmp_path / "third.png") == first
    assert "up to date" in run([DVC, "status"], second, env2).stdout


def test_sample_only_experiment_in_a_temporary_copy_reruns_only_sample_and_evaluate(project):
    root, env = project["root"], project["env"]
    trained = json.loads((root / "models/dit/trained.json").read_text())
    client = registry(root)
    before = len(client.get_metric_history(trained["mlflow_run_id"], "eval.fid"))
    proc = run([DVC, "exp", "run", "--temp", "-n", "g15", "-S", "sample.guidance_scale=1.5"], root, env, timeout=900)
    assert ran_stages(proc.stdout + proc.stderr) == {"sample", "evaluate"}
    # its evaluation went to the workspace's store (the version it sampled), not to the copy's
    assert len(client.get_metric_history(trained["mlflow_run_id"], "eval.fid")) == before + 1


def exp_rows(shown: list) -> dict[str, dict]:
    rows = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs", []):
                if rev.get("name"):
                    rows[rev["name"]] = rev
    return rows


def test_two_queued_experiments_side_by_side_keep_everything(project):
    root, env = project["root"], project["env"]
    client = registry(root)
    for name, steps in (("q30", 30), ("q50", 50)):
        run([DVC, "exp", "run", "--queue", "-n", name, "-S", f"train.steps={steps}", "-S", "train.checkpoint_every=10"],
            root, env)
    run([DVC, "queue", "start", "-j", "2"], root, env)
    deadline = time.time() + 1800
    try:
        while True:
            status = run([DVC, "queue", "status"], root, env).stdout
            if not re.search(r"\b(Running|Queued)\b", status):
                break
            assert time.time() < deadline, status
            time.sleep(10)
    finally:
        run([DVC, "queue", "stop"], root, env)
    assert "Failed" not in status, status + "".join(
        run([DVC, "queue", "logs", n], root, env).stdout[-4000:] for n in ("q30", "q50"))

    rows = exp_rows(json.loads(run([DVC, "exp", "show", "--json"], root, env).stdout))
    for name, steps in (("q30", 30), ("q50", 50)):
        data = rows[name]["data"]
        ev = data["metrics"]["metrics/eval.json"]["data"]
        assert ev["fid"] > 0 and 0 <= ev["class_accuracy"] <= 1
        train = data["metrics"]["metrics/train.json"]["data"]
        assert train["steps"] == steps
        # its run, its registered version and its checkpoints are the workspace's
        versions = [v for v in client.search_model_versions("name = 'dit-digits'") if v.tags.get("run_name") == train["run_name"]]
        assert len(versions) == 1, versions
        version = versions[0]
        assert float(version.tags["fid"]) == pytest.approx(ev["fid"], rel=1e-4)
        assert client.get_run(version.run_id).info.status == "FINISHED"
        kept = sorted(p.name for p in (root / "checkpoints" / train["run_name"]).glob("checkpoint_[0-9]*"))
        assert kept[-1] == f"checkpoint_{steps:08d}", kept
    assert not list((root / ".dvc/tmp/exps").glob("*/mlflow.db"))

    # `dvc exp apply` brings an experiment's model back into the workspace
    run([DVC, "exp", "apply", "q30"], root, env)
    trained = json.loads((root / "models/dit/trained.json").read_text())
    assert trained["step"] == 30 and trained["name"] == rows["q30"]["data"]["metrics"]["metrics/train.json"]["data"]["run_name"]
    run(["git", "checkout", "--", "."], root, env)
    run([DVC, "checkout"], root, env)


def _flowers(folder: Path, per_class: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate(("rose", "tulip")):
        (folder / colour).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] += 180
            Image.fromarray(pixels).save(folder / colour / f"{i}.png")


def test_a_model_of_a_folder_named_flowers_is_registered_as_dit_flowers(project, tmp_path):
    """prepare records the data set's name; the train stage registers under dit-<name>."""
    root = project["root"]
    _flowers(tmp_path / "images" / "flowers")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"].update({"source": "imagefolder", "path": str(tmp_path / "images" / "flowers"), "val_fraction": 0.2})
    params["train"].update({"steps": 10, "batch_size": 16, "log_every": 5, "checkpoint_every": 10,
                            "storage_path": str(tmp_path / "ckpt")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = user_env(root, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    p = ["--params", str(tmp_path / "params.yaml")]
    run(["python", "-m", "pipelines.prepare", "--out", str(tmp_path / "prepared"), *p], root, env)
    assert json.loads((tmp_path / "prepared/manifest.json").read_text())["dataset"] == "flowers"
    run(["python", "-m", "pipelines.encode", "--prepared", str(tmp_path / "prepared"), "--autoencoder",
         str(root / "models/autoencoder"), "--out", str(tmp_path / "latents"), *p], root, env)
    run(["python", "-m", "pipelines.train", "--latents", str(tmp_path / "latents"), "--out", str(tmp_path / "dit"),
         "--metrics", str(tmp_path / "train.json"), *p], root, env)
    trained = json.loads((tmp_path / "dit/trained.json").read_text())
    assert trained["registered_model"] == "dit-flowers" and trained["name"].startswith("dit-flowers-")
    client = registry(tmp_path)
    assert [str(v.version) for v in client.search_model_versions("name = 'dit-flowers'")] == [trained["version"]]
    assert client.search_model_versions("name = 'dit-digits'") == []


PLAIN_DIFFUSERS = """
import sys
for name in ("dit_core", "ray_jobs", "pipelines"):   # a Python without this project
    sys.modules[name] = None
import numpy as np, torch
from diffusers import DiffusionPipeline
folder, inputs, out = sys.argv[1:]
given = torch.load(inputs)
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True, local_files_only=True)
images = pipe(class_labels=given["labels"], guidance_scale=2.0, num_inference_steps=given["steps"], latents=given["noise"],
              output_type="np").images
np.save(out, (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
"""


def test_exported_flow_model_reads_as_its_class_with_plain_diffusers(project, tmp_path):
    """(c): `dit export --model models/dit`, loaded by plain diffusers in a Python without this
    project, fed the bulk sampler's noise for the sampled (label, seed) rows at guidance 2: the
    project's classifier reads its images as their class at the bulk sampler's rate, within 0.05."""
    import subprocess
    import sys

    import pyarrow.parquet as pq
    import torch

    from dit_core.classifier import load_classifier, predict
    from dit_core.contract import CLASSIFIER_CONFIG_FILE
    from dit_core.data import pngs_to_batch
    from dit_core.diffusion import randn
    from ray_jobs import storage

    root, env = project["root"], project["env"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["objective"] == "flow" and params["sample"]["guidance_scale"] == 2.0
    run([DIT, "export", "--model", "models/dit", str(tmp_path / "pipe")], root, env)
    import pyarrow as pa

    rows = pa.concat_tables([pq.read_table(p) for p in sorted((root / "samples/parquet").glob("shard-*.parquet"))])
    labels, seeds = rows.column("label").to_pylist(), rows.column("seed").to_pylist()
    assert len(labels) == params["sample"]["num_images"]
    config = json.loads((root / "models/dit/dit.json").read_text())["model_config"]
    shape = (len(seeds), config["in_channels"], config["input_size"], config["input_size"])
    noise = randn(shape, [torch.Generator().manual_seed(int(s)) for s in seeds])
    torch.save({"labels": labels, "noise": noise, "steps": params["sample"]["num_steps"]}, tmp_path / "inputs.pt")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_DIFFUSERS, str(tmp_path / "pipe"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "images.npy")], cwd=tmp_path / "empty", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = torch.from_numpy(np.load(tmp_path / "images.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1
    with storage.local_copy(str(root / "models/classifier"), CLASSIFIER_CONFIG_FILE) as folder:
        classifier, _ = load_classifier(folder)
    bulk = pngs_to_batch(rows.column("image").to_pylist())
    truth = np.asarray(labels)
    rate_exported = float((predict(classifier, exported) == truth).mean())
    rate_bulk = float((predict(classifier, bulk) == truth).mean())
    print(f"class accuracy at guidance 2: exported {rate_exported:.3f}, bulk sampler {rate_bulk:.3f}")
    assert abs(rate_exported - rate_bulk) <= 0.05
