"""End to end through DVC, in a `git clone` of the repository under test, as a user runs it (the
clone's own .gitignore, dvc.yaml and params.yaml; the README's `make run` is `dvc repro` with the
venv on PATH): the digits default `dvc repro encode` (time budget, outputs, a classifier still
recognising reconstructions), then the rest of the pipeline (`dvc repro`: train, classifier,
sample, evaluate) with the quality bar and time budget and the model version's records in MLflow,
a second repro doing nothing, DVC experiments (`dvc exp run -S`, `exp show`, `metrics diff`,
`plots show` / `plots diff`), param changes re-running exactly the stages after them, and
`dvc push`/`pull` through an S3 remote on the session's moto server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.fixtures_data import VENV_BIN, clone_project, run, stage_env

# the module fixture runs the whole default `dvc repro` inside the first test: its subprocess timeouts
# (4 x 300 s, 3 x 900 s) bound it, not the suite-wide 900 s (a loaded machine exceeded that)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * 300 + 3 * 900 + 300)]

DEFAULT_BUDGET_S = 300  # issue 3: `dvc repro encode` on the defaults within 5 minutes on 2 cores
PIPELINE_BUDGET_S = 900  # issue 5: the whole `dvc repro` from a clean clone within 15 minutes
DVC = str(VENV_BIN / "dvc")
STAGES = ("prepare", "train_autoencoder", "encode")


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A clone of the repository after the default `dvc repro encode` and then `dvc repro`, with
    how long each took. (It fails, as a new user's `make run` did, if the clone's .gitignore
    ignores dvc.lock or anything else keeps the committed tree from running.)"""
    root = clone_project(tmp_path_factory.mktemp("dvcproj") / "project")
    env = stage_env({"PYTHONPATH": str(root)})
    start = time.time()
    proc = run([DVC, "repro", "encode"], root, env, timeout=4 * DEFAULT_BUDGET_S)
    seconds = time.time() - start
    load = os.getloadavg()[1]
    print(f"default dvc repro encode: {seconds:.0f}s, 5-min load average {load:.1f}")
    rest = run([DVC, "repro"], root, env, timeout=3 * PIPELINE_BUDGET_S)
    total = time.time() - start
    print(f"default dvc repro (all stages): {total:.0f}s, 5-min load average {os.getloadavg()[1]:.1f}")
    return {"root": root, "env": env, "seconds": seconds, "output": proc.stdout + proc.stderr, "load": load,
            "total_seconds": total, "rest_output": rest.stdout + rest.stderr}


def contention() -> float:
    """How many times over the cores were subscribed by *other* work during the run (1 = idle
    machine): the budget is for 2 free cores, and CI machines are shared with other test runs.
    Our own run keeps about os.cpu_count() busy, so only the load above that counts."""
    cores = os.cpu_count() or 1
    return 1.0 + max(0.0, os.getloadavg()[1] - cores) / cores


def test_default_repro_within_budget_and_complete(project):
    root = project["root"]
    assert ran_stages(project["output"]) == set(STAGES)
    manifest = yaml.safe_load((root / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 1797
    assert manifest["skipped"] == [] and manifest["num_classes"] == 10
    stats = yaml.safe_load((root / "data/latents/stats.json").read_text())
    record = yaml.safe_load((root / "models/autoencoder/autoencoder.json").read_text())
    assert stats["latent_shape"] == [4, 8, 8]  # 16x16x3 images, 4 channels, downsample 2
    assert stats["scale_factor"] == pytest.approx(record["scale_factor"])
    assert stats["input_fingerprint"] == manifest["fingerprint"]
    metrics = yaml.safe_load((root / "metrics/autoencoder.json").read_text())
    assert metrics["val_reconstruction_mse"] < 0.01
    budget = DEFAULT_BUDGET_S * contention()
    assert project["seconds"] < budget, (
        f"default dvc repro encode took {project['seconds']:.0f}s, budget {budget:.0f}s "
        f"({DEFAULT_BUDGET_S}s on free cores; load average {project['load']:.1f})")


def test_default_autoencoder_keeps_digits_recognisable(project):
    """A classifier trained on the prepared training images recognises decoded val latents about
    as well as the val images themselves."""
    from sklearn.linear_model import LogisticRegression

    from dit_core.autoencoders import load_autoencoder
    from dit_core.data import pngs_to_batch

    root = project["root"]
    from ray_jobs import storage

    prepared_dir = storage.current(root / "data/prepared", "manifest.json")   # the published version
    prepared = {s: pq.read_table(storage.join(prepared_dir, s)) for s in ("train", "val")}
    x_train = pngs_to_batch(prepared["train"].column("image").to_pylist()).flatten(1).numpy()
    clf = LogisticRegression(max_iter=2000).fit(x_train, prepared["train"].column("label").to_numpy())
    val = pq.read_table(storage.join(storage.current(root / "data/latents", "stats.json"), "val"))
    stats = yaml.safe_load((root / "data/latents/stats.json").read_text())
    means = np.stack(val.column("mean").to_numpy(zero_copy_only=False)).reshape(-1, *stats["latent_shape"])
    ae = load_autoencoder(root / "models/autoencoder")
    decoded = ae.decode(torch.from_numpy(means)).flatten(1).numpy()
    # latents are stored in a different row order than the prepared val shard: align by key
    order = {k: i for i, k in enumerate(prepared["val"].column("key").to_pylist())}
    x_val = pngs_to_batch(prepared["val"].column("image").to_pylist()).flatten(1).numpy()
    x_val = x_val[[order[k] for k in val.column("key").to_pylist()]]
    y_val = val.column("label").to_numpy()
    acc_images = clf.score(x_val, y_val)
    acc_decoded = clf.score(decoded, y_val)
    assert acc_images > 0.9
    assert acc_decoded > acc_images - 0.05, (acc_images, acc_decoded)


def test_whole_pipeline_meets_the_quality_bar(project):
    """Issue 5's bar for the digits default, end to end within 15 minutes on 2 cores: at least 80% of
    the samples are classified as their conditioning class and the FID is at most a quarter of the
    untrained model's; the score is recorded against the model version in MLflow and the champion
    alias points at it."""
    root = project["root"]
    assert ran_stages(project["rest_output"]) == {"train", "train_classifier", "sample", "evaluate"}
    ev = json.loads((root / "metrics/eval.json").read_text())
    print("eval.json:", json.dumps({k: v for k, v in ev.items() if k != "mlflow"}))
    assert ev["num_samples"] == yaml.safe_load((root / "params.yaml").read_text())["sample"]["num_images"]
    assert ev["feature_network"] == "classifier"
    assert ev["class_accuracy"] >= 0.8, ev
    assert ev["fid"] <= 0.25 * ev["fid_untrained"], ev
    # the field's table and the label-free distance, with the autoencoder's floor and the untrained baseline
    assert 0 <= ev["precision"] <= 1 and 0 <= ev["recall"] <= 1 and ev["sfid"] > 0, ev
    assert 1 <= ev["inception_score"] <= 10 and ev["pr_images"] == ev["num_samples"], ev     # 10 classes; the whole set
    assert 0 < ev["fd_label_free_floor"] < ev["fd_label_free_untrained"], ev
    assert ev["fd_label_free"] < ev["fd_label_free_untrained"], ev
    assert ev["fd_label_free_ratio_to_floor"] == pytest.approx(ev["fd_label_free"] / ev["fd_label_free_floor"])
    assert set(ev["colour_samples"]) == set(ev["colour_reference"]) == set(ev["colour_floor"]) and "saturation" in ev["colour_ratio"]
    clf = json.loads((root / "metrics/classifier.json").read_text())
    assert clf["val_accuracy"] >= 0.95, clf
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["steps"] == yaml.safe_load((root / "params.yaml").read_text())["train"]["steps"]
    assert (root / "samples/grid.png").stat().st_size > 0
    with np.load(root / "samples/samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape[0] == ev["num_samples"]

    from mlflow import MlflowClient

    pointer = json.loads((root / "models/dit/trained.json").read_text())
    assert pointer["registered_model"] == "dit-digits"   # the name follows the data set
    db = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    mv = client.get_model_version(pointer["registered_model"], pointer["version"])
    assert float(mv.tags["fid"]) == pytest.approx(ev["fid"], rel=1e-4)
    # the FID names the classifier's weights and the reference data it was measured with
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert mv.tags["fid_features"] == ev["feature_network_id"] and ev["feature_network_id"].startswith("classifier@")
    assert mv.tags["fid_reference"] == ev["reference_id"] == f"val@{manifest['fingerprint'][:16]}"
    assert float(mv.tags["fd_label_free"]) == pytest.approx(ev["fd_label_free"], rel=1e-4)
    assert mv.tags["fd_label_free_basis"] == f"{ev['fd_label_free_measure']}@{ev['reference_id']}"
    champion = client.get_model_version_by_alias(pointer["registered_model"], "champion")
    assert str(champion.version) == str(pointer["version"])
    run_ = client.get_run(pointer["mlflow_run_id"])
    assert run_.data.metrics["eval.fid"] == pytest.approx(ev["fid"])
    assert run_.data.metrics["eval.class_accuracy"] == pytest.approx(ev["class_accuracy"])
    budget = PIPELINE_BUDGET_S * contention()
    assert project["total_seconds"] < budget, f"dvc repro took {project['total_seconds']:.0f}s, budget {budget:.0f}s"


def test_second_repro_does_nothing(project):
    proc = run([DVC, "repro"], project["root"], project["env"])
    assert ran_stages(proc.stdout + proc.stderr) == set()
    status = run([DVC, "status"], project["root"], project["env"])
    assert "changed" not in status.stdout, status.stdout


def test_push_empty_cache_pull_same_data(project, s3_bucket, s3_server):
    root, env = project["root"], {**project["env"], **s3_server}  # the module env predates the server
    before = {d: tree_digest(root / d) for d in ("data/prepared", "models/autoencoder", "data/latents", "models/dit", "models/classifier",
                                                "samples")}
    run([DVC, "remote", "add", "--local", "-d", "store", f"s3://{s3_bucket}/dvcstore"], root, env)
    run([DVC, "remote", "modify", "--local", "store", "endpointurl", s3_server["AWS_ENDPOINT_URL"]], root, env)
    run([DVC, "push"], root, env)
    shutil.rmtree(root / ".dvc/cache")
    for d in before:
        shutil.rmtree(root / d)
    run([DVC, "pull"], root, env)
    assert {d: tree_digest(root / d) for d in before} == before


def test_loss_history_is_a_dvc_plot(project):
    """The train stage writes the loss of every logged step; `dvc plots show` draws it."""
    root, env = project["root"], project["env"]
    params = yaml.safe_load((root / "params.yaml").read_text())["train"]
    rows = (root / "metrics/train_loss.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:]]
    assert steps == list(range(params["log_every"], params["steps"] + 1, params["log_every"]))
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert losses[-1] < losses[0]  # it learns
    shown = json.loads(run([DVC, "plots", "show", "--json"], root, env).stdout)["data"]
    loss_plot = shown["metrics/train_loss.csv"][0]
    assert loss_plot["type"] == "vega"
    drawn = [(int(p["step"]), float(p["loss"])) for p in loss_plot["content"]["data"]["values"]]
    assert drawn == list(zip(steps, losses))
    spec = json.dumps(loss_plot["content"])
    assert loss_plot["content"]["encoding"]["x"]["field"] == "step" and '"y": {"field": "loss"' in spec


def exp_row(shown: list, name: str) -> dict:
    """The metrics and params of experiment ``name`` in `dvc exp show --json`."""
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs", []):
                if rev.get("name") == name:
                    return rev
    raise AssertionError(f"experiment {name!r} not in `dvc exp show`: {json.dumps(shown)[:3000]}")


def test_experiments_run_show_and_compare(project):
    """`dvc exp run -S` runs exactly the stages a change touches; `dvc exp show` lists fid and
    class_accuracy per experiment; `dvc metrics diff` compares two; `dvc plots diff` draws the FID
    by guidance scale across them."""
    root, env = project["root"], project["env"]
    # the user records the default run's result, as the README says
    run(["git", "add", "dvc.lock", "metrics", "params.yaml"], root, env)
    run(["git", "commit", "-qm", "default run"], root, env)
    short = run([DVC, "exp", "run", "-n", "short", "-S", "train.steps=200", "-S", "sample.num_images=200",
                 "-S", "sample.baseline_images=100"], root, env, timeout=1200)
    assert ran_stages(short.stdout + short.stderr) == {"train", "sample", "evaluate"}
    nocfg = run([DVC, "exp", "run", "-n", "nocfg", "-S", "sample.guidance_scale=1.0"], root, env, timeout=1200)
    assert ran_stages(nocfg.stdout + nocfg.stderr) == {"sample", "evaluate"}

    shown = json.loads(run([DVC, "exp", "show", "--json"], root, env).stdout)
    evals = {}
    for name in ("short", "nocfg"):
        data = exp_row(shown, name)["data"]
        ev = data["metrics"]["metrics/eval.json"]["data"]
        assert 0 <= ev["class_accuracy"] <= 1 and ev["fid"] > 0
        assert ev["fd_label_free"] > 0 and ev["fd_label_free_floor"] > 0 and ev["colour_samples"]["luminance"] > 0
        evals[name] = ev
        assert data["params"]["params.yaml"]["data"]["train"]["steps"] == 200
    assert evals["short"]["guidance_scale"] == 2.0 and evals["nocfg"]["guidance_scale"] == 1.0
    assert evals["short"]["num_samples"] == 200
    baseline = json.loads((root / "metrics/eval.json").read_text())  # the workspace holds the last experiment
    assert baseline["fid"] == pytest.approx(evals["nocfg"]["fid"])

    diff = json.loads(run([DVC, "metrics", "diff", "HEAD", "short", "--json"], root, env).stdout)
    fid = diff["metrics/eval.json"]["fid"]
    committed = json.loads(run(["git", "show", "HEAD:metrics/eval.json"], root, env).stdout)
    assert fid["old"] == pytest.approx(committed["fid"]) and fid["new"] == pytest.approx(evals["short"]["fid"])
    assert "class_accuracy" in diff["metrics/eval.json"]

    plots = json.loads(run([DVC, "plots", "diff", "short", "nocfg", "--json"], root, env).stdout)["data"]
    fid_plot = json.dumps(plots["metrics/fid.json"])
    for name in ("short", "nocfg"):
        assert name in fid_plot
    assert str(evals["short"]["fid"])[:6] in fid_plot and str(evals["nocfg"]["fid"])[:6] in fid_plot


def test_param_changes_rerun_exactly_the_stages_after(project):
    root, env = project["root"], project["env"]
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())

    # a setting that does not change the output (the digits source reads no files): prepare runs
    # again, publishes the same bytes under the same version name, and nothing after it re-runs
    params["prepare"]["read_threads"] += 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([DVC, "repro"], root, env)
    assert ran_stages(proc.stdout + proc.stderr) == {"prepare"}, proc.stdout[-2000:]

    params["encode"]["batch_size"] = params["encode"]["batch_size"] // 2
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([DVC, "repro", "encode"], root, env)
    assert ran_stages(proc.stdout + proc.stderr) == {"encode"}

    params["prepare"]["image_size"] = 8  # digits' native size: a quick re-run of everything after
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([DVC, "repro", "encode"], root, env)
    assert ran_stages(proc.stdout + proc.stderr) == set(STAGES)
    stats = yaml.safe_load((root / "data/latents/stats.json").read_text())
    assert stats["latent_shape"] == [4, 4, 4]
