"""Prompted refinement: a box or a click re-segments with the model's map and the image itself.

GrabCut (OpenCV: colour models of foreground and background plus a graph cut along image
edges) makes the outline follow the image. What the annotator's prompt says for sure is fixed:
outside the box (a ring around it) is background, the clicked spot is foreground. Inside, the
model's map marks "probably background" only where it is confidently low (below 0.1); the
rest starts as "probably foreground". Seeding GrabCut's background with the map's whole
below-threshold part was tried first: on synthetic disks with a coarse, shifted map it dropped
the object (IoU 0.0, where the box alone gave 0.73-0.96; a one-off check during development).
A coarse map calls the object's own edge background, and the background colour model then
learns the object.

Pure functions over numpy arrays: image (H, W, 3) uint8 RGB, probability (H, W) in [0, 1],
masks (H, W) bool; boxes (x0, y0, x1, y1) and points (x, y) in pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

WORK_SIDE = 256  # GrabCut runs on the prompt's window scaled to at most this side (speed)
ITERATIONS = 3


def _grabcut(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """GrabCut with ``labels`` (cv2.GC_*) as the initial mask, at most WORK_SIDE per side;
    returns the foreground at the input size."""
    h, w = labels.shape
    scale = min(1.0, WORK_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small_img = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        small = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    else:
        small_img, small = image, labels
    seeds = np.isin(small, (cv2.GC_FGD, cv2.GC_PR_FGD))
    out = seeds
    if seeds.any() and np.isin(small, (cv2.GC_BGD, cv2.GC_PR_BGD)).any():
        cut = small.copy()
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        bgr = np.ascontiguousarray(small_img[..., ::-1])
        cv2.setRNGSeed(0)  # GrabCut's k-means start: the same prompt gives the same answer
        cv2.grabCut(bgr, cut, None, bgd, fgd, ITERATIONS, cv2.GC_INIT_WITH_MASK)
        refined = np.isin(cut, (cv2.GC_FGD, cv2.GC_PR_FGD))
        if refined.any():  # colours that cannot tell object from background: keep the seeds
            out = refined
    out = out.astype(np.uint8)
    if scale < 1.0:
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return out > 0


BACKGROUND_BELOW = 0.1  # map values below this start as "probably background"


def _seed_labels(
    prob: np.ndarray | None, shape: tuple[int, int], background_below: float = BACKGROUND_BELOW
) -> np.ndarray:
    """ "Probably foreground", except "probably background" where the map is confidently low;
    all "probably foreground" with no map (None) or a map low everywhere (the prompt says an
    object is there even where the model sees none)."""
    if prob is None:
        return np.full(shape, cv2.GC_PR_FGD, np.uint8)
    low = prob < background_below
    if low.all():
        low = np.zeros_like(low)
    return np.where(low, cv2.GC_PR_BGD, cv2.GC_PR_FGD).astype(np.uint8)


def _pixel(point: tuple[float, float], size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) as a pixel inside an image of ``size`` = (H, W)."""
    h, w = size
    return min(max(int(point[0]), 0), w - 1), min(max(int(point[1]), 0), h - 1)


def clip_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, ...]:
    """(x0, y0, x1, y1) in pixels, clipped to an image of ``size`` = (H, W), at least 1 px."""
    h, w = size
    x0, y0, x1, y1 = box
    x0, x1 = sorted((int(np.floor(x0)), int(np.ceil(x1))))
    y0, y1 = sorted((int(np.floor(y0)), int(np.ceil(y1))))
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    return x0, y0, max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)


def box_mask(
    image: np.ndarray,
    prob: np.ndarray | None,
    box: tuple[float, ...],
    background_below: float = BACKGROUND_BELOW,
) -> np.ndarray:
    """The object inside ``box``: GrabCut seeded by ``prob`` in the box (None: the box alone,
    all "probably foreground"), with a ring of sure background just outside it; the result
    never leaves the box."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = clip_box(box, (h, w))
    pad = max(2, round(0.1 * max(x1 - x0, y1 - y0)))  # background samples around the box
    wx0, wy0, wx1, wy1 = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w), min(y1 + pad, h)
    labels = np.full((wy1 - wy0, wx1 - wx0), cv2.GC_BGD, np.uint8)
    inner = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
    inside = None if prob is None else prob[y0:y1, x0:x1]
    labels[inner] = _seed_labels(inside, (y1 - y0, x1 - x0), background_below)
    fg = _grabcut(image[wy0:wy1, wx0:wx1], labels)
    out = np.zeros((h, w), bool)
    out[y0:y1, x0:x1] = fg[inner]
    return out


def _click_half(size: tuple[int, int]) -> int:
    """How far a click's window reaches each way: a quarter of the image's shorter side."""
    return max(8, min(size) // 4)


def _click_window(point: tuple[float, float], size: tuple[int, int]) -> tuple[int, ...]:
    """(x0, y0, x1, y1): the window a click re-segments, clipped to the image."""
    h, w = size
    x, y = _pixel(point, size)
    half = _click_half(size)
    return max(x - half, 0), max(y - half, 0), min(x + half + 1, w), min(y + half + 1, h)


def click_region(
    image: np.ndarray, prob: np.ndarray | None, point: tuple[float, float]
) -> np.ndarray:
    """The object under a click: GrabCut in the click's window, the clicked spot sure
    foreground, the window's border sure background, the rest seeded by ``prob`` (None: all
    "probably foreground"); the connected part that holds the click."""
    h, w = image.shape[:2]
    x, y = _pixel(point, (h, w))
    wx0, wy0, wx1, wy1 = _click_window(point, (h, w))
    window = None if prob is None else prob[wy0:wy1, wx0:wx1]
    labels = _seed_labels(window, (wy1 - wy0, wx1 - wx0))
    labels[[0, -1], :] = cv2.GC_BGD
    labels[:, [0, -1]] = cv2.GC_BGD
    r = max(2, _click_half((h, w)) // 8)
    yy, xx = np.ogrid[wy0:wy1, wx0:wx1]
    labels[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = cv2.GC_FGD
    fg = _grabcut(image[wy0:wy1, wx0:wx1], labels)
    comp, _ = ndimage.label(fg)
    keep = comp == comp[y - wy0, x - wx0] if fg[y - wy0, x - wx0] else np.zeros_like(fg)
    out = np.zeros((h, w), bool)
    out[wy0:wy1, wx0:wx1] = keep
    return out


def remove_at(
    image: np.ndarray, prob: np.ndarray | None, mask: np.ndarray, point: tuple[float, float]
) -> np.ndarray:
    """``mask`` without the part under a negative click; unchanged when the click is on
    background. A component that lies within the click's window goes whole (a stray blob);
    a larger one loses only what GrabCut finds around the click, seeded by the map's complement
    (``1 - prob``). Removing the whole component erased most of a GlaS mask, which is one
    connected blob over many glands (bench/interactive_clicks.py)."""
    x, y = _pixel(point, mask.shape)
    if not mask[y, x]:
        return mask.copy()
    comp, _ = ndimage.label(mask)
    part = comp == comp[y, x]
    x0, y0, x1, y1 = _click_window(point, mask.shape)
    if part[y0:y1, x0:x1].sum() == part.sum():  # the whole component lies in the window
        return mask & ~part
    return mask & ~click_region(image, None if prob is None else 1.0 - prob, point)


def apply_clicks(
    image: np.ndarray,
    prob: np.ndarray | None,
    mask: np.ndarray,
    clicks: list[tuple[float, float, bool]],
) -> np.ndarray:
    """``mask`` after the clicks (x, y, positive) in order: a positive click adds the object
    under it (nothing when it is already in the mask), a negative one removes the part of the
    mask under it (remove_at)."""
    out = mask.copy()
    for x, y, positive in clicks:
        xi, yi = _pixel((x, y), mask.shape)
        if positive and not out[yi, xi]:
            out |= click_region(image, prob, (x, y))
        elif not positive:
            out = remove_at(image, prob, out, (x, y))
    return out
