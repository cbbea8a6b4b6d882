"""Decoding images safely and turning them into model input."""

from __future__ import annotations

import io
from pathlib import Path
from struct import error as struct_error

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse anything above this many pixels before decoding (a 30k x 30k PNG would need 2.7 GB).
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, or too large."""


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode to RGB as a browser shows it (EXIF orientation applied: camera JPEGs store their
    pixels sideways and say so in a tag), checking the size from the header first."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from exc
    with fp:
        try:
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{name}: {w}x{h} pixels is above the limit of {max_pixels} pixels"
                    )
                img.load()
                return _upright(img).convert("RGB")
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image file") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc


def _upright(img: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation (2-8); a broken EXIF block is ignored, as
    browsers do."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct_error):
        pass
    return img


def open_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary mask (foreground = value > 0); ``size`` (W, H) must match if given."""
    img = open_image(path).convert("L")
    if size is not None and img.size != tuple(size):
        raise ImageError(f"{path}: mask is {img.size}, image is {tuple(size)}")
    return np.asarray(img) > 0


def scaled_size(size: tuple[int, int] | list[int], scale: float) -> tuple[int, int]:
    """(H, W) times ``scale``, each rounded up to a multiple of 32 (the backbones' stride)."""
    return tuple(max(32, -(-round(v * scale) // 32) * 32) for v in size)  # type: ignore[return-value]


def parse_size(value: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'448x320' (W x H), '224' or 224 -> (H, W)."""
    if isinstance(value, int):
        h = w = value
    elif isinstance(value, (tuple, list)):
        h, w = (int(v) for v in value)
    else:
        parts = str(value).lower().split("x")
        if len(parts) == 1:
            h = w = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError(f"image size {value!r}: use N or WxH")
    if h < 32 or w < 32 or h > 4096 or w > 4096:
        raise ValueError(f"image size {w}x{h} must be within 32..4096 on each side")
    return h, w


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [0, 1], resized (bilinear, antialiased) to ``size`` = (H, W)."""
    h, w = size
    resized = img.resize((w, h), Image.BILINEAR) if img.size != (w, h) else img
    arr = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
