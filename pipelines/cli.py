"""``dit``: one command for every stage and job (``[project.scripts]`` in pyproject.toml).

``dit <command> ...`` runs the same ``main`` as ``python -m <module> ...`` (which keeps working for
``ray job submit``), with the same flags; ``dit <command> --help`` also lists the settings of the
command's ``params.yaml`` section with their defaults, taken from the settings dataclass (the one
place they live). ``dit generate`` makes a grid of images from any model in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence


from dit_core import settings
from dit_core.contract import CHECKPOINT_STATE_FILE, CLASS_NAMES_KEY


@dataclass(frozen=True)
class Command:
    module: str                     # python -m <module>
    help: str
    settings: str | None = None     # "module:Class", the settings dataclass of its params section
    section: str | None = None
    prefix: tuple[str, ...] = ()    # arguments put before the user's (a subcommand of the module)


COMMANDS = {
    "prepare": Command("pipelines.prepare", "decode, crop and split the source images into parquet shards (stage)",
                       "pipelines.prepare:PrepareConfig", "prepare"),
    "train-autoencoder": Command("pipelines.train_autoencoder", "train the small autoencoder on the prepared data (stage)",
                                 "pipelines.train_autoencoder:AutoencoderSettings", "train_autoencoder"),
    "encode": Command("ray_jobs.encode", "encode prepared images to latents with Ray Data (job)",
                      "ray_jobs.encode:EncodeConfig", "encode"),
    "train": Command("ray_jobs.train", "train a DiT on latents with Ray Train; logs and registers it in MLflow (job)",
                     "ray_jobs.train:TrainConfig", "train"),
    "sample": Command("ray_jobs.sample", "generate images in bulk with Ray Data, resumable (job)",
                      "ray_jobs.sample:SampleConfig", "sample"),
    "train-classifier": Command("pipelines.train_classifier", "train the classifier behind the offline FID (stage)",
                                "pipelines.train_classifier:ClassifierSettings", "train_classifier"),
    "evaluate": Command("pipelines.evaluate", "score samples (FID, class accuracy), tag the version, move the alias (stage)",
                        "pipelines.evaluate:EvaluateSettings", "evaluate"),
    "local-cluster": Command("ray_jobs.local_cluster", "run a command (dvc repro) with one local Ray cluster that its stages share"),
    "generate": Command("pipelines.cli", "a grid of images (labels x seeds) from a model, in seconds on a CPU"),
    "export": Command("dit_core.diffusers_interop", "a model (--model models/dit, models:/name@alias, a checkpoint) -> a "
                      "diffusers folder that plain diffusers samples", prefix=("export",)),
    "import": Command("dit_core.diffusers_interop", "a diffusers DiT folder -> our checkpoint .pt", prefix=("import",)),
}


def _load(ref: str) -> object:
    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, name) if name else obj


def settings_help(cmd: Command) -> str:
    """The command's params.yaml section: each setting and its default, from the dataclass (the
    same list its ``--help`` ends with)."""
    return settings.settings_listing(_load(cmd.settings), cmd.section or "") if cmd.settings else ""


def run_module(name: str, argv: Sequence[str]) -> int:
    """``python -m <module> argv`` in this process: its ``main``, its help (with the settings list,
    which the module's own parser shows), its exit code."""
    cmd = COMMANDS[name]
    main: Callable[..., int | None] = _load(f"{cmd.module}:main")  # type: ignore[assignment]
    prog, sys.argv[0] = sys.argv[0], f"dit {name}"
    try:
        code = main([*cmd.prefix, *argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv[0] = prog
    return int(code or 0)


# ---------------------------------------------------------------------------------------------
# dit generate
# ---------------------------------------------------------------------------------------------

def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated image seeds, each an integer in [0, 2**63 - 1]."""
    from dit_core.pipeline import check_seed

    seeds = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        try:
            seeds.append(check_seed(int(item) if item.lstrip("-").isdigit() else item))
        except settings.SettingError as e:
            raise argparse.ArgumentTypeError(f"{item!r} {e.problem}, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. --seeds 0,1")
    return seeds


def positive_int(text: str) -> int:
    """An integer of at least 1 (``--zoom``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def torch_device(text: str) -> str:
    """``--device``: a device torch knows (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: give cpu, cuda, cuda:N or mps") from None
    return text


def generate_parser() -> settings.CommandParser:
    from dit_core.pipeline import SamplingSettings

    p = settings.CommandParser(prog="dit generate", description=COMMANDS["generate"].help + ": one row per label, one column per seed.",
                               formatter_class=settings.HelpFormatter)
    p.add_argument("--model", required=True, help="models:/name@alias, models:/name/version, runs:/id/model, a checkpoint dir or .pt")
    p.add_argument("--labels", required=True, help="comma-separated class ids or class names, e.g. 3,7")
    p.add_argument("--seeds", type=seed_list, default="0", help="comma-separated image seeds (the bulk sampler's `seed` column) (default: 0)")
    p.add_argument("--out", default="grid.png", help="the PNG to write, local or s3:// (default: grid.png)")
    p.add_argument("--autoencoder", default=None, help="autoencoder folder (default: the model's own; needed for official .pt files)")
    p.add_argument("--zoom", type=positive_int, default=4, help="pixels per image pixel in the grid (default: 4)")
    p.add_argument("--device", type=torch_device, default=None, help="cpu, cuda, ... (default: cuda when present)")
    settings.add_arguments(p, SamplingSettings, help={k: "the model's recorded value, else" for k in ("sampler", "num_steps", "guidance_scale")})
    return p


def generate(argv: Sequence[str] | None = None) -> int:
    from dit_core.data import image_grid, png_bytes
    from dit_core.diffusion import make_objective
    from dit_core.pipeline import ImagePipeline, SamplingSettings, check_sampling, objective_sampling
    from ray_jobs import storage
    from ray_jobs.mlflow_model import resolve_label
    from ray_jobs.model_source import load_autoencoder_for, load_bundle

    p = generate_parser()
    a = p.parse_args(argv)
    with p.refusing(a):
        given = settings.from_args(a, SamplingSettings)
        settings.build(SamplingSettings, given, "generate")   # the flags alone, before the model loads
    with p.refusing(a, flag=f"--out {a.out}"):
        storage.check_writable(os.path.dirname(a.out) or ".")
    with p.refusing(a, flag=f"--model {a.model}"):
        bundle = load_bundle(a.model)
    with p.refusing(a, values={"class_label": f"--labels {a.labels}"}):
        # the model's recorded sampling (else its objective's defaults), then the flags given
        sampling = settings.build(SamplingSettings, {**objective_sampling(bundle.diffusion), **bundle.sampling, **given}, "generate")
        check_sampling(make_objective(bundle.diffusion, learn_sigma=bundle.config.learn_sigma), sampling)
        names = [str(n) for n in bundle.latents.get(CLASS_NAMES_KEY) or []]
        labels = [resolve_label(v.strip(), names, bundle.config.num_classes) for v in a.labels.split(",") if v.strip()]
        if not labels:
            p.error(f"--labels {a.labels!r}: give at least one class id or name, e.g. --labels 3,7")
    with p.refusing(a, flag=f"--autoencoder {a.autoencoder}" if a.autoencoder else f"--model {a.model}"):
        autoencoder, scale = load_autoencoder_for(bundle, a.autoencoder)
    pipe = ImagePipeline(bundle.build_model(), autoencoder, scale, bundle.diffusion, device=a.device)
    seeds = a.seeds   # checked by seed_list
    rows = [(c, s) for c in labels for s in seeds]
    images = pipe.generate([c for c, _ in rows], [s for _, s in rows], sampling)
    storage.write_bytes(a.out, png_bytes(image_grid(images.reshape(len(labels), len(seeds), *images.shape[1:]), a.zoom)))
    print(f"{len(images)} images ({len(labels)} labels x {len(seeds)} seeds, {sampling.sampler} {sampling.num_steps} steps) -> {a.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# dit export
# ---------------------------------------------------------------------------------------------

MODEL_FLAG = "--model"


def export(argv: Sequence[str]) -> int:
    """``dit export``: ``python -m dit_core.diffusers_interop export`` (a ``.pt``), or with
    ``--model MODEL OUT`` any model ``load_bundle`` resolves (``models/dit``, ``models:/name@alias``,
    a checkpoint folder), written as a ``.pt`` of our layout for it."""
    import tempfile

    import torch

    argv = list(argv)
    given = [i for i, v in enumerate(argv) if v == MODEL_FLAG or v.startswith(MODEL_FLAG + "=")]
    if not given:
        return run_module("export", argv)
    i = given[0]
    if "=" in argv[i]:
        model, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1:]
    elif i + 1 < len(argv):
        model, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        print("dit export: error: --model needs a model: models/dit, models:/name@alias, or a checkpoint folder", file=sys.stderr)
        return 2
    from ray_jobs.model_source import load_bundle

    try:
        bundle = load_bundle(model)
    except (ValueError, FileNotFoundError) as e:
        print(f"dit export: error: --model {model}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dit-export-") as tmp:
        checkpoint = os.path.join(tmp, CHECKPOINT_STATE_FILE)
        torch.save({"ema": bundle.state_dict, "model_config": bundle.model_config, "diffusion": bundle.diffusion,
                    "latents": bundle.latents}, checkpoint)
        return run_module("export", [checkpoint, *rest])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        name, rest = argv[0], argv[1:]
        return generate(rest) if name == "generate" else export(rest) if name == "export" else run_module(name, rest)
    p = settings.CommandParser(prog="dit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {n:<18} {c.help}" for n, c in COMMANDS.items())
                                + "\n\n`dit <command> --help` shows its flags and settings.")
    p.add_argument("command", choices=list(COMMANDS), metavar="command")
    p.parse_args(argv[:1] or None)
    return 2


if __name__ == "__main__":
    sys.exit(main())
