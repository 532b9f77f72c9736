"""The evaluation's MLflow records, on a real MLflow (SQLite): metrics and the grid in the scored
version's training run, the version tagged with its FID, and the alias moving only to a better
version; models load back from their URIs; the classifier the offline FID relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_core.classifier import Classifier, ClassifierConfig, ClassifierTrainConfig, accuracy, load_classifier, save_classifier, train_classifier
from ray_jobs import storage, tracking
from ray_jobs.model_source import load_bundle
from ray_jobs.sample import CONFIG_FILE, GRID_FILE
from tests.test_sample import TINY, random_dit

NAME = "dit-eval-test"


def register_version(seed: int) -> tuple[str, str, torch.nn.Module]:
    """A training run with a logged, registered tiny DiT (as ray_jobs.train does at its end)."""
    model = random_dit(TINY, seed)
    run_id = tracking.start_run("eval-test", f"run-{seed}")
    info = {"model_config": TINY.to_dict(), "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000},
            "latents": {"autoencoder_path": "unused", "scale_factor": 1.0}}
    version = tracking.log_model(run_id, model, NAME, model_info=info, tags={"preset": "custom"}, step=10)
    tracking.finish_run(run_id)
    return run_id, version, model


def fake_samples(root, model_uri: str) -> str:
    """A samples folder as the sample stage leaves it (the parts that register() reads)."""
    storage.write_json(storage.join(root, CONFIG_FILE), {"model": model_uri})
    from dit_core.data import png_bytes

    storage.write_bytes(storage.join(root, GRID_FILE), png_bytes(np.zeros((4, 4, 3), np.uint8)))
    return str(root)


def eval_metrics(model_uri: str, fid: float) -> dict:
    return {"model": model_uri, "fid": fid, "class_accuracy": 0.9, "fid_untrained": 100.0, "sampler": "ddim",
            "num_steps": 10, "eta": 0.0, "guidance_scale": 1.0, "guided_channels": None, "seed": 0,
            "feature_network": "classifier", "reference": "val", "num_samples": 8}


@pytest.mark.timeout(300)
def test_evaluation_tags_the_version_and_moves_the_alias_to_better_models(mlflow_sqlite, tmp_path):
    from mlflow import MlflowClient

    from pipelines.evaluate import register

    tracking.configure_tracking()
    client = MlflowClient()
    run1, v1, m1 = register_version(1)
    run2, v2, _ = register_version(2)
    run3, v3, _ = register_version(3)

    out = register(fake_samples(tmp_path / "s1", f"models:/{NAME}/{v1}"), eval_metrics(f"models:/{NAME}/{v1}", 5.0), "champion")
    assert out["moved"] and out["holder"] == v1 and out["previous"] is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1
    mv = client.get_model_version(NAME, v1)
    assert float(mv.tags[tracking.FID_TAG]) == 5.0 and mv.tags[tracking.FID_FEATURES_TAG] == "classifier"
    run = client.get_run(run1)
    assert run.data.metrics["eval.fid"] == 5.0 and run.data.metrics["eval.class_accuracy"] == 0.9
    assert run.data.tags["eval.sampler"] == "ddim" and run.data.tags["eval.num_steps"] == "10"
    assert any(a.path == f"eval/{GRID_FILE}" for a in client.list_artifacts(run1, "eval"))

    out = register(fake_samples(tmp_path / "s2", f"models:/{NAME}/{v2}"), eval_metrics(f"models:/{NAME}/{v2}", 7.0), "champion")
    assert not out["moved"] and out["previous_fid"] == 5.0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1, "a worse FID does not take the alias"
    assert float(client.get_model_version(NAME, v2).tags[tracking.FID_TAG]) == 7.0

    out = register(fake_samples(tmp_path / "s3", f"models:/{NAME}@champion"), eval_metrics(f"models:/{NAME}/{v3}", 3.0), "champion")
    assert out["moved"] and out["previous"] == v1
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v3

    # a FID from another feature network is not compared with the holder's: the alias moves
    assert tracking.promote_if_better(NAME, v2, 50.0, "inception")["moved"]

    # nor one from the same network with other weights (a retrained classifier), or against other
    # reference data: the tags name both, and only FIDs that share them are compared
    def scored(v: str, fid: float, features: str, reference: str) -> dict:
        metrics = {**eval_metrics(f"models:/{NAME}/{v}", fid), "feature_network_id": features, "reference_id": reference}
        return register(fake_samples(tmp_path / f"s-{v}-{fid}-{features}", f"models:/{NAME}/{v}"), metrics, "champion")

    out = scored(v1, 40.0, "classifier@aaaa", "val@1111")
    assert out["moved"] and out["previous_fid"] is None, out
    mv = client.get_model_version(NAME, v1)
    assert mv.tags[tracking.FID_FEATURES_TAG] == "classifier@aaaa" and mv.tags[tracking.FID_REFERENCE_TAG] == "val@1111"
    out = scored(v3, 45.0, "classifier@aaaa", "val@1111")        # same basis, worse: compared, stays
    assert not out["moved"] and out["previous_fid"] == 40.0
    out = scored(v3, 45.0, "classifier@bbbb", "val@1111")        # another classifier: not compared
    assert out["moved"] and out["previous"] == v1
    out = scored(v2, 90.0, "classifier@bbbb", "val@2222")        # other reference data: not compared
    assert out["moved"] and out["previous"] == v3
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v2

    # the registered weights come back through every URI form
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 900]), torch.tensor([0, 2])
    for uri in (f"models:/{NAME}/{v1}", f"runs:/{run1}/model"):
        bundle = load_bundle(uri)
        torch.testing.assert_close(bundle.build_model()(x, t, y), m1(x, t, y))
        assert bundle.latents["scale_factor"] == 1.0
    assert load_bundle(f"models:/{NAME}@champion").version == v2


def test_unregistered_models_are_not_registered(mlflow_sqlite, tmp_path):
    from pipelines.evaluate import register

    out = register(str(tmp_path), eval_metrics("/some/checkpoint", 1.0), "champion")
    assert out == {"registered": False, "reason": "/some/checkpoint is not a registered model version"}


def test_classifier_learns_digits_and_round_trips(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images / 16.0 * 2 - 1).float()[:, None].repeat(1, 3, 1, 1)  # 8x8, [-1, 1]
    y = torch.from_numpy(digits.target).long()
    cfg = ClassifierConfig(num_classes=10, image_size=8, width=16, feature_dim=32)
    model = train_classifier(x[:1500], y[:1500], cfg, ClassifierTrainConfig(steps=300, batch_size=64))
    acc = accuracy(model, x[1500:], y[1500:])
    assert acc > 0.9, acc
    save_classifier(model, tmp_path / "clf", extra={"metrics": {"val_accuracy": acc}})
    loaded, record = load_classifier(tmp_path / "clf")
    torch.testing.assert_close(loaded.features(x[:5]), model.features(x[:5]))
    assert loaded.features(x[:5]).shape == (5, 32) and record["metrics"]["val_accuracy"] == acc
    with pytest.raises(ValueError, match="trained on 8x8"):
        loaded.features(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="out of range"):
        train_classifier(x[:4], torch.tensor([0, 1, 2, 10]), cfg, ClassifierTrainConfig(steps=1))
    with pytest.raises(FileNotFoundError, match="train_classifier stage"):
        load_classifier(tmp_path / "nothing")


def test_classifier_records_its_architecture_and_reads_older_records(tmp_path):
    """The pyramid downsamples to 4x4 whatever the image size; a classifier saved before the record
    named its architecture (the two-stage layout) still loads, with the same outputs."""
    pyramid = Classifier(ClassifierConfig(num_classes=3, image_size=32, width=8, feature_dim=16)).eval()
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in pyramid.body) == 3          # 32 -> 16 -> 8 -> 4
    assert pyramid.features(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    save_classifier(pyramid, tmp_path / "pyramid")
    assert json.loads((tmp_path / "pyramid" / "classifier.json").read_text())["config"]["architecture"] == "pyramid"

    old = Classifier(ClassifierConfig(num_classes=3, image_size=8, width=8, feature_dim=16, architecture="two-stage")).eval()
    save_classifier(old, tmp_path / "old")
    record_path = tmp_path / "old" / "classifier.json"
    record = json.loads(record_path.read_text())
    del record["config"]["architecture"]                     # as written before the field existed
    record_path.write_text(json.dumps(record))
    loaded, _ = load_classifier(tmp_path / "old")
    x = torch.randn(4, 3, 8, 8)
    assert loaded.config.architecture == "two-stage"
    torch.testing.assert_close(loaded.features(x), old.features(x))
    with pytest.raises(ValueError, match="architecture 'resnet'.*pyramid"):
        ClassifierConfig(num_classes=3, image_size=8, architecture="resnet")


def test_evaluation_credits_the_sampled_version_not_the_alias_of_now(mlflow_sqlite, tmp_path):
    """The sample job resolves `models:/name@champion` once and records the version and its weights'
    digest; if the alias moves before scoring, the FID still goes to the version that was sampled."""
    from mlflow import MlflowClient

    from pipelines.evaluate import register, sampled_model
    from ray_jobs.sample import SUMMARY_FILE

    tracking.configure_tracking()
    client = MlflowClient()
    _, v1, _ = register_version(1)
    _, v2, _ = register_version(2)
    client.set_registered_model_alias(NAME, "champion", v1)
    sampled = load_bundle(f"models:/{NAME}@champion")               # what the sample job does
    assert sampled.pinned_uri == f"models:/{NAME}/{v1}"
    samples = fake_samples(tmp_path / "s", f"models:/{NAME}@champion")
    storage.write_json(storage.join(samples, SUMMARY_FILE), {"model_version": sampled.pinned_uri,
                                                            "weights_sha256": sampled.weights_digest()})
    client.set_registered_model_alias(NAME, "champion", v2)         # the alias moves before scoring
    metrics = eval_metrics(f"models:/{NAME}@champion", 1.0) | sampled_model(samples)
    out = register(samples, metrics, "other-alias")
    assert out["version"] == v1
    assert float(client.get_model_version(NAME, v1).tags[tracking.FID_TAG]) == 1.0
    assert tracking.FID_TAG not in client.get_model_version(NAME, v2).tags
    assert sampled.weights_digest() != load_bundle(f"models:/{NAME}/{v2}").weights_digest()
    with pytest.raises(ValueError, match="holds other weights than the ones sampled"):
        register(samples, metrics | {"weights_sha256": "0" * 64}, "other-alias")


def test_reference_sources(tmp_path):
    """An ADM .npz with mu/sigma is used as it is; one of arr_0 images becomes slices for the actors."""
    from pipelines.evaluate import reference_source
    from ray_jobs.features import npz_items, read_item

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "stats.npz", mu=np.ones(4), sigma=np.eye(4), count=np.int64(7), arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    stats, items, name, identity = reference_source(str(tmp_path / "stats.npz"), "unused")
    assert items == [] and stats.count == 7 and name == identity == str(tmp_path / "stats.npz")
    np.testing.assert_array_equal(stats.sigma, np.eye(4))
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images)
    stats, items, _, _ = reference_source(str(tmp_path / "images.npz"), "unused")
    assert stats is None and [(i["start"], i["stop"]) for i in items] == [(0, 40)]
    items = npz_items("reference", str(tmp_path / "images.npz"), rows_per_item=15)
    assert [(i["start"], i["stop"]) for i in items] == [(0, 15), (15, 30), (30, 40)]
    np.testing.assert_array_equal(np.concatenate([read_item(i)[0] for i in items]), images)
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="expected mu and sigma, or arr_0 images"):
        reference_source(str(tmp_path / "other.npz"), "unused")
    with pytest.raises(FileNotFoundError, match="use 'val' or an ADM reference .npz"):
        reference_source(str(tmp_path / "none.npz"), "unused")


@pytest.mark.timeout(600)
def test_distributed_feature_pass_equals_the_single_process_computation(ray_cluster, tmp_path):
    """evaluate's FID, untrained FID and class accuracy, with the features of the samples, of the
    baseline and of the reference computed by two actors in blocks (a shard each) and merged in
    float64, equal the single-process computation on the same images. Tolerance: FID to a relative
    1e-6 (float32 features of differently sized batches round differently, ~1e-7 relative; the
    merge itself is exact to ~1e-12), the accuracy exactly."""
    from dataclasses import replace

    from dit_core.classifier import Classifier, ClassifierConfig, predict, save_classifier
    from dit_core.metrics import batched_features, feature_stats, fid_from_stats, uint8_to_float
    from pipelines.evaluate import evaluate
    from ray_jobs.sample import SampleConfig, baseline_output, shard_files
    from tests.test_sample import fake_shards

    torch.manual_seed(0)
    classifier = Classifier(ClassifierConfig(num_classes=3, image_size=8, width=8, feature_dim=16)).eval()
    save_classifier(classifier, tmp_path / "classifier", extra={"metrics": {"val_accuracy": 0.5}})
    rng = np.random.default_rng(0)
    images, base, ref = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (30, 12, 40))
    labels = np.arange(30) % 3
    cfg = SampleConfig(model="models:/m/1", output=str(tmp_path / "samples"), num_images=30, images_per_shard=7,
                       baseline_images=12, sampler="ddim")
    fake_shards(cfg, images, labels)
    fake_shards(replace(cfg, output=baseline_output(cfg.output), num_images=12), base, labels[:12])
    storage.write_json(storage.join(cfg.output, CONFIG_FILE), cfg.identity())
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    params = {"features": "classifier", "reference": str(tmp_path / "ref.npz"), "num_actors": 2, "actor_num_cpus": 0.5}

    metrics = evaluate(cfg.output, "unused", str(tmp_path / "classifier"), params)

    def stats(a):
        return feature_stats(batched_features(classifier.features, a))
    assert metrics["fid"] == pytest.approx(fid_from_stats(stats(images), stats(ref)), rel=1e-6)
    assert metrics["fid_untrained"] == pytest.approx(fid_from_stats(stats(base), stats(ref)), rel=1e-6)
    assert metrics["fid_ratio_to_untrained"] == pytest.approx(metrics["fid"] / metrics["fid_untrained"])
    assert metrics["class_accuracy"] == float((predict(classifier, uint8_to_float(images)) == labels).mean())
    assert (metrics["num_samples"], metrics["reference_count"], metrics["baseline_images"]) == (30, 40, 12)
    assert metrics["sampler"] == "ddim" and metrics["model"] == "models:/m/1"

    storage.delete(shard_files(cfg.output, 2, ["parquet"])["parquet"])
    with pytest.raises(RuntimeError, match="holds 23 of the 30 samples images"):
        evaluate(cfg.output, "unused", str(tmp_path / "classifier"), params)


def test_train_classifier_publishes_a_whole_version(tmp_path):
    """The train_classifier stage publishes through storage.publishing: the version holds the
    weights and the record (with the metrics), and reads back as the same classifier."""
    from pipelines.train_classifier import publish

    model = Classifier(ClassifierConfig(num_classes=3, image_size=8, width=8, feature_dim=16)).eval()
    out = str(tmp_path / "classifier")
    publish(model, {"val_accuracy": 0.5}, out)
    publish(model, {"val_accuracy": 0.75}, out)                     # the next version replaces it whole
    version = storage.current(out, "classifier.json")
    assert version.endswith("v-2") and sorted(os.listdir(version)) == ["classifier.json", "classifier.pt"]
    assert sorted(os.listdir(out)) == ["classifier.json", "v-2"]
    assert json.loads((Path(version) / "classifier.json").read_text())["metrics"] == {"val_accuracy": 0.75}
    loaded, _ = load_classifier(version)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.features(x), model.features(x))
