"""Image decoding and the ADM preprocessing (centre crop + resize), shared by every stage.

Pure numpy/PIL/torch: the stages decide where bytes come from; this module only turns bytes into
the canonical training image (RGB, ``image_size`` square, PNG) or says why it cannot.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFile

# A truncated file is bad input, not an image with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Modes PIL uses for more than 8 bits per sample (16-bit PNG/TIFF greyscale, 32-bit int/float).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# Where an image is transparent, a training image shows this colour (what a viewer shows; one place).
BACKGROUND = (255, 255, 255)


class BadImage(ValueError):
    """An input that cannot become a training image; ``reason`` goes to the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> tuple[Image.Image, str | None]:
    """RGB version of any PIL mode, and a note of the conversion (None when it was RGB already).

    Transparency is composited on ``background`` (white: the usual background of cut-out product
    and web images, and what a viewer shows), semi-transparent pixels blended: an alpha channel
    (RGBA, LA, PA), a palette's transparent entries (P), and a PNG's tRNS colour key on RGB or
    greyscale (the keyed colour, often black, would otherwise show). Wide greyscale is rescaled to 8
    bits rather than clipped, which would saturate it to white.
    """
    mode = img.mode
    keyed = "transparency" in img.info
    if mode == "RGB" and not keyed:
        return img, None
    if mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode} to RGB"
    if keyed and mode in ("P", "RGB", "L", "1"):
        img = img.convert("RGBA")        # PIL turns the palette's or the key's transparency into alpha
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (*background, 255))
        where = "white" if tuple(background) == (255, 255, 255) else f"background {tuple(background)}"
        return Image.alpha_composite(ground, rgba).convert("RGB"), f"{mode} composited on {where}"
    return img.convert("RGB"), f"{mode} to RGB"


def decode_image(data: bytes) -> tuple[Image.Image, str | None]:
    """Decode encoded image bytes fully (so truncation is caught here) and convert to RGB."""
    if not data:
        raise BadImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many exception types for bad data
        raise BadImage(f"not a decodable image ({type(e).__name__}: {e})") from e
    if img.width == 0 or img.height == 0:
        raise BadImage("image has zero width or height")
    return to_rgb(img)


def center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """ADM's preprocessing (guided-diffusion ``center_crop_arr``): halve with a box filter while the
    short side is >= 2x the target (cheap anti-aliasing), resize bicubically so the short side
    equals ``image_size``, then crop the centre square."""
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def prepare_image(data: bytes, image_size: int, allow_upsample: bool = False) -> tuple[bytes, str | None]:
    """Encoded bytes -> (PNG bytes of an RGB ``image_size`` square, conversion note or None).

    Raises BadImage for undecodable input and, unless ``allow_upsample``, for images whose short
    side is below ``image_size`` (upsampling them would train the model on blur).
    """
    img, note = decode_image(data)
    if not allow_upsample and min(img.size) < image_size:
        raise BadImage(f"smaller than image_size ({img.size[0]}x{img.size[1]} < {image_size})")
    return png_bytes(center_crop(img, image_size)), note


def png_bytes(img: Image.Image | np.ndarray) -> bytes:
    """PNG encoding of a PIL image or an (H, W[, C]) uint8 array."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: np.ndarray, zoom: int = 1) -> np.ndarray:
    """(rows, columns, H, W, C) uint8 -> one uint8 image: the images on a white ground with 1-pixel
    gaps, every pixel repeated ``zoom`` times in each direction (small images, visible)."""
    if images.ndim != 5 or images.dtype != np.uint8:
        raise ValueError(f"image_grid takes (rows, columns, H, W, C) uint8 images, not {images.dtype} {images.shape}")
    if int(zoom) < 1:
        raise ValueError(f"zoom={zoom} must be at least 1")
    r, c, h, w, ch = images.shape
    canvas = np.full((r * (h + 1) + 1, c * (w + 1) + 1, ch), 255, np.uint8)
    view = canvas[1:, 1:].reshape(r, h + 1, c, w + 1, ch)[:, :h, :, :w]   # (rows, H, columns, W, C)
    view[...] = images.transpose(0, 2, 1, 3, 4)
    return canvas.repeat(int(zoom), axis=0).repeat(int(zoom), axis=1)


def pngs_to_uint8(images: list[bytes]) -> np.ndarray:
    """A list of PNG bytes -> (N, H, W, 3) uint8 RGB."""
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


def png_to_tensor(data: bytes) -> torch.Tensor:
    """PNG bytes -> (3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def pngs_to_batch(images: list[bytes]) -> torch.Tensor:
    """A list of PNG bytes -> (N, 3, H, W) float tensor in [-1, 1]."""
    return torch.stack([png_to_tensor(b) for b in images])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding as the ADM evaluation suite does."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
