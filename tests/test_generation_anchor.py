"""The one generator gives the bytes the two generators gave before they were merged: a regression
anchor for "the same images for the same settings and seeds" (tests/generation_anchor.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dit_core.autoencoders import Autoencoder
from dit_core.models import DiT
from dit_core.pipeline import ImagePipeline, SamplingSettings, image_seed
from tests.generation_anchor import BATCH_SIZE, CASES, LABELS, RUN_SEED, SCALE, digests

# Computed, not invented: `python -m tests.generation_anchor` at commit 6307833 (the code of dadcad6,
# before ImageSampler was merged into ImagePipeline), on CPU with one thread. Then the bulk job's
# ImageSampler and dit_core.pipeline.ImagePipeline gave these same digests for every case.
BEFORE_THE_MERGE = {
    "eps-ddpm-g1": "935359e62843fa486b541c0ae6bc3fb27221b048bdb26c2a26a72e4d4a501fab",
    "eps-ddim-g2": "5783f9e5117d72302082a7f3a3febedae50130a07b4d93e81b5b9bc5b7e9860e",
    "eps-ddim-eta-g2": "3cdb993e202b3e8d51bd607b6ec2b855c948e2cab0e1fc0d05586ec3dab77dbc",
    "eps-dpm-g1": "277636e9ef63d8f93a38317ff3c755838bbd274369f5dec97dde5623c7bf09c9",
    "eps-dpm-g2": "0eb910dbdbaf9e7b1c5d5a71c3451f44eccca68898bfb00528007ef60a6e02a2",
    "eps-dpm-g2-official": "3818cfbe39e60ecfcb30b5e246d2c21f2f10b66959b139564bb34ea8d4cc0a0f",
    "eps-dpm-g2-cache2": "7a917b42a2cdba17eee97909df26a8961d131a704e4be3a808054fd3c9399585",
    "flow-euler-g1": "c08c3f9af6e1d765407dacbdb470f87e4ca9a592be169c85060c4b95cdeee23a",
    "flow-heun-g2": "dcc8996281f55964238d9e2a3a88e6e73a3be65aea11523ef216ce78eabc6a69",
    "flow-dpm-g1": "9cbe6418a3f18dd15e836c80b1535cc548eb6fe5885d6ae0be264b39d3f36b1b",
    "flow-dpm-g2": "0445b09c26bca3364b060a598e87e8676ec02b1ed1a2ee1410af2f98318d5b39",
}


def pipeline_images(model: DiT, ae: Autoencoder, diffusion: dict[str, Any], sampling: dict[str, Any]) -> np.ndarray:
    seeds = [image_seed(RUN_SEED, i) for i in range(len(LABELS))]
    pipe = ImagePipeline(model, ae, SCALE, diffusion, device="cpu")
    return pipe.generate(LABELS, seeds, SamplingSettings(**sampling), batch_size=BATCH_SIZE)


@pytest.mark.timeout(600)
def test_the_pipeline_gives_the_images_of_before_the_merge() -> None:
    assert set(CASES) == set(BEFORE_THE_MERGE)
    assert len(set(BEFORE_THE_MERGE.values())) == len(CASES), "every case is another set of images"
    now = digests(pipeline_images)
    changed = {name: (BEFORE_THE_MERGE[name], d) for name, d in now.items() if d != BEFORE_THE_MERGE[name]}
    assert not changed, f"cases whose images changed (before, now): {changed}"
