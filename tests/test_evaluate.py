"""The evaluation's MLflow records, on a real MLflow (SQLite): metrics and the grid in the scored
version's training run, the version tagged with its FID, and the alias moving only to a better
version; models load back from their URIs; the classifier the offline FID relies on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_core.classifier import Classifier, ClassifierConfig, ClassifierTrainConfig, accuracy, load_classifier, save_classifier, train_classifier
from ray_jobs import storage, tracking
from ray_jobs.model_source import load_bundle
from dit_core.contract import SAMPLE_CONFIG_FILE, SAMPLE_GRID_FILE, SAMPLE_SUMMARY_FILE
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
    storage.write_json(storage.join(root, SAMPLE_CONFIG_FILE), {"model": model_uri})
    from dit_core.data import png_bytes

    storage.write_bytes(storage.join(root, SAMPLE_GRID_FILE), png_bytes(np.zeros((4, 4, 3), np.uint8)))
    return str(root)


def eval_metrics(model_uri: str, fid: float) -> dict:
    return {"model": model_uri, "fid": fid, "class_accuracy": 0.9, "fid_untrained": 100.0, "sampler": "ddim",
            "num_steps": 10, "eta": 0.0, "guidance_scale": 1.0, "guided_channels": None, "seed": 0,
            "feature_network": "classifier", "reference": "val", "num_samples": 8}


@pytest.mark.timeout(600)   # a dozen registry writes: minutes on a shared 2-core machine
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
    assert any(a.path == f"eval/{SAMPLE_GRID_FILE}" for a in client.list_artifacts(run1, "eval"))

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


def test_the_alias_never_moves_to_a_version_worse_on_the_label_free_distance(mlflow_sqlite, tmp_path):
    """A better FID does not take the alias from a holder with a better label-free distance measured
    the same way (same pixel features, same reference); measured otherwise, it is not compared."""
    from mlflow import MlflowClient

    from pipelines.evaluate import register

    tracking.configure_tracking()
    client = MlflowClient()
    versions = [register_version(seed)[1] for seed in (1, 2, 3, 4)]

    def scored(v: str, fid: float, label_free: float, measure: str = "pixels8x8+hist4", features: str = "classifier@aaaa") -> dict:
        metrics = {**eval_metrics(f"models:/{NAME}/{v}", fid), "feature_network_id": features, "reference_id": "val@1111",
                   "fd_label_free": label_free, "fd_label_free_measure": measure}
        return register(fake_samples(tmp_path / f"s-{v}-{fid}-{measure}-{features}", f"models:/{NAME}/{v}"), metrics, "champion")

    assert scored(versions[0], 5.0, 10.0)["moved"]
    mv = client.get_model_version(NAME, versions[0])
    assert float(mv.tags[tracking.FD_LABEL_FREE_TAG]) == 10.0
    assert mv.tags[tracking.FD_LABEL_FREE_BASIS_TAG] == "pixels8x8+hist4@val@1111"
    out = scored(versions[1], 3.0, 20.0)                                 # better FID, worse picture: stays
    assert not out["moved"] and out["previous_fid"] == 5.0 and out["previous_fd_label_free"] == 10.0
    assert "label-free distance 20 is worse" in out["reason"]
    out = scored(versions[1], 3.0, 20.0, features="classifier@bbbb")      # FID not comparable, picture still worse: stays
    assert not out["moved"] and out["previous_fid"] is None and out["previous_fd_label_free"] == 10.0
    out = scored(versions[2], 4.0, 8.0)                                  # better on both: moves
    assert out["moved"] and out["previous"] == versions[0]
    out = scored(versions[3], 2.0, 30.0, measure="pixels4x4+hist4")      # label-free measured otherwise: not compared
    assert out["moved"] and out["previous_fd_label_free"] is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == versions[3]
    assert client.get_run(client.get_model_version(NAME, versions[3]).run_id).data.metrics["eval.fd_label_free"] == 30.0


def test_settings_that_cannot_work_are_refused_by_name():
    from dataclasses import asdict

    from pipelines.evaluate import EvaluateSettings, check_settings

    ok = asdict(EvaluateSettings())
    check_settings(ok)
    for change, message in (({"pr_max_images": 3}, "evaluate.pr_max_images=3.*at least 4"),
                            ({"pixel_pool": 0}, "evaluate.pixel_pool=0"),
                            ({"features": "clip"}, "evaluate.features='clip'"),
                            ({"inception_weights": "w.pth"}, "set evaluate.features: inception")):
        with pytest.raises(SystemExit, match=message):
            check_settings({**ok, **change})


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

    tracking.configure_tracking()
    client = MlflowClient()
    _, v1, _ = register_version(1)
    _, v2, _ = register_version(2)
    client.set_registered_model_alias(NAME, "champion", v1)
    sampled = load_bundle(f"models:/{NAME}@champion")               # what the sample job does
    assert sampled.pinned_uri == f"models:/{NAME}/{v1}"
    samples = fake_samples(tmp_path / "s", f"models:/{NAME}@champion")
    storage.write_json(storage.join(samples, SAMPLE_SUMMARY_FILE), {"model_version": sampled.pinned_uri,
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
    """An ADM .npz: its mu/sigma (and mu_s/sigma_s) are used as they are when they fit the feature
    network (the Inception's 2048 values; a classifier's own statistics), its arr_0 images for the
    rest; statistics of another network's features need arr_0. Images become slices for the actors."""
    from pipelines.evaluate import reference_source
    from ray_jobs.features import npz_items, read_item

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "stats.npz", mu=np.ones(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3), count=np.int64(7))
    ref = reference_source(str(tmp_path / "stats.npz"), "unused", 4)
    assert ref.items == [] and ref.stats.count == 7 and ref.name == ref.id == str(tmp_path / "stats.npz")
    np.testing.assert_array_equal(ref.stats.sigma, np.eye(4))
    np.testing.assert_array_equal(ref.spatial_stats.mu, np.zeros(3))
    with pytest.raises(ValueError, match="its mu has 4 values but the feature network gives 64.*give a .npz with arr_0 images"):
        reference_source(str(tmp_path / "stats.npz"), "unused", 64)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", mu=np.ones(4), sigma=np.eye(4), arr_0=images)
    ref = reference_source(str(tmp_path / "adm.npz"), "unused", 4)
    assert ref.stats is not None and ref.spatial_stats is None and len(ref.items) == 1
    ref = reference_source(str(tmp_path / "adm.npz"), "unused", 16)
    assert ref.stats is None and [(i["start"], i["stop"]) for i in ref.items] == [(0, 40)]
    items = npz_items("reference", str(tmp_path / "adm.npz"), rows_per_item=15)
    assert [(i["start"], i["stop"]) for i in items] == [(0, 15), (15, 30), (30, 40)]
    np.testing.assert_array_equal(np.concatenate([read_item(i)[0] for i in items]), images)
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="expected mu and sigma, or arr_0 images"):
        reference_source(str(tmp_path / "other.npz"), "unused", 4)
    with pytest.raises(FileNotFoundError, match="use 'val' or an ADM reference .npz"):
        reference_source(str(tmp_path / "none.npz"), "unused", 4)


@pytest.mark.timeout(900)
def test_distributed_feature_pass_equals_the_single_process_computation(ray_cluster, mlflow_sqlite, tmp_path):
    """evaluate's table (FID, sFID, IS, precision/recall on a capped subsample), the label-free
    distance with its floor (the reconstructions of the reference by the autoencoder bundled with the
    sampled, registered model) and the untrained baseline's, colour statistics and class accuracy,
    computed by two actors in blocks (a shard each) and merged in float64, equal the single-process
    computation on the same images. Tolerance: distances to a relative 1e-6 (float32 features of
    differently sized batches round differently, ~1e-7 relative; the merge itself is exact to
    ~1e-12), IS to 1e-9, counts and shares exactly."""
    from dataclasses import replace

    from dit_core.autoencoders import load_autoencoder
    from dit_core.classifier import Classifier, ClassifierConfig, predict, save_classifier
    from dit_core.image_stats import ColourStats, colour_ratios, pixel_features
    from dit_core.metrics import FeatureSample, feature_stats, fid_from_stats, inception_score, precision_recall, reconstructions, sample_keys, uint8_to_float
    from pipelines.evaluate import evaluate, shard_uris
    from ray_jobs.features import npz_items, parquet_items, read_item
    from ray_jobs.sample import SampleConfig, baseline_output, shard_files
    from tests.fixtures_registry import NAME as REGISTERED, register_tiny_model
    from tests.test_sample import fake_shards

    registered = register_tiny_model(tmp_path)
    torch.manual_seed(0)
    classifier = Classifier(ClassifierConfig(num_classes=3, image_size=8, width=8, feature_dim=16)).eval()
    save_classifier(classifier, tmp_path / "classifier", extra={"metrics": {"val_accuracy": 0.5}})
    rng = np.random.default_rng(0)
    images, base, ref = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (30, 12, 40))
    labels = np.arange(30) % 3
    cfg = SampleConfig(model=f"models:/{REGISTERED}/{registered['version']}", output=str(tmp_path / "samples"), num_images=30,
                       images_per_shard=7, baseline_images=12, sampler="ddim")
    fake_shards(cfg, images, labels)
    fake_shards(replace(cfg, output=baseline_output(cfg.output), num_images=12), base, labels[:12])
    storage.write_json(storage.join(cfg.output, SAMPLE_CONFIG_FILE), cfg.identity())
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    params = {"features": "classifier", "inception_weights": None, "reference": str(tmp_path / "ref.npz"), "pr_max_images": 25,
              "pr_seed": 3, "pixel_pool": 8, "histogram_levels": 4, "floor": True, "autoencoder": None,
              "num_actors": 2, "actor_num_cpus": 0.5}

    metrics = evaluate(cfg.output, "unused", str(tmp_path / "classifier"), params)

    def outputs(a):
        with torch.no_grad():
            return [t.numpy() for t in classifier.outputs(uint8_to_float(a))]

    def fd(a, b, f):
        return fid_from_stats(feature_stats(f(a)), feature_stats(f(b)))

    pool, spatial, pixels = (lambda a: outputs(a)[0]), (lambda a: outputs(a)[2]), pixel_features
    floor = reconstructions(load_autoencoder(registered["autoencoder"]), ref)
    assert not np.array_equal(floor, ref)
    assert metrics["fid"] == pytest.approx(fd(images, ref, pool), rel=1e-6)
    assert metrics["sfid"] == pytest.approx(fd(images, ref, spatial), rel=1e-6)
    assert metrics["fid_untrained"] == pytest.approx(fd(base, ref, pool), rel=1e-6)
    assert metrics["fid_ratio_to_untrained"] == pytest.approx(metrics["fid"] / metrics["fid_untrained"])
    assert metrics["fid_floor"] == pytest.approx(fd(floor, ref, pool), rel=1e-6)
    softmax = lambda a: torch.softmax(torch.from_numpy(outputs(a)[1]).double(), 1).numpy()  # noqa: E731
    assert metrics["inception_score"] == pytest.approx(inception_score(softmax(images)), rel=1e-9)
    assert metrics["inception_score_reference"] == pytest.approx(inception_score(softmax(ref)), rel=1e-9)
    assert metrics["fd_label_free"] == pytest.approx(fd(images, ref, pixels), rel=1e-6)
    assert metrics["fd_label_free_floor"] == pytest.approx(fd(floor, ref, pixels), rel=1e-6)
    assert metrics["fd_label_free_untrained"] == pytest.approx(fd(base, ref, pixels), rel=1e-6)
    assert metrics["fd_label_free_ratio_to_floor"] == pytest.approx(metrics["fd_label_free"] / metrics["fd_label_free_floor"])
    assert metrics["fd_label_free_measure"] == "pixels8x8+hist4"
    assert metrics["floor_autoencoder"]        # found through the sampled version's bundle (the floor above proves which)
    for key, got in (("colour_samples", images), ("colour_reference", ref), ("colour_floor", floor)):
        assert metrics[key] == pytest.approx(ColourStats.of(got).means()), key
    assert metrics["colour_ratio"] == pytest.approx(colour_ratios(ColourStats.of(images).means(), ColourStats.of(ref).means()))

    # precision/recall on each set's 25 images with the smallest seeded keys, whichever actor read them
    def subsample(items):
        total = None
        for item in items:
            got, _ = read_item(item)
            part = FeatureSample.of(pool(got), sample_keys(3, f"{item['uri']}:{item['start']}", len(got)), 25)
            total = part if total is None else total.merge(part)
        return total.features
    want = precision_recall(subsample(npz_items("reference", str(tmp_path / "ref.npz"))),
                            subsample(parquet_items("samples", shard_uris(cfg.output))))
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(want, abs=1e-12)
    assert (metrics["pr_images"], metrics["pr_reference_images"]) == (25, 25)
    assert metrics["class_accuracy"] == float((predict(classifier, uint8_to_float(images)) == labels).mean())
    assert (metrics["num_samples"], metrics["reference_count"], metrics["baseline_images"]) == (30, 40, 12)
    assert metrics["sampler"] == "ddim" and "not_available" not in metrics

    storage.delete(shard_files(cfg.output, 2, ["parquet"])["parquet"])
    with pytest.raises(RuntimeError, match="holds 23 of the 30 samples images"):
        evaluate(cfg.output, "unused", str(tmp_path / "classifier"), {**params, "floor": False})


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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_inception_features_from_s3_weights_and_an_adm_reference_batch(ray_cluster, s3_bucket, tmp_path):
    """features: inception with its weights on S3 (a randomly initialised pytorch-fid layout under
    the real file name: the real weights cannot be fetched here), copied once by each actor to its
    cache. The ADM reference batch's mu/sigma and mu_s/sigma_s (computed here by the same network
    on its arr_0) give the same FID and sFID as its images; IS comes from the 1008 logits. A batch
    of statistics alone leaves precision, recall and the label-free distance out, and says why."""
    from dit_core.classifier import Classifier, ClassifierConfig, save_classifier
    from dit_core.metrics import FID_INCEPTION_FILE, InceptionFeatures, feature_stats, fid_from_stats, inception_score, uint8_to_float
    from pipelines.evaluate import evaluate
    from ray_jobs.features import inception_cache_path
    from ray_jobs.sample import SampleConfig
    from tests.test_metrics import random_fid_inception
    from tests.test_sample import fake_shards

    local = tmp_path / "weights" / FID_INCEPTION_FILE
    random_fid_inception(local)
    uri = f"s3://{s3_bucket}/weights/{FID_INCEPTION_FILE}"
    storage.write_bytes(uri, local.read_bytes())
    save_classifier(Classifier(ClassifierConfig(num_classes=2, image_size=8, width=8, feature_dim=8)).eval(), tmp_path / "classifier")
    rng = np.random.default_rng(1)
    images, ref = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    cfg = SampleConfig(model="unused", output=str(tmp_path / "samples"), num_images=6, images_per_shard=3, baseline_images=0)
    fake_shards(cfg, images, np.arange(6) % 2)
    storage.write_json(storage.join(cfg.output, SAMPLE_CONFIG_FILE), cfg.identity())
    net = InceptionFeatures(local)
    with torch.no_grad():
        (pool_s, logits_s, spatial_s), (pool_r, _, spatial_r) = (net.outputs(uint8_to_float(a)) for a in (images, ref))
    ref_stats, ref_spatial = feature_stats(pool_r.numpy()), feature_stats(spatial_r.numpy())
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=ref, mu=ref_stats.mu, sigma=ref_stats.sigma, mu_s=ref_spatial.mu, sigma_s=ref_spatial.sigma)
    params = {"features": "inception", "inception_weights": uri, "reference": str(tmp_path / "VIRTUAL_ref.npz"), "pr_max_images": 100,
              "pr_seed": 0, "pixel_pool": 8, "histogram_levels": 4, "floor": False, "autoencoder": None,
              "num_actors": 1, "actor_num_cpus": 1}

    cached = inception_cache_path(uri)
    try:
        metrics = evaluate(cfg.output, "unused", str(tmp_path / "classifier"), params)
        assert cached.read_bytes() == local.read_bytes()          # the actor's copy (one host here: the test's cache)
    finally:
        shutil.rmtree(cached.parent, ignore_errors=True)          # 100 MB per test bucket otherwise
    assert metrics["fid"] == pytest.approx(fid_from_stats(feature_stats(pool_s.numpy()), ref_stats), rel=1e-5)
    assert metrics["sfid"] == pytest.approx(fid_from_stats(feature_stats(spatial_s.numpy()), ref_spatial), rel=1e-5)
    assert metrics["inception_score"] == pytest.approx(inception_score(torch.softmax(logits_s.double(), 1).numpy()), rel=1e-6)
    assert metrics["feature_network"] == "inception" and 0 <= metrics["precision"] <= 1 and metrics["fd_label_free"] > 0
    assert metrics["not_available"] == {"floor": "evaluate.floor is false"}

    np.savez(tmp_path / "stats_only.npz", mu=ref_stats.mu, sigma=ref_stats.sigma)
    metrics = evaluate(cfg.output, "unused", str(tmp_path / "classifier"),
                       {**params, "reference": str(tmp_path / "stats_only.npz"), "inception_weights": str(local)})
    assert metrics["fid"] == pytest.approx(fid_from_stats(feature_stats(pool_s.numpy()), ref_stats), rel=1e-5)
    assert metrics["precision"] is None and metrics["recall"] is None and metrics["fd_label_free"] is None and metrics["sfid"] is None
    assert "holds statistics only" in metrics["not_available"]["precision"]
    assert "mu_s/sigma_s" in metrics["not_available"]["sfid"]
