"""Clicks as training data: positive and negative points as sparse pixel targets.

A click is (x, y, positive) in pixels of the image as displayed. Its target is a small disk
(1 inside the object, 0 outside), every other pixel IGNORE: the decoder learns from the
clicked pixels only (``mask_training`` drops the Dice term for such sparse targets). On disk
a dataset keeps them as ``points/NAME.png`` (uint8: 1, 0, 255), next to ``masks/``.

``simulated_clicks`` is the annotator of the interactive benchmarks: each click goes to the
innermost pixel of the largest remaining error region of the current mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .supervision import IGNORE

Click = tuple[float, float, bool]  # x, y in pixels; positive


def click_radius(size: tuple[int, int]) -> int:
    """The disk a click labels: 1 % of the shorter side, at least 2 px."""
    return max(2, round(0.01 * min(size)))


def click_target(clicks: Sequence[Click], size: tuple[int, int], radius: int) -> np.ndarray:
    """(H, W) uint8 of ``size`` = (H, W): 1 / 0 disks around positive / negative clicks,
    IGNORE elsewhere; a later click wins where disks overlap."""
    height, width = size
    out = np.full(size, IGNORE, np.uint8)
    yy, xx = np.ogrid[:height, :width]
    for x, y, positive in clicks:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"click ({x:.1f}, {y:.1f}) is outside the {width}x{height} image")
        out[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = 1 if positive else 0
    return out


def save_points(target: np.ndarray, path: Path) -> None:
    Image.fromarray(target.astype(np.uint8)).save(path)


def load_points(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A points file at ``size`` = (H, W) (nearest: labels stay 0, 1 or IGNORE)."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(im, np.uint8).copy()


def _innermost(region: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel farthest from the region's border."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(y), int(x)


def simulated_clicks(predicted: np.ndarray, truth: np.ndarray, k: int, radius: int) -> list[Click]:
    """``k`` positive and ``k`` negative clicks for a mask ``predicted`` of ``truth`` (bool).

    Positive clicks go to the innermost pixel of the largest missed region, negative ones to
    that of the largest false region; a clicked disk is removed before the next click. With
    no error left, clicks go to the innermost pixels of the object and of the background."""
    clicks: list[Click] = []
    yy, xx = np.ogrid[: truth.shape[0], : truth.shape[1]]
    for positive in (True, False):
        inside = truth if positive else ~truth
        error = inside & ~(predicted if positive else ~predicted)
        free = inside.copy()
        for _ in range(k):
            pool = error if error.any() else free
            if not pool.any():
                break
            labels, n = ndimage.label(pool)
            sizes = ndimage.sum(pool, labels, range(1, n + 1))
            y, x = _innermost(labels == 1 + int(np.argmax(sizes)))
            clicks.append((float(x), float(y), positive))
            disk = (yy - y) ** 2 + (xx - x) ** 2 <= (2 * radius) ** 2
            error &= ~disk
            free &= ~disk
    return clicks
