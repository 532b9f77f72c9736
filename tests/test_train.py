"""The Ray Train job on the session's two-node Ray cluster: DDP training, the train stage's outputs,
MLflow params / metrics / registered model, exact resume, and recovery after a worker is killed.

One TorchTrainer run (the stage's) is shared by the assertions about it; the resume and the
worker-kill tests each add their own runs, with the same settings so their weights can be compared.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures_latents import write_synthetic_latents

SHAPE = (4, 8, 8)
NUM_CLASSES = 4
STEPS = 30
CHECKPOINT_EVERY = 10
LOG_EVERY = 5
FAKE_SECRET = "fake-secret-value-never-logged-7731"

# Small enough for 2 CPU cores; STRICT_SPREAD puts the two workers on the two nodes.
PARAMS: dict[str, Any] = {
    "model": {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 2},
    # the paper's recipe (the default is flow's): these tests are of the job's mechanics
    "objective": "eps", "learn_sigma": True, "timestep_sampling": "uniform",
    "steps": STEPS,
    "batch_size": 32,
    "lr": 1.0e-3,
    "warmup_steps": 5,
    "grad_clip": 1.0,
    "ema_decay": 0.9,
    "seed": 7,
    "log_every": LOG_EVERY,
    "checkpoint_every": CHECKPOINT_EVERY,
    "num_workers": 2,
    "cpus_per_worker": 1,
    "placement_strategy": "STRICT_SPREAD",
    "max_failures": 2,
    "experiment": "dit-test",
    "registered_model": "dit-test",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_cluster):
    """Latents, storage and an MLflow SQLite store for the module; a fake AWS secret is set (and
    forwarded to the workers) so the tests can check that it never reaches MLflow."""
    root = tmp_path_factory.mktemp("train")
    # the default pipeline's latents: encode.flip_views and train.random_flip both false, so no flip view
    stats = write_synthetic_latents(root / "latents", n=256, num_classes=NUM_CLASSES, shape=SHAPE, views=("image",))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_REGISTRY_URI", uri)
    mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    yield {"root": root, "latents": str(root / "latents"), "stats": stats, "storage": str(root / "ckpt"), "mlflow": uri}
    mp.undo()


@pytest.fixture(scope="module")
def stage_run(workspace):
    """The train stage (pipelines/train.py) on the cluster the test process is connected to."""
    from pipelines.train import train_and_report

    params = {**PARAMS, "name": "main", "storage_path": workspace["storage"]}
    from dit_core.contract import TRAINED_RECORD_FILE

    metrics, model = workspace["root"] / "metrics" / "train.json", workspace["root"] / "models" / "dit"
    t0 = time.time()
    result = train_and_report(workspace["latents"], params, str(metrics), str(model))
    print(f"stage run: {time.time() - t0:.1f}s")
    return {"result": result, "metrics": json.loads(metrics.read_text()), "model": model,
            "pointer": json.loads((model / TRAINED_RECORD_FILE).read_text())}


def _client():
    from mlflow import MlflowClient

    from ray_jobs.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


def _run_id(client, run_name: str) -> str:
    runs = client.search_runs([client.get_experiment_by_name("dit-test").experiment_id],
                              filter_string=f"tags.`dit.run_name` = '{run_name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {run_name}"
    return runs[0].info.run_id


def _state(checkpoint_dir: str) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir, "state.pt"), map_location="cpu", weights_only=True)


@pytest.mark.timeout(300)
def test_ddp_on_two_nodes_loss_falls(workspace, stage_run):
    client = _client()
    run = client.get_run(stage_run["pointer"]["mlflow_run_id"])
    assert run.data.params["num_nodes"] == "2" and run.data.params["world_size"] == "2"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    first, last = history[0][1], history[-1][1]
    assert last < 0.8 * first, history
    for name in ("images_per_sec", "steps_per_sec", "peak_memory_mb"):
        assert client.get_metric_history(run.info.run_id, name)[-1].value > 0


@pytest.mark.timeout(300)
def test_stage_writes_metrics_pointer_and_checkpoint(workspace, stage_run):
    m, pointer = stage_run["metrics"], stage_run["pointer"]
    assert m["steps"] == STEPS and m["final_loss"] > 0 and m["images_per_sec"] > 0
    assert pointer["model_uri"] == f"models:/dit-test/{pointer['version']}"
    assert Path(pointer["checkpoint"]).name == f"checkpoint_{STEPS:08d}"
    state = _state(pointer["checkpoint"])
    assert {"model", "ema", "optimizer", "step", "model_config", "diffusion", "latents", "config", "data_fingerprint"} <= set(state)
    assert state["step"] == STEPS
    assert state["data_fingerprint"] == workspace["stats"]["fingerprint"] == state["latents"]["fingerprint"]
    assert state["config"]["lr"] == PARAMS["lr"] and state["model_config"]["depth"] == PARAMS["model"]["depth"]
    # EMA and raw weights differ after training (the EMA lags), and only the last checkpoints are kept.
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    kept = sorted(p.name for p in Path(pointer["checkpoint"]).parent.glob("checkpoint_[0-9]*"))
    assert kept == [f"checkpoint_{s:08d}" for s in (STEPS - CHECKPOINT_EVERY, STEPS)]


@pytest.mark.timeout(300)
def test_model_folder_is_the_registered_model_whole(workspace, stage_run, tmp_path):
    """models/dit holds the registered version's bundle: the same EMA weights, the autoencoder, the
    record naming the version; it loads with the checkpoints gone and no tracking store."""
    import shutil

    from dit_core.contract import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, TRAINED_RECORD_FILE
    from ray_jobs.model_source import load_bundle, state_digest

    folder, pointer = stage_run["model"], stage_run["pointer"]
    assert {MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, TRAINED_RECORD_FILE} <= {p.name for p in folder.iterdir()}
    registered = load_bundle(pointer["model_uri"])
    copy = tmp_path / "moved" / "dit"
    shutil.copytree(folder, copy)     # elsewhere, as `dvc pull` puts it in another clone
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-such-dir' / 'mlflow.db'}")  # unusable
    try:
        local = load_bundle(str(copy))
    finally:
        mp.undo()
    assert local.weights_digest() == registered.weights_digest() == state_digest(_state(pointer["checkpoint"])["ema"])
    assert local.model_config == registered.model_config and local.diffusion == registered.diffusion
    assert local.pinned_uri == pointer["model_uri"]   # evaluate scores the version the folder came from
    # these synthetic latents name no autoencoder ("none"): the folder records that it holds none
    # (tests/test_travel.py samples a folder that bundles one)
    assert local.latents["autoencoder_path"] == workspace["stats"]["autoencoder_path"] and not (copy / "autoencoder").exists()


@pytest.mark.timeout(300)
def test_mlflow_params_metrics_and_registered_model(workspace, stage_run):
    import mlflow

    from dit_core.models import load_checkpoint
    from ray_jobs.tracking import git_commit

    client = _client()
    pointer = stage_run["pointer"]
    run = client.get_run(pointer["mlflow_run_id"])
    params = run.data.params
    assert params["lr"] == str(PARAMS["lr"]) and params["model.depth"] == "2" and params["model_config.hidden_size"] == "64"
    assert params["data_fingerprint"] == workspace["stats"]["fingerprint"]
    assert params["git_commit"].split("-")[0] == git_commit().split("-")[0]
    everything = json.dumps([params, run.data.tags])
    assert FAKE_SECRET not in everything and "AWS_SECRET" not in everything
    mv = client.get_model_version("dit-test", pointer["version"])
    assert mv.run_id == run.info.run_id
    assert mv.tags["preset"] == "custom" and mv.tags["data_fingerprint"] == workspace["stats"]["fingerprint"]
    info = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model_info/model_info.json",
                                                               dst_path=str(workspace["root"] / "info"))).read_text())
    assert info["model_config"]["depth"] == 2 and info["latents"]["latent_shape"] == list(SHAPE)

    from ray_jobs.model_source import load_bundle

    registered = load_bundle(pointer["model_uri"]).build_model().eval()  # the registered pyfunc bundle's weights
    ema = load_checkpoint(Path(pointer["checkpoint"], "state.pt")).eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, *SHAPE, generator=g), torch.tensor([0, 10, 100, 500, 900, 999]), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        out = registered(x, t, y)
        assert torch.equal(out, ema(x, t, y))
        assert out.abs().max() > 0  # a trained model, not the zero-initialised one


@pytest.mark.timeout(400)
def test_resume_equals_uninterrupted_run(workspace, stage_run):
    """Stop after 2 checkpoints' worth of steps, resume to the end: weights, optimizer, EMA and step
    are bit-equal to those of the uninterrupted stage run (same seed and settings, other name), and
    the second attempt executed only the last steps (a run that ignored its checkpoint and trained
    from step 0 gives the same tensors, so the executed steps are what tells a resume apart)."""
    from ray_jobs.train import config_from, train

    base = {**PARAMS, "name": "resume", "storage_path": workspace["storage"], "tracking": False}
    first = train(config_from(workspace["latents"], {**base, "steps": 2 * CHECKPOINT_EVERY}))
    assert first.step == 2 * CHECKPOINT_EVERY and first.attempts == [{"start_step": 0, "end_step": 2 * CHECKPOINT_EVERY}]
    second = train(config_from(workspace["latents"], base))
    assert second.step == STEPS
    assert second.attempts == [{"start_step": 0, "end_step": 2 * CHECKPOINT_EVERY},
                               {"start_step": 2 * CHECKPOINT_EVERY, "end_step": STEPS}], second.attempts
    assert stage_run["result"]["attempts"] == [{"start_step": 0, "end_step": STEPS}]
    assert_same_training_state(_state(second.checkpoint), _state(stage_run["pointer"]["checkpoint"]))

    # FSDP on a CPU-only cluster is refused before any worker starts.
    with pytest.raises(ValueError, match="strategy: ddp"):
        train(config_from(workspace["latents"], {**base, "name": "fsdp", "strategy": "fsdp"}))
    # Resuming with settings that change the weights is refused, naming the fix.
    with pytest.raises(Exception, match="new train.name"):
        train(config_from(workspace["latents"], {**base, "steps": STEPS + 10, "lr": 5e-4}))
    # Resuming on other data (same shape and classes, other rows) is refused, naming both fingerprints.
    other = write_synthetic_latents(workspace["root"] / "other", n=256, num_classes=NUM_CLASSES, shape=SHAPE, seed=1,
                                    views=("image",))
    assert other["fingerprint"] != workspace["stats"]["fingerprint"]
    with pytest.raises(ValueError, match=f"fingerprint {workspace['stats']['fingerprint']}.*fingerprint {other['fingerprint']}"
                                         ".*resuming on other data is refused"):
        train(config_from(str(workspace["root"] / "other"), {**base, "steps": STEPS + 10}))


def assert_same_training_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Step, weights, EMA and optimizer state bit-equal (CPU, same world size: the same operations
    in the same order)."""
    assert got["step"] == want["step"]
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), f"{part}.{k} differs"
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    for i, s in want["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(got["optimizer"]["state"][i][k], v), f"optimizer state {i}.{k} differs"


def _training_worker_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            pids.append(p.info["pid"])
    return pids


@pytest.mark.timeout(400)
def test_killed_worker_restarts_from_checkpoint(workspace):
    """SIGKILL one training worker after the first checkpoint: Ray restarts the worker group from a
    checkpoint (never step 0), the run reaches its last step, its final weights, EMA and optimizer
    state are bit-equal to an uninterrupted run's, and the MLflow loss has no gap, repeating exactly
    the steps since the checkpoint it restarted from."""
    import signal

    from ray_jobs.train import config_from, train

    steps, every = 80, 20
    params = {**PARAMS, "name": "killed", "storage_path": workspace["storage"], "steps": steps,
              "checkpoint_every": every, "log_every": LOG_EVERY, "batch_size": 128}  # slower steps: the kill lands early in an interval
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=train(config_from(workspace["latents"], params))), daemon=True)
    thread.start()
    # wait until Ray has registered the first checkpoint (its snapshot names it), not only until
    # the folder exists: a kill before the registration restarts from step 0, which this test refuses
    snapshot = Path(workspace["storage"], "killed", "checkpoint_manager_snapshot.json")

    def registered() -> bool:
        try:
            return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
        except (OSError, ValueError):
            return False

    deadline = time.time() + 200
    while not registered() and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert registered(), "Ray never registered the run's first checkpoint"
    client = _client()
    run_id = _run_id(client, "killed")
    while time.time() < deadline and thread.is_alive() and max(
            (m.step for m in client.get_metric_history(run_id, "loss")), default=0) < every + 2 * LOG_EVERY:
        time.sleep(0.05)  # some steps past the checkpoint, so the restart must repeat them
    pids = _training_worker_pids()
    assert pids, "no training worker process found"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "result" in out
    result = out["result"]
    assert result.step == steps

    assert _run_id(client, "killed") == run_id  # the restarted workers continued the same MLflow run
    logged = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(logged)) == list(range(LOG_EVERY, steps + 1, LOG_EVERY))  # no gap
    # Repeated: exactly the steps between the checkpoint it restarted from and the kill, once each.
    # (Ray Train registers a reported checkpoint asynchronously, so a kill just after checkpoint k
    # may restart from checkpoint k - 1: at most two intervals are repeated.)
    repeated = sorted(st for st in set(logged) if logged.count(st) > 1)
    assert repeated and all(logged.count(st) == 2 for st in repeated), logged
    restart = repeated[0] - LOG_EVERY
    assert restart % every == 0 and repeated == list(range(restart + LOG_EVERY, repeated[-1] + 1, LOG_EVERY)), logged
    assert len(repeated) <= 2 * every // LOG_EVERY, logged
    # the attempts: the second started at that checkpoint, not at step 0, and ran to the end
    assert len(result.attempts) == 2 and restart >= every, result.attempts
    assert result.attempts[1] == {"start_step": restart, "end_step": steps}, result.attempts
    assert result.attempts[0]["start_step"] == 0 and result.attempts[0]["end_step"] == restart, result.attempts
    # the same run, never interrupted
    reference = train(config_from(workspace["latents"], {**params, "name": "killed-reference", "tracking": False}))
    assert reference.attempts == [{"start_step": 0, "end_step": steps}]
    assert_same_training_state(_state(result.checkpoint), _state(reference.checkpoint))


@pytest.mark.timeout(300)
def test_flow_objective_trains_is_recorded_and_refuses_eps_samplers(workspace, tmp_path):
    """A flow run on the cluster: its loss falls, the checkpoint, the MLflow run and the registered
    version say objective flow, and the sample job refuses an eps sampler for it before any work."""
    from pipelines.train import train_and_report
    from ray_jobs.model_source import load_bundle
    from ray_jobs.sample import SampleConfig, run as run_sample

    params = {**PARAMS, "name": "flow", "storage_path": workspace["storage"], "objective": "flow", "learn_sigma": False,
              "timestep_sampling": "logit-normal", "num_workers": 1, "placement_strategy": "PACK", "steps": 20,
              "checkpoint_every": 20}
    train_and_report(workspace["latents"], params, str(tmp_path / "train.json"), str(tmp_path / "dit"))
    pointer = json.loads((tmp_path / "dit" / "trained.json").read_text())
    state = _state(pointer["checkpoint"])
    assert state["diffusion"]["objective"] == "flow" and state["diffusion"]["timestep_sampling"] == "logit-normal"
    assert state["model_config"]["learn_sigma"] is False
    client = _client()
    run = client.get_run(pointer["mlflow_run_id"])
    assert run.data.params["objective"] == "flow" and run.data.tags["objective"] == "flow"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history[-1][1] < 0.98 * history[0][1], history   # the velocity loss starts near 2 and falls slowly
    assert client.get_model_version("dit-test", pointer["version"]).tags["objective"] == "flow"
    bundle = load_bundle(pointer["model_uri"])
    assert bundle.diffusion["objective"] == "flow"
    with pytest.raises(ValueError, match="trained with objective 'flow'.*euler"):
        run_sample(SampleConfig(model=pointer["model_uri"], output=str(tmp_path / "samples"), sampler="ddpm", num_images=4))
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").rglob("*.parquet"))


@pytest.mark.parametrize("settings,match", [
    ({"objective": "flow", "learn_sigma": True}, "learns no variance; set learn_sigma: false"),
    ({"objective": "eps", "timestep_sampling": "logit-normal"}, "timestep_sampling='logit-normal' is for objective 'flow'"),
    ({"objective": "flow", "learn_sigma": False, "loss_weighting": "min-snr"}, "loss_weighting"),
    ({"objective": "meanflow", "meanflow": {"interval_shares": 0.5}}, r"train: meanflow has unknown settings \['interval_shares'\]"),
    ({"objective": "meanflow", "meanflow": {"interval_share": 1.5}}, r"interval_share=1.5 .* set a value in \[0, 1\]"),
    ({"objective": "meanflow", "meanflow": {"guidance_omega": 2.0}, "class_dropout_prob": 0.0}, "set class_dropout_prob > 0"),
])
def test_objective_settings_that_do_not_fit_are_refused(settings, match):
    from ray_jobs.train import config_from

    with pytest.raises(ValueError, match=match):
        config_from("x", settings).validate()


def test_the_objective_decides_the_interval_input():
    """The DiT gets MeanFlow's second time input for objective meanflow only; a model setting that
    says otherwise is refused. The meanflow recipe's time scale is recorded as diffusion_steps."""
    from ray_jobs.train import config_from, model_config
    from ray_jobs.train_config import diffusion_settings

    stats = {"latent_shape": [4, 8, 8], "num_classes": NUM_CLASSES}
    assert model_config(config_from("x", {"objective": "meanflow"}), stats).interval_embed is True
    assert model_config(config_from("x", {}), stats).interval_embed is False
    with pytest.raises(ValueError, match="train.model.interval_embed=True contradicts train.objective='flow'"):
        model_config(config_from("x", {"model": {**PARAMS["model"], "interval_embed": True}}), stats)
    cfg = config_from("x", {"objective": "meanflow", "meanflow": {"time_scale": 100, "guidance_omega": 2}})
    record = diffusion_settings(cfg)
    assert record["diffusion_steps"] == 100 and record["guidance_omega"] == 2.0 and record["interval_share"] == 0.25


# ---------------------------------------------------------------------------------------------
# Fast checks of the pure parts (no Ray)
# ---------------------------------------------------------------------------------------------

def test_config_errors_name_the_fix(tmp_path):
    from ray_jobs.train import config_from, model_config, read_stats

    with pytest.raises(FileNotFoundError, match="run the encode stage"):
        read_stats(str(tmp_path / "missing"))
    stats = write_synthetic_latents(tmp_path / "lat", n=8, num_classes=2, shape=SHAPE)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        model_config(config_from(str(tmp_path / "lat"), {"preset": "DiT-Q/3"}), stats)
    with pytest.raises(ValueError, match="contradicts the latents"):
        model_config(config_from(str(tmp_path / "lat"), {"model": {"depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 3}}), stats)
    with pytest.raises(ValueError, match="not divisible"):
        config_from("x", {"batch_size": 30, "num_workers": 4}).validate()
    with pytest.raises(ValueError, match="unknown train settings"):
        config_from("x", {"learning_rate": 1})
    assert model_config(config_from("x", {"preset": "DiT-S/2", "model": {}}), stats).hidden_size == 384


def test_a_run_resumes_only_on_its_data_settings_and_layout(tmp_path):
    """The driver records a run's identity at its first start and refuses, before any worker starts
    (a worker's refusal would be retried max_failures times), to resume it otherwise."""
    from dit_core.contract import TRAIN_IDENTITY_FILE
    from ray_jobs.train import check_identity, config_from

    cfg = config_from("lat", {"storage_path": str(tmp_path)})
    check_identity(cfg, "run", "data-1", "layout-1")                      # first start: recorded
    check_identity(cfg, "run", "data-1", "layout-1")                      # the same: resumes
    with pytest.raises(ValueError, match="laid out in row groups layout-1.*layout-2.*encode.rows_per_group"):
        check_identity(cfg, "run", "data-1", "layout-2")
    with pytest.raises(ValueError, match="fingerprint data-1.*data-2.*new train.name"):
        check_identity(cfg, "run", "data-2", "layout-1")
    with pytest.raises(ValueError, match=r"other values of \['lr'\]"):
        check_identity(config_from("lat", {"storage_path": str(tmp_path), "lr": 0.1}), "run", "data-1", "layout-1")
    record = tmp_path / "run" / TRAIN_IDENTITY_FILE                               # recorded before the layout was
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "data_layout"}))
    check_identity(cfg, "run", "data-1", "layout-2")


def test_ema_update():
    from dit_core.training import EMA

    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, before + 1.0)  # 0.75 * w + 0.25 * (w + 4)


def test_ema_warmup_forgets_the_initial_weights():
    """With warm-up the average after k updates weights the start by prod (1 - w_i), which falls
    fast; without it, decay 0.999 keeps most of the initial weights for a thousand steps."""
    from dit_core.training import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    plain, warm = EMA(model, decay=0.999), EMA(model, decay=0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the trained value, held from step 0 on
    for step in range(200):
        plain.update(model, step)
        warm.update(model, step)
    assert float(plain.model.weight) == pytest.approx(1 - 0.999 ** 200)  # ~0.18
    assert float(warm.model.weight) > 0.99
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10**7) == 0.999


@pytest.mark.timeout(400)
def test_meanflow_trains_resumes_exactly_and_generates_in_one_and_two_steps(workspace, tmp_path):
    """A meanflow run (learned guidance, DDP on two nodes) through the train stage: its checkpoint and registered
    version record the objective and the interval input, MLflow has the plain mse beside the weighted
    loss, a stopped and resumed run ends bit-equal to it, and the registered pyfunc generates in 1
    (its recorded default) and 2 evaluations, as the pipeline does, with guidance_scale ignored."""
    import mlflow
    import pandas as pd

    from fixtures_registry import save_tiny_autoencoder
    from dit_core.data import pngs_to_uint8
    from dit_core.pipeline import ImagePipeline, SamplingSettings
    from pipelines.train import train_and_report
    from ray_jobs.model_source import load_bundle
    from ray_jobs.sample import load_autoencoder_for
    from ray_jobs.train import config_from, train

    # 4x4x4 latents of 8px images, with an autoencoder that decodes them: the registered model generates
    save_tiny_autoencoder(tmp_path / "autoencoder")
    latents = tmp_path / "latents"
    stats = write_synthetic_latents(latents, n=64, num_classes=NUM_CLASSES, shape=(4, 4, 4), views=("image",))
    stats |= {"autoencoder_path": str(tmp_path / "autoencoder"), "scale_factor": 0.7}
    (latents / "stats.json").write_text(json.dumps(stats))
    params = {**PARAMS, "storage_path": workspace["storage"], "objective": "meanflow", "learn_sigma": False,
              "timestep_sampling": "logit-normal", "meanflow": {"guidance_omega": 1.5}, "batch_size": 16,
              "steps": 6, "checkpoint_every": 3, "log_every": 3,   # two DDP workers: the JVP on the unwrapped DiT
              "lr": 1e-2, "warmup_steps": 0}   # 6 steps that move the zero-initialised output: 1 and 2 steps differ
    train_and_report(str(latents), {**params, "name": "meanflow"}, str(tmp_path / "train.json"), str(tmp_path / "dit"))
    pointer = json.loads((tmp_path / "dit" / "trained.json").read_text())
    state = _state(pointer["checkpoint"])
    assert state["diffusion"]["objective"] == "meanflow" and state["diffusion"]["guidance_omega"] == 1.5
    assert state["model_config"]["interval_embed"] is True and "interval_embedder.mlp.0.weight" in state["model"]
    run = _client().get_run(pointer["mlflow_run_id"])
    assert run.data.params["meanflow.guidance_omega"] == "1.5" and run.data.tags["objective"] == "meanflow"
    assert 0 < run.data.metrics["mse"] and run.data.metrics["mse"] != run.data.metrics["loss"]   # the loss is weighted

    base = {**params, "name": "meanflow-resume", "tracking": False}
    train(config_from(str(latents), {**base, "steps": 3}))
    assert_same_training_state(_state(train(config_from(str(latents), base)).checkpoint), state)

    bundle = load_bundle(pointer["model_uri"])
    assert bundle.sampling["sampler"] == "meanflow" and bundle.sampling["num_steps"] == 1 and bundle.sampling["guidance_scale"] == 1.0
    pyfunc = mlflow.pyfunc.load_model(pointer["model_uri"])
    rows = pd.DataFrame({"class_label": [1, 2, 1], "seed": [5, 6, 5], "num_steps": [None, 2, 2]})
    got = pngs_to_uint8(list(pyfunc.predict(rows)["image"]))
    ae, scale = load_autoencoder_for(bundle)
    pipe = ImagePipeline(bundle.build_model(), ae, scale, bundle.diffusion, device="cpu")
    one = pipe.generate([1], [5], SamplingSettings(sampler="meanflow", num_steps=1, guidance_scale=1.0))
    two = pipe.generate([2, 1], [6, 5], SamplingSettings(sampler="meanflow", num_steps=2, guidance_scale=1.0))
    assert (got == np.concatenate([one, two])).all() and not (one[0] == two[1]).all()   # 1 and 2 steps differ
    with pytest.warns(UserWarning, match="guidance_scale=3.0 is ignored"):
        guided = pyfunc.predict(pd.DataFrame({"class_label": [1], "seed": [5], "guidance_scale": [3.0]}))
    assert (pngs_to_uint8(list(guided["image"])) == one).all()
