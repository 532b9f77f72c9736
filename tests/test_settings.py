"""One source of truth for settings: params.yaml equals the settings dataclasses' defaults, the job
CLIs take theirs from the same dataclasses, and every value is read as DVC reads it (YAML 1.2)
and type-checked against its field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dit_core import settings
from pipelines.common import StoreSettings
from pipelines.evaluate import EvaluateSettings
from pipelines.prepare import PrepareConfig
from pipelines.train_autoencoder import AutoencoderSettings
from pipelines.train_classifier import ClassifierSettings
from ray_jobs.encode import EncodeConfig
from ray_jobs.sample import SampleConfig, parse_args
from ray_jobs.train import TrainConfig, config_from, load_train_params
from tests.fixtures_data import REPO

# params.yaml section -> its dataclass, and the fields that are paths given by dvc.yaml, not settings
SECTIONS = {
    "store": (StoreSettings, ()),
    "prepare": (PrepareConfig, ()),
    "train_autoencoder": (AutoencoderSettings, ()),
    "encode": (EncodeConfig, ("prepared", "autoencoder", "output")),
    "train": (TrainConfig, ("latents",)),
    "train_classifier": (ClassifierSettings, ()),
    "sample": (SampleConfig, ("output",)),
    "evaluate": (EvaluateSettings, ()),
}


def test_params_yaml_equals_the_dataclass_defaults():
    params = settings.read_yaml(REPO / "params.yaml")
    assert set(params) == set(SECTIONS)
    for section, (cls, paths) in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - set(paths)
        assert set(params[section]) == fields, section
        dflt = settings.defaults(cls)
        for key, value in params[section].items():
            if key == "model" and section == "sample":   # the stage's own key: null = the train pointer
                assert value is None and "model" not in dflt
                continue
            assert value == dflt[key] and type(value) is type(dflt[key]) or (
                isinstance(dflt[key], float) and value == dflt[key]), f"{section}.{key}: params.yaml {value!r}, default {dflt[key]!r}"


def test_params_build_into_typed_configs():
    params = settings.read_yaml(REPO / "params.yaml")
    cfg = config_from("lat", params["train"])
    assert cfg == TrainConfig(latents="lat")


def test_exponent_floats_as_people_write_them(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 1E-2\n  grad_clip: 5e0\n")
    cfg = config_from("lat", load_train_params(str(path), []))
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 0.01 and cfg.grad_clip == 5.0
    cfg = config_from("lat", load_train_params(str(path), ["lr=2e-4", "steps=1e3", "name=123"]))
    assert cfg.lr == 2e-4 and cfg.steps == 1000 and isinstance(cfg.steps, int)
    cfg.validate()


@pytest.mark.parametrize("key,value,expected", [
    ("lr", "fast", "train.lr='fast' (str) is not a valid float"),
    ("steps", 1.5, "train.steps=1.5 (float) is not a valid int"),
    ("random_flip", "yes please", "train.random_flip='yes please' (str) is not a valid bool"),
    ("model", [1, 2], "train.model=[1, 2] (list) is not a valid dict"),
])
def test_wrong_types_name_key_value_and_type(key, value, expected):
    with pytest.raises(TypeError, match="^" + expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        config_from("lat", {key: value})


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown train settings \\['learning_rate'\\]"):
        config_from("lat", {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="--set learning_rate=1"):
        load_train_params(None, ["learning_rate=1"])


def test_sample_cli_defaults_are_the_dataclass_defaults():
    cfg = parse_args(["--model", "m", "--out", "o"])
    assert cfg == SampleConfig(model="m", output="o")
    cfg = parse_args(["--model", "m", "--out", "o", "--class-labels", "3,7", "--formats", "png", "--guidance-scale", "4",
                      "--guided-channels", "3", "--num-actors", "null"])
    assert cfg.class_labels == [3, 7] and cfg.formats == ["png"] and cfg.guidance_scale == 4.0 and cfg.guided_channels == 3
    assert parse_args(["--model", "m", "--out", "o", "--class-labels", "uniform"]).class_labels == "uniform"
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--out", "o", "--num-images", "many"])
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.sample", "--model", "m", "--out", "o", "--num-images", "many"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--num-images many: (str) is not a valid int" in proc.stderr


def test_sample_help_shows_the_defaults():
    out = subprocess.run([sys.executable, "-m", "ray_jobs.sample", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    dflt = settings.defaults(SampleConfig)
    assert f"(default: {dflt['sampler']})" in out and f"(default: {dflt['num_steps']})" in out
