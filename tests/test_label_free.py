"""The label-free distance sees what a person sees and the classifier's FID does not.

A small coloured set (tests/fixtures_data.py: bright shapes, the classes, on dark cyan-to-violet
grounds), a classifier trained on it for 120 steps, and three copies of a held-out real set that a
person rejects at a glance: grey (colour lost), grounds repainted red to yellow, and one image per
class repeated (no diversity). Each set goes through the feature pass's own per-block code
(``ray_jobs.features.set_features``; tests/test_evaluate.py shows the distributed pass equals it).

Distances are compared on the scale of the reference's own spread, tr(Sigma_ref) of the features
each distance uses. Measured (seeds as below): the real copy scores 0.05 of that spread on the
label-free distance; grey 3.0, repainted grounds 2.4, one-per-class 1.6, that is 29x to 55x the
real copy. The classifier's FID moves by at most 0.006 of its spread for any of them (0.0001 for
the real copy): a contrast of 250x to 4000x. The asserts leave margins: >= 10x the real copy, >= 1
spread, the classifier <= 0.02 spread, a contrast >= 50x.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_core.classifier import ClassifierConfig, ClassifierTrainConfig, accuracy, train_classifier
from dit_core.image_stats import colour_ratios
from dit_core.metrics import fid_from_stats, uint8_to_float
from ray_jobs.features import PassSettings, SetFeatures, set_features
from tests.fixtures_data import coloured_shapes, desaturated, grounds_swapped, one_per_class

N = 300


@pytest.fixture(scope="module")
def judged() -> dict[str, SetFeatures]:
    torch.set_num_threads(1)          # a tiny CNN: threads only contend on a shared machine
    train, train_labels, _ = coloured_shapes(N, seed=0)
    reference, _, _ = coloured_shapes(N, seed=1)
    real, labels, masks = coloured_shapes(N, seed=2)
    classifier = train_classifier(uint8_to_float(train), torch.from_numpy(train_labels),
                                  ClassifierConfig(num_classes=3, image_size=16, width=8, feature_dim=16),
                                  ClassifierTrainConfig(steps=120, batch_size=32))
    assert accuracy(classifier, uint8_to_float(real), torch.from_numpy(labels)) > 0.6   # it learnt the shapes
    sets = {"reference": reference, "real": real, "grey": desaturated(real), "grounds": grounds_swapped(real, masks, seed=3),
            "one_per_class": one_per_class(real, labels)}
    settings = PassSettings(network="classifier")
    with torch.no_grad():
        return {name: set_features(images, labels, classifier, classifier, settings, name) for name, images in sets.items()}


def spread_shares(found: dict[str, SetFeatures], name: str) -> tuple[float, float]:
    """(classifier FID, label-free distance) of set ``name``, each as a share of the reference's tr(Sigma)."""
    ref = found["reference"]
    out = []
    for which in ("moments", "pixels"):
        ref_stats = getattr(ref, which).stats()
        out.append(fid_from_stats(getattr(found[name], which).stats(), ref_stats) / float(np.trace(ref_stats.sigma)))
    return out[0], out[1]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("broken", ["grey", "grounds", "one_per_class"])
def test_copies_a_person_rejects_score_worse_on_the_label_free_distance_only(judged, broken):
    fid_real, free_real = spread_shares(judged, "real")
    fid_broken, free_broken = spread_shares(judged, broken)
    assert free_broken >= 10 * free_real, (free_broken, free_real)
    assert free_broken >= 1.0, free_broken
    assert fid_broken <= 0.02, fid_broken                          # the classifier's FID barely moves
    assert free_broken >= 50 * max(fid_broken, 1e-6), (free_broken, fid_broken)


def test_the_colour_ratio_names_the_grey_samples(judged):
    ref = judged["reference"].colour.means()
    grey = colour_ratios(judged["grey"].colour.means(), ref)
    real = colour_ratios(judged["real"].colour.means(), ref)
    assert all(v == pytest.approx(0.0, abs=0.02) for v in grey.values()), grey
    assert all(v == pytest.approx(1.0, abs=0.1) for v in real.values()), real
