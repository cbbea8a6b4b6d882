"""Clicks as training data: positive and negative points as sparse pixel targets.

A click is (x, y, positive) in pixels of the image as displayed. Its target is a small disk
(1 inside the object, 0 outside), every other pixel IGNORE. ``mask_training`` spreads an
image's clicks into the feature probe's mask (``seg_click_masks``, default) or learns from the
clicked pixels only (no Dice term for such sparse targets). On disk
a dataset keeps them as ``points/NAME.png`` (uint8: 1, 0, 255), next to ``masks/``.

``simulated_clicks`` is the annotator of the interactive benchmarks: each click goes to the
innermost pixel of the largest remaining error region of the current mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def clicks_in(points: np.ndarray) -> list[Click]:
    """The clicks of a points target (0 / 1 disks, IGNORE elsewhere): each disk's centre
    (disks of one side that touch give one click at their joint centre), negatives first."""
    found: list[Click] = []
    for positive in (False, True):
        labels, n = ndimage.label(points == (1 if positive else 0))
        for y, x in ndimage.center_of_mass(np.ones_like(labels), labels, range(1, n + 1)):
            found.append((float(x), float(y), positive))
    return found


def save_points(target: np.ndarray, path: Path) -> None:
    Image.fromarray(target.astype(np.uint8)).save(path)


def load_points(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A points file at ``size`` = (H, W) (nearest: labels stay 0, 1 or IGNORE)."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(im, np.uint8).copy()


def innermost(region: np.ndarray) -> tuple[int, int, float]:
    """(y, x) of the pixel farthest from the region's border, and that distance."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(y), int(x), float(dist[y, x])


def largest_region(pool: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The largest connected region of ``pool`` (bool) and its size; None when it is empty."""
    if not pool.any():
        return None
    labels, n = ndimage.label(pool)
    sizes = ndimage.sum(pool, labels, range(1, n + 1))
    k = int(np.argmax(sizes))
    return labels == k + 1, int(sizes[k])


def _largest_innermost(pool: np.ndarray) -> tuple[int, int, float] | None:
    """``innermost`` of the largest connected region of ``pool``; None when it is empty."""
    found = largest_region(pool)
    return None if found is None else innermost(found[0])


def simulated_clicks(
    predicted: np.ndarray,
    truth: np.ndarray,
    k: int,
    radius: int,
    spread: bool = False,
    update: Callable[[np.ndarray, Click], np.ndarray] | None = None,
) -> list[Click]:
    """``k`` positive and ``k`` negative clicks for a mask ``predicted`` of ``truth`` (bool).

    Positive clicks go to the innermost pixel of the largest missed region, negative ones to
    that of the largest false region; a clicked disk is removed before the next click. With
    no error left, clicks go to the innermost pixels of the object and of the background.

    The removed disk is 2 x ``radius`` wide, so the clicks pile up inside the largest error
    region. With ``spread`` it is the region's inscribed disk at the click (at least that
    wide): the annotator's next click goes elsewhere, as it would once the model had taken
    the first one in, and the clicks cover more of the error regions.

    With ``update`` (mask, click) -> mask, the interactive protocol: the clicks alternate
    positive / negative, each on the errors of the mask the clicks before it produced (the
    smart tool re-segments after every click, as in Label Studio's interactive mode)."""
    if update is not None:
        return _interactive_clicks(predicted, truth, k, radius, update)
    clicks: list[Click] = []
    yy, xx = np.ogrid[: truth.shape[0], : truth.shape[1]]
    for positive in (True, False):
        inside = truth if positive else ~truth
        error = inside & ~(predicted if positive else ~predicted)
        free = inside.copy()
        for _ in range(k):
            spot = _largest_innermost(error if error.any() else free)
            if spot is None:
                break
            y, x, depth = spot
            clicks.append((float(x), float(y), positive))
            covered = max(2 * radius, depth) if spread else 2 * radius
            disk = (yy - y) ** 2 + (xx - x) ** 2 <= covered**2
            error &= ~disk
            free &= ~disk
    return clicks


def _interactive_clicks(
    mask: np.ndarray,
    truth: np.ndarray,
    k: int,
    radius: int,
    update: Callable[[np.ndarray, Click], np.ndarray],
) -> list[Click]:
    """``simulated_clicks`` with ``update``; a spot already clicked (2 x ``radius``) is not
    clicked again where the re-segmentation left it wrong."""
    clicks: list[Click] = []
    clicked = np.zeros_like(truth)
    yy, xx = np.ogrid[: truth.shape[0], : truth.shape[1]]
    for i in range(2 * k):
        positive = i % 2 == 0
        inside = (truth if positive else ~truth) & ~clicked
        error = inside & (~mask if positive else mask)
        spot = _largest_innermost(error if error.any() else inside)
        if spot is None:
            continue
        y, x, _ = spot
        click = (float(x), float(y), positive)
        clicks.append(click)
        clicked |= (yy - y) ** 2 + (xx - x) ** 2 <= (2 * radius) ** 2
        mask = update(mask, click)
    return clicks
