"""Brush masks <-> Label Studio RLE, through the SDK's encoder (the reference format)."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio brush RLE at that size."""
    return mask2rle((np.asarray(mask, dtype=bool) * 255).astype(np.uint8))


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (H, W) bool (the alpha channel of the RGBA bitmap)."""
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"RLE holds {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0
