"""ray_jobs/tracking.py on a real MLflow SQLite store: one run per training name, params that never
hold credentials, idempotent registration."""

from __future__ import annotations

import pytest
import torch

from dit_core.models import DiT, DiTConfig
from ray_jobs import tracking


def test_default_uri_is_sqlite_in_repo(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tracking.REPO / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri() == "http://mlflow.example:5000"


def test_default_store_is_the_workspaces_also_in_an_experiments_temporary_copy(monkeypatch, tmp_path):
    """DVC sets DVC_ROOT for every stage; for `dvc exp run --temp/--queue` it names the user's
    workspace, not the temporary copy: the default store (and its artifacts) go there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.workspace() == tmp_path.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri()) == (tmp_path.resolve() / "mlruns").as_uri()
    assert tracking.artifact_location("http://mlflow.example:5000") is None


def test_a_new_experiment_keeps_its_artifacts_beside_the_sqlite_file(monkeypatch, tmp_path):
    """Not in ./mlruns of the working dir (an experiment's temporary copy, deleted after the run)."""
    from mlflow import MlflowClient

    db = tmp_path / "ws" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.chdir(tmp_path)          # the "temporary copy"
    tracking.configure_tracking(f"sqlite:///{db}")
    run_id = tracking.start_run("travel", "r1")
    exp = MlflowClient().get_experiment(MlflowClient().get_run(run_id).info.experiment_id)
    assert exp.artifact_location == (db.parent / "mlruns").as_uri()
    assert not (tmp_path / "mlruns").exists()


def test_safe_params_drop_and_redact_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    params = tracking.safe_params({
        "train": {"lr": 1e-4, "model": {"depth": 6}},
        "aws_access_key_id": "AKIAEXAMPLE",
        "storage": "s3://bucket/path?sig=s3cr3t-value-xyz",
        "server": "http://user:hunter2@mlflow:5000",
    })
    assert params["train.lr"] == "0.0001" and params["train.model.depth"] == "6"
    assert "aws_access_key_id" not in params
    assert "s3cr3t-value-xyz" not in params["storage"] and "hunter2" not in params["server"]


def test_run_is_found_again_and_params_stay_immutable(mlflow_sqlite):
    from mlflow import MlflowClient

    tracking.configure_tracking()
    first = tracking.start_run("exp", "run-a", tags={"preset": "custom"})
    tracking.log_params(first, {"lr": 0.1, "steps": 10})
    again = tracking.start_run("exp", "run-a")
    other = tracking.start_run("exp", "run-b")
    assert again == first and other != first
    tracking.log_params(again, {"lr": 0.1, "steps": 20})  # a resumed run with more steps: no error
    run = MlflowClient().get_run(first)
    assert run.data.params == {"lr": "0.1", "steps": "10"} and run.data.tags["changed.steps"] == "20"
    tracking.log_metrics(first, {"loss": 1.5}, step=3)
    assert [(m.step, m.value) for m in MlflowClient().get_metric_history(first, "loss")] == [(3, 1.5)]


@pytest.mark.timeout(120)
def test_log_model_registers_once_per_step(mlflow_sqlite):
    import mlflow

    tracking.configure_tracking()
    run_id = tracking.start_run("exp", "reg")
    model = DiT(DiTConfig(input_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    torch.nn.init.normal_(model.final_layer.linear.weight)
    info = {"model_config": model.config.to_dict(), "diffusion": {}, "latents": {}}
    v1 = tracking.log_model(run_id, model, "reg-model", info, {"preset": "custom"}, step=5)
    assert tracking.log_model(run_id, model, "reg-model", info, {"preset": "custom"}, step=5) == v1
    from ray_jobs.model_source import load_bundle

    loaded = load_bundle(f"models:/reg-model/{v1}").build_model()
    x, t, y = torch.randn(2, 2, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 2])
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))
    mv = mlflow.MlflowClient().get_model_version("reg-model", v1)
    assert mv.tags == {"preset": "custom", "step": "5"}
    # no autoencoder was found at registration: the generator refuses to load, saying why
    with pytest.raises(Exception, match="holds no autoencoder"):
        mlflow.pyfunc.load_model(f"models:/reg-model/{v1}")


def test_a_pulled_models_evaluation_skips_a_registry_that_never_saw_it(mlflow_sqlite, capsys):
    """A teammate's clone: `dvc pull` brought models/dit (its record names models:/dit-digits/3),
    not the MLflow database. Evaluate keeps its figures and says why nothing was registered."""
    from pipelines.evaluate import register

    tracking.configure_tracking()
    outcome = register("samples", {"model": "models/dit", "model_version": "models:/dit-digits/3", "fid": 1.0}, "champion")
    assert outcome["registered"] is False and "models:/dit-digits/3 is not in this tracking store" in outcome["reason"]
    assert "evaluate.register=false" in capsys.readouterr().err


def test_recorded_sampling_defaults_are_the_sample_settings_defaults():
    from dit_core import settings
    from dit_core.pipeline import SamplingSettings
    from ray_jobs.sample import SampleConfig

    recorded = tracking.sampling_defaults()
    assert recorded == {k: settings.defaults(SampleConfig)[k] for k in recorded}
    assert set(recorded) == set(settings.defaults(SamplingSettings))
    assert tracking.sampling_defaults({"num_steps": 8})["num_steps"] == 8
    assert tracking.sampling_defaults(None, {"objective": "flow"}) == recorded
    # a meanflow model: one step of its own sampler, without guidance (it learned its guidance)
    meanflow = tracking.sampling_defaults(None, {"objective": "meanflow"})
    assert meanflow == {**recorded, "sampler": "meanflow", "num_steps": 1, "guidance_scale": 1.0}
    assert tracking.sampling_defaults({"num_steps": 2}, {"objective": "meanflow"})["num_steps"] == 2
    with pytest.raises(ValueError, match="sampling keys \\['steps'\\] are unknown"):
        tracking.sampling_defaults({"steps": 8})
