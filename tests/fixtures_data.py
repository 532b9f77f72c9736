"""Data-stage test helpers: planted image folders, small params, a clone of the project
for DVC, and subprocess environments for stage runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IMAGE_SIZE = 16  # the tests' image size: the project default (params.yaml prepare.image_size)


def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def encode_image(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def random_rgb(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@dataclass
class PlantedFolder:
    """What was planted, so the test can compare it with the manifest."""

    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes
    empty_dirs: list[str] = field(default_factory=list)
    good: dict[str, int] = field(default_factory=dict)  # class -> usable images (incl. converted)
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped_reasons.values())

    @property
    def num_inputs(self) -> int:
        return sum(self.good.values()) + self.num_skipped

    def write_local(self, root: Path) -> Path:
        for rel, data in self.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for d in self.empty_dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
        return root

    def write_s3(self, uri: str) -> str:
        from ray_jobs import storage

        for rel, data in self.files.items():
            storage.write_bytes(storage.join(uri, rel), data)
        fs, path = storage.resolve(uri)
        for d in self.empty_dirs:
            fs.create_dir(f"{path}/{d}")  # an S3 "folder" marker object, as consoles create
        return uri


def planted_folder(per_class: int = 12, seed: int = 0) -> PlantedFolder:
    """Two classes of good RGB images, one of each convertible mode, and one of each bad input."""
    rng = np.random.default_rng(seed)
    big = IMAGE_SIZE + 8  # larger than image_size and not square: exercises the centre crop
    p = PlantedFolder()
    for cls in ("cat", "dog"):
        for i in range(per_class):
            fmt = "JPEG" if i % 2 else "PNG"
            p.files[f"{cls}/img{i:03d}.{fmt.lower()}"] = encode_image(random_rgb(rng, big, big - 4), fmt)
        p.good[cls] = per_class
    # Converted, not skipped: grayscale, palette, RGBA, 16-bit grayscale.
    rgb = random_rgb(rng, big, big)
    p.files["cat/sub/gray.png"] = encode_image(rgb.convert("L"))
    p.files["cat/palette.png"] = encode_image(rgb.convert("P"))
    p.files["dog/rgba.png"] = encode_image(rgb.convert("RGBA"))
    wide = (rng.integers(0, 65536, (big, big))).astype(np.uint16)
    p.files["dog/sixteen.png"] = encode_image(Image.fromarray(wide))
    p.good["cat"] += 2
    p.good["dog"] += 2
    p.converted = {"L to RGB": 1, "P to RGB": 1, "RGBA composited on white": 1, "I;16 to RGB": 1}
    # Skipped, each with a counted reason.
    good_png = encode_image(random_rgb(rng, big, big))
    p.files["cat/corrupt.png"] = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    p.files["cat/truncated.png"] = good_png[: len(good_png) // 2]
    p.files["dog/notes.txt"] = b"not an image at all\n"
    p.files["dog/empty.jpg"] = b""
    p.files["dog/tiny.png"] = encode_image(random_rgb(rng, IMAGE_SIZE // 2, IMAGE_SIZE // 2))
    p.files["README.txt"] = b"images are in class folders\n"
    p.files["cat/.DS_Store"] = b"\x00hidden files are not inputs"
    p.empty_dirs = ["bird"]
    p.skipped_reasons = {
        "not a decodable image": 3,
        "empty file": 1,
        "smaller than image_size": 1,
        "file is not inside a class folder": 1,
        "empty class folder": 1,
    }
    return p


def prepare_params(**overrides: Any) -> dict[str, Any]:
    params = dict(repo_params()["prepare"])
    params.update(overrides)
    return params


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a stage subprocess: the venv first on PATH (dvc.yaml says `python`), no
    inherited RAY_ADDRESS (a stage must start its own local Ray, beside any test cluster)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def clone_project(dest: Path) -> Path:
    """``git clone`` of the repository under test: its committed files only, with its own
    .gitignore, dvc.yaml and params.yaml, as a new user gets them. (CI runs on a clean clone, so
    HEAD is the tree under test; locally, commit first: uncommitted changes are not in the clone.)"""
    env = stage_env({"PYTHONPATH": str(dest)})
    run(["git", "clone", "-q", str(REPO), str(dest)], dest.parent, env)
    for key, value in (("user.email", "tests@example.invalid"), ("user.name", "tests")):
        run(["git", "config", key, value], dest, env)  # the clone's own commits (a user records a result)
    return dest


# ---------------------------------------------------------------------------------------------
# A small coloured set for judging metrics: shapes (the classes) in colour on coloured grounds
# ---------------------------------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) hue in [0, 1), saturation, value -> (N, 3) RGB in [0, 1]."""
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: v - v * s * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return np.stack([f(5), f(3), f(1)], axis=1)


def coloured_shapes(n: int, seed: int, size: int = IMAGE_SIZE, ground_hues: tuple[float, float] = (0.45, 0.75)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` uint8 (size, size, 3) images of a bright shape (class = index in SHAPES, cycling) of a
    random hue on a dark ground of a hue in ``ground_hues`` (turns of the colour wheel; the default,
    cyan to violet), random place and size; with the labels and the shapes' masks (N, size, size)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    masks = np.zeros((n, size, size), bool)
    for i, c in enumerate(labels):
        r = rng.uniform(0.22, 0.34) * size
        cy, cx = rng.uniform(r, size - r, 2)
        if SHAPES[c] == "disc":
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif SHAPES[c] == "square":
            masks[i] = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
        else:   # apex up: rows widen downwards
            masks[i] = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
    fg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.6, 1.0, n), rng.uniform(0.85, 1.0, n))
    bg = ground_colours(rng, n, ground_hues)
    images = np.where(masks[..., None], fg[:, None, None], bg[:, None, None])
    return (images * 255).round().astype(np.uint8), labels, masks


def ground_colours(rng: np.random.Generator, n: int, hues: tuple[float, float]) -> np.ndarray:
    """(n, 3) dark saturated ground colours of hues in ``hues``, in [0, 1]."""
    return _hsv_to_rgb(rng.uniform(*hues, n), rng.uniform(0.6, 1.0, n), rng.uniform(0.3, 0.45, n))


def desaturated(images: np.ndarray) -> np.ndarray:
    """Grey copies: each pixel's luminance in all three channels (colour lost, shapes kept)."""
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(luma.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def grounds_swapped(images: np.ndarray, masks: np.ndarray, seed: int, hues: tuple[float, float] = (0.0, 0.15)) -> np.ndarray:
    """Copies with each ground repainted in a hue of ``hues`` (default red to yellow, a range the
    originals never use); the shapes kept as they are."""
    bg = ground_colours(np.random.default_rng(seed), len(images), hues)
    out = images.copy()
    out[~masks] = (np.repeat(bg, (~masks).reshape(len(masks), -1).sum(1), axis=0) * 255).round().astype(np.uint8)
    return out


def one_per_class(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copies in which every image of a class is that class's first image: mode collapse that a
    classifier's features (which gather each class in a tight cluster) hardly see."""
    first = {int(c): images[np.flatnonzero(labels == c)[0]] for c in np.unique(labels)}
    return np.stack([first[int(c)] for c in labels])
