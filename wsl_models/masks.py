"""Binary masks from normalised maps: thresholds, intersection, small-component removal."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import brentq
from scipy.special import expit, logit

Threshold = float | str  # a value in [0, 1], or "otsu"


def otsu_threshold(score_map: np.ndarray) -> float:
    """Otsu's threshold of a [0, 1] map (OpenCV on 256 levels), as a value in [0, 1]."""
    levels = np.clip(np.rint(score_map * 255.0), 0, 255).astype(np.uint8)
    if levels.min() == levels.max():
        return 1.0  # constant map: nothing stands out
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def resolve_threshold(score_map: np.ndarray, threshold: Threshold) -> float:
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"unknown threshold {threshold!r}: use a number in [0, 1] or 'otsu'")
        return otsu_threshold(score_map)
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold {t} is outside [0, 1]")
    return t


def binarize(score_map: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Pixels strictly above the threshold (so a threshold of 1 gives an empty mask)."""
    return score_map > resolve_threshold(score_map, threshold)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to (H, W) (the published protocol's)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (torch.nn.functional.interpolate(t, size=size, mode="nearest")[0, 0] > 0.5).numpy()


def intersect(masks: list[np.ndarray]) -> np.ndarray:
    """Pixel-wise AND of the agreeing members' masks."""
    if not masks:
        raise ValueError("intersect needs at least one mask")
    return np.logical_and.reduce(np.stack(masks))


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_area`` pixels."""
    if min_area <= 1 or not mask.any():
        return mask.astype(bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def calibrate_threshold(
    maps: list[np.ndarray], truths: list[np.ndarray], levels: int = 101
) -> tuple[float, float]:
    """Threshold that maximises pooled mIoU = (IoU_fg + IoU_bg) / 2 on pixel-labelled images.

    The Survey's rule for choosing an operating point on a small pixel-labelled split.
    Returns (threshold, best mIoU).
    """
    if not maps or len(maps) != len(truths):
        raise ValueError("calibrate_threshold needs as many ground truths as maps (at least one)")
    edges = np.linspace(0.0, 1.0, levels)
    # idx = number of edges strictly below the value: value > edges[i]  <=>  idx > i.
    fg = np.zeros(levels + 1)
    bg = np.zeros(levels + 1)
    for m, t in zip(maps, truths, strict=True):
        idx = np.searchsorted(edges, m.ravel(), side="left")
        t = t.ravel().astype(bool)
        fg += np.bincount(idx[t], minlength=levels + 1)
        bg += np.bincount(idx[~t], minlength=levels + 1)
    tp = fg[::-1].cumsum()[::-1][1:]  # tp[i] = foreground pixels with idx >= i + 1
    fp = bg[::-1].cumsum()[::-1][1:]
    fn = fg.sum() - tp
    tn = bg.sum() - fp
    iou_fg = tp / np.maximum(tp + fp + fn, 1)
    iou_bg = tn / np.maximum(tn + fn + fp, 1)
    miou = (iou_fg + iou_bg) / 2
    best = int(np.argmax(miou))
    return float(edges[best]), float(miou[best])


def expected_dice(maps: np.ndarray, q: float) -> float:
    """The mean per-image Dice that maps (n, H, W), taken as calibrated probabilities, expect
    of their own masks at ``q``."""
    sel = maps > q
    hit = (maps * sel).sum((1, 2))
    return float(np.mean(2 * hit / (sel.sum((1, 2)) + maps.sum((1, 2)) + 1e-9)))


PLUG_IN_GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)


def plug_in_threshold(maps: np.ndarray, mass: float | None = None) -> float:
    """The threshold that maximises the Dice maps (n, H, W) expect of themselves (a plug-in
    Bayes rule for Dice), their logits first shifted so that their mean is ``mass`` (the area
    they should cover; None: as they are), mapped back to the maps' own scale.

    Dice rewards a mask that takes in pixels of probability below one half where the object's
    edge is uncertain, so the masks cover more than ``mass``."""
    z = logit(np.clip(maps.astype(np.float64), 1e-6, 1 - 1e-6))
    shift = 0.0
    if mass is not None:  # a mass of 0 or 1 (degenerate seeds) has no finite shift
        target = float(np.clip(mass, 1e-4, 1 - 1e-4))
        shift = brentq(lambda b: expit(z + b).mean() - target, -30.0, 30.0)
    shifted = expit(z + shift)
    best = max(PLUG_IN_GRID, key=lambda q: expected_dice(shifted, q))
    return float(expit(logit(best) - shift))


def review_region(
    member_masks: list[np.ndarray], score_map: np.ndarray, band: tuple[float, float]
) -> np.ndarray:
    """Where a mask is unsure: the agreeing members' masks disagree (some say foreground,
    some not), or the consensus map lies strictly inside ``band`` = (low, high)."""
    low, high = band
    unsure = (score_map > low) & (score_map < high)
    if len(member_masks) > 1:
        stack = np.stack(member_masks)
        unsure |= stack.any(axis=0) & ~stack.all(axis=0)
    return unsure
