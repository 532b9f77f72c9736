"""The registered model (ray_jobs/mlflow_model.py) on a real MLflow SQLite registry: the bulk job,
the pyfunc and `dit generate` give the same images for the same seeds (one pipeline); the README's load-and-generate example runs in a
fresh process that imports the model's own code; the README's `mlflow models serve` command answers
on loopback; the sample job reads the same bundle; a broken bundle fails at load, naming the part."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO, free_port
from tests.fixtures_registry import CLASS_NAMES, IMAGE_SIZE, NAME, SAMPLING, TINY10, random_dit, register_tiny_model

README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        yield register_tiny_model(root)


def decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def readme_block(lang: str, after: str) -> str:
    """The first ```lang block of the README after the heading ``after``."""
    text = README[README.index(after):]
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def grid_cells(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The (rows * cols, H, W, 3) images of a grid with 1-pixel gaps (zoom 1)."""
    h, w = (grid.shape[0] - 1) // rows - 1, (grid.shape[1] - 1) // cols - 1
    return np.stack([grid[1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w]
                     for i in range(rows) for j in range(cols)])


@pytest.mark.timeout(300)
def test_bulk_job_pyfunc_and_cli_give_the_same_images(registry, tmp_path):
    """One generator: the bulk job's actor, the pyfunc model and `dit generate` all call
    dit_core.pipeline.ImagePipeline, so one (label, seed, settings) gives the same bytes in each."""
    import mlflow
    import pyarrow.parquet as pq

    from dit_core.pipeline import SamplingSettings, image_seed
    from pipelines.cli import generate
    from ray_jobs.model_source import load_autoencoder_for, load_bundle
    from ray_jobs.sample import SAMPLES, SampleConfig, ShardGenerator, read_shard

    uri = f"models:/{NAME}@champion"
    labels, seeds = [3, 7], [image_seed(7, 0), image_seed(7, 1)]   # the bulk job's seeds of a run with seed 7
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"class_label": [3, "seven"], "seed": seeds}))   # an id and a name
    assert list(out.columns) == ["image", "class_label", "seed"]
    assert out["class_label"].tolist() == labels and out["seed"].tolist() == seeds
    pyfunc = np.stack([decode(b) for b in out["image"]])
    assert pyfunc.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and pyfunc.std() > 5
    assert not np.array_equal(pyfunc[0], pyfunc[1])

    # the bulk job's actor, given the rows (index, label, seed) of one shard; the recorded settings
    bundle = load_bundle(uri)
    assert bundle.version == registry["version"] and bundle.sampling == {**vars(SamplingSettings()), **SAMPLING}
    assert bundle.latents["class_names"] == CLASS_NAMES and Path(bundle.latents["autoencoder_path"]).is_dir()
    for k, v in registry["model"].state_dict().items():
        assert torch.equal(bundle.state_dict[k], v), k
    cfg = SampleConfig(model=uri, output=str(tmp_path / "bulk"), num_images=2, images_per_shard=2, batch_size=1,
                       formats=["parquet"], use_gpu=False, **bundle.sampling)
    ae, scale = load_autoencoder_for(bundle)
    actor = ShardGenerator({"model": bundle, "autoencoder": ae, "scale_factor": scale}, asdict(cfg))
    done = actor({"index": np.array([1, 0]), "label": np.array(labels[::-1]), "seed": np.array(seeds[::-1], dtype=np.uint64),
                  "kind": np.array([SAMPLES, SAMPLES]), "shard": np.array([0, 0])})
    assert done["images"].tolist() == [2]
    index, bulk_labels, bulk = read_shard(cfg.output, 0)
    assert index.tolist() == [0, 1] and bulk_labels.tolist() == labels
    assert pq.read_table(f"{cfg.output}/parquet/shard-000000.parquet").column("seed").to_pylist() == seeds
    np.testing.assert_array_equal(bulk, pyfunc)

    # dit generate: one row per label, one column per seed (here: the diagonal is our two images)
    grid = tmp_path / "grid.png"
    assert generate(["--model", uri, "--labels", "three,7", "--seeds", ",".join(map(str, seeds)), "--zoom", "1",
                     "--device", "cpu", "--out", str(grid)]) == 0
    cli = grid_cells(decode(grid.read_bytes()), 2, 2)
    np.testing.assert_array_equal(cli[[0, 3]], pyfunc)


@pytest.mark.timeout(300)
def test_predict_takes_settings_per_row(registry):
    import mlflow

    from dit_core.pipeline import image_seed

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    seeds = [image_seed(7, 0)]
    images = np.stack([decode(b) for b in model.predict(pd.DataFrame({"class_label": [3], "seed": seeds}))["image"]])

    # per-row settings: the same row with other settings is another image; the defaults are the recorded ones
    mixed = model.predict(pd.DataFrame([{"class_label": 3, "seed": seeds[0]},
                                        {"class_label": 3, "seed": seeds[0], "num_steps": 2, "sampler": "ddpm", "guidance_scale": 1.0}]))
    np.testing.assert_array_equal(decode(mixed["image"][0]), images[0])
    assert not np.array_equal(decode(mixed["image"][1]), images[0])

    with pytest.raises(ValueError, match="'eleven' is not a class name of this model"):
        model.predict(pd.DataFrame({"class_label": ["eleven"], "seed": [0]}))
    with pytest.raises(ValueError, match="out of range: the model has 10 classes"):
        model.predict(pd.DataFrame({"class_label": [10], "seed": [0]}))


@pytest.mark.timeout(300)
def test_readme_example_runs_in_a_fresh_process_on_the_bundled_code(registry, tmp_path):
    """The README's three lines, in a process that cannot import this checkout's packages: the
    model's own copy of dit_core (code_paths) is what runs."""
    example = readme_block("python", "### Generate from the registered model")
    assert "mlflow.pyfunc.load_model" in example and len(example.strip().splitlines()) == 3
    script = tmp_path / "example.py"
    script.write_text(
        "import sys\n"
        f"sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__ + repr(f)]\n"
        + example +
        "import dit_core, json\n"
        "print(json.dumps({'dit_core': dit_core.__file__, 'labels': images['class_label'].tolist(),\n"
        "                  'pngs': [b.hex() for b in images['image']]}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["dit_core"].startswith(str(REPO / "dit_core")), f"dit_core came from the checkout: {result['dit_core']}"
    assert result["dit_core"].startswith(str(registry["root"])) and "/code/dit_core/" in result["dit_core"]
    assert result["labels"] == [3, 7]
    import mlflow

    here = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({"class_label": [3, 7], "seed": [0, 1]}))
    assert [bytes.fromhex(h) for h in result["pngs"]] == list(here["image"])


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    """The README's `mlflow models serve` command, on a free loopback port; yields the curl line and port."""
    lines = readme_block("bash", "### Generate from the registered model").splitlines()
    serve = next(line for line in lines if line.startswith("mlflow models serve"))
    curl = next(line for line in lines if line.startswith("curl"))
    port = free_port()
    argv = shlex.split(serve.replace("--port 5001", f"--port {port}"))
    assert "--env-manager" in argv and "127.0.0.1" in argv
    argv[0] = str(Path(sys.executable).with_name("mlflow"))
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn: the venv's
    proc = subprocess.Popen(argv + ["--workers", "1"], cwd=registry["root"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow models serve did not come up: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"curl": curl, "port": port}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        log.close()


@pytest.mark.timeout(300)
def test_served_model_answers_the_readmes_request(served, registry):
    import mlflow

    payload = re.search(r"-d '(.*)'", served["curl"]).group(1)
    assert "127.0.0.1:5001/invocations" in served["curl"]
    request = urllib.request.Request(f"http://127.0.0.1:{served['port']}/invocations", data=payload.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        answer = json.loads(r.read())
    rows = json.loads(payload)["dataframe_records"]
    assert [p["class_label"] for p in answer["predictions"]] == [r["class_label"] for r in rows]
    png = base64.b64decode(answer["predictions"][0]["image"])
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame(rows))
    assert png == local["image"][0]
    # a class name and per-row settings through the server's schema; a bad row is a 400 naming it
    body = {"dataframe_records": [{"class_label": "three", "seed": 5}, {"class_label": 1, "seed": 2, "num_steps": 2}]}
    request = urllib.request.Request(f"http://127.0.0.1:{served['port']}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        assert [p["class_label"] for p in json.loads(r.read())["predictions"]] == [3, 1]
    bad = urllib.request.Request(f"http://127.0.0.1:{served['port']}/invocations",
                                 data=json.dumps({"dataframe_records": [{"class_label": 42, "seed": 0}]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=60)
    assert "out of range" in e.value.read().decode()


def post(served: dict, body: dict) -> tuple[int, dict]:
    """POST ``body`` to the served model's /invocations: the status and the JSON answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{served['port']}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


SAMPLERS = "('ddpm', 'ddim', 'dpm-solver++')"
TAKES = "this model takes ['class_label', 'seed'] in every row and optionally ['num_steps', 'guidance_scale', 'sampler']"


@pytest.mark.parametrize("rows, params, says", [
    ([{"class_label": 42, "seed": 0}], None, "row 0: class_label=42 is out of range: the model has 10 classes (0..9)"),
    ([{"class_label": "eleven", "seed": 0}], None, "row 0: class_label='eleven' is not a class name of this model ('zero', "),
    ([{"class_label": 1, "seed": 0}, {"class_label": 1, "seed": -1}], None,
     "row 1: seed=-1 is not a seed: give an integer in [0, 2**63 - 1]"),
    ([{"class_label": 1, "seed": 0, "sampler": "euler"}], None,
     f"row 0: sampler='euler' does not fit this model: it was trained with objective 'eps', whose samplers are {SAMPLERS}"),
    ([{"class_label": 1, "seed": 0, "num_steps": 0}], None, "row 0: num_steps=0 must be at least 1"),
    ([{"class_label": 1, "seed": 0, "guidance_scale": "strong"}], None, "row 0: guidance_scale='strong' (str) is not a valid float"),
    ([{"class_label": 1, "seed": 0, "steps": 2}], None, f"unknown input columns ['steps']: {TAKES}"),
    ([{"class_label": 1, "seed": 0, "guidance": 4}], None, f"unknown input columns ['guidance']: {TAKES}"),
    ([{"class_label": 1}], None, f"input rows lack the columns ['seed']: {TAKES}"),
    ([{"class_label": 1, "seed": 0}], {"steps": 2}, "unknown params ['steps']: this model takes the params "
                                                    "['num_steps', 'guidance_scale', 'sampler']"),
    ([{"class_label": 1, "seed": 0}], {"sampler": "heun"}, f"row 0: sampler='heun' does not fit this model"),
], ids=["label-range", "label-name", "seed", "sampler", "num-steps", "guidance-type", "column-steps", "column-guidance",
        "no-seed", "param-unknown", "param-sampler"])
def test_served_model_names_a_refused_value(served, rows, params, says):
    """A 400 whose message is the reason (MLflow's INVALID_PARAMETER_VALUE), not its generic one."""
    status, answer = post(served, {"dataframe_records": rows, **({"params": params} if params else {})})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert says in answer["message"] and "unexpected error" not in answer["message"], answer["message"]


def test_served_model_honours_its_params(served):
    """``params`` give every row's settings where its own columns do not."""
    row = {"class_label": 1, "seed": 3}
    status, by_params = post(served, {"dataframe_records": [row], "params": {"num_steps": 2, "sampler": "ddpm"}})
    assert status == 200, by_params
    status, by_columns = post(served, {"dataframe_records": [{**row, "num_steps": 2, "sampler": "ddpm"}, row]})
    assert status == 200, by_columns
    assert by_params["predictions"][0]["image"] == by_columns["predictions"][0]["image"]
    assert by_params["predictions"][0]["image"] != by_columns["predictions"][1]["image"]


def _local_copy(tmp_path: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))


@pytest.mark.timeout(300)
def test_broken_bundles_fail_at_load_naming_the_part(registry, tmp_path):
    import mlflow
    from safetensors.torch import save_file

    from dit_core.contract import MODEL_AUTOENCODER_DIR, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

    model_dir = _local_copy(tmp_path / "a")
    bundle = model_dir / "artifacts" / "bundle"
    weights = next((bundle / MODEL_AUTOENCODER_DIR).glob("*.safetensors"))
    weights.unlink()
    with pytest.raises(Exception, match=rf"missing {MODEL_AUTOENCODER_DIR}/{weights.name} \(the autoencoder\)"):
        mlflow.pyfunc.load_model(str(model_dir))

    model_dir = _local_copy(tmp_path / "b")
    bundle = model_dir / "artifacts" / "bundle"
    other = random_dit(TINY10.__class__(**{**TINY10.to_dict(), "hidden_size": 64}))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(bundle / MODEL_WEIGHTS_FILE))
    with pytest.raises(Exception, match=rf"{MODEL_WEIGHTS_FILE} \(the weights\) has \d+ bytes, not the \d+ recorded"):
        mlflow.pyfunc.load_model(str(model_dir))
    # the same weights with a consistent file list: the shapes themselves are refused
    config = json.loads((bundle / MODEL_CONFIG_FILE).read_text())
    config["files"][MODEL_WEIGHTS_FILE] = (bundle / MODEL_WEIGHTS_FILE).stat().st_size
    (bundle / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"the weights dit.safetensors does not match the model: .*shape mismatches"):
        mlflow.pyfunc.load_model(str(model_dir))

    # the autoencoder of another latent space
    model_dir = _local_copy(tmp_path / "c")
    bundle = model_dir / "artifacts" / "bundle"
    shutil.rmtree(bundle / MODEL_AUTOENCODER_DIR)  # replaced by a consistent 3-channel autoencoder
    from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder, save_autoencoder

    cfg = SmallAutoencoderConfig(latent_channels=3, block_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    save_autoencoder(Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE), AutoencoderRecord("three", 1.0, 3, 2, IMAGE_SIZE)),
                     bundle / MODEL_AUTOENCODER_DIR)
    config = json.loads((bundle / MODEL_CONFIG_FILE).read_text())
    config["files"] = {str(p.relative_to(bundle)): p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.name != MODEL_CONFIG_FILE}
    (bundle / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Exception, match="the model takes 4-channel latents but autoencoder 'autoencoder/' makes 3"):
        mlflow.pyfunc.load_model(str(model_dir))
