"""Localisation metrics: PxAP (WSOL-right, pooled over pixels), Dice and IoU of fg and bg."""

from __future__ import annotations

import numpy as np

PXAP_BINS = 1000


def score_histograms(
    score_map: np.ndarray, truth: np.ndarray, bins: int = PXAP_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of map values at foreground and background pixels; sum them over a split."""
    idx = np.clip((score_map.ravel() * bins).astype(np.int64), 0, bins - 1)
    t = truth.ravel().astype(bool)
    return np.bincount(idx[t], minlength=bins), np.bincount(idx[~t], minlength=bins)


def pxap_from_histograms(fg: np.ndarray, bg: np.ndarray) -> float:
    """Pixel average precision in percent (Choe et al. CVPR 2020, ``cam_curve_interval=0.001``)."""
    tp = np.cumsum(fg[::-1])[::-1].astype(np.float64)  # pixels >= threshold l
    fp = np.cumsum(bg[::-1])[::-1].astype(np.float64)
    total_fg = fg.sum()
    if total_fg == 0:
        return float("nan")
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / total_fg
    # Thresholds from high to low: recall grows; AP = sum precision * delta recall.
    precision, recall = precision[::-1], recall[::-1]
    delta = np.diff(np.concatenate([[0.0], recall]))
    return float((precision * delta).sum() * 100.0)


def pxap(maps: list[np.ndarray], truths: list[np.ndarray], bins: int = PXAP_BINS) -> float:
    fg = np.zeros(bins, np.int64)
    bg = np.zeros(bins, np.int64)
    for m, t in zip(maps, truths, strict=True):
        f, b = score_histograms(m, t, bins)
        fg += f
        bg += b
    return pxap_from_histograms(fg, bg)


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    if total == 0:  # both empty: perfect agreement
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def segmentation_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice and IoU of the foreground AND the background (an all-ones mask has Dice_bg = 0)."""
    pred = pred.astype(bool)
    truth = truth.astype(bool)
    dice_fg, iou_fg = _overlap(pred, truth)
    dice_bg, iou_bg = _overlap(~pred, ~truth)
    return {
        "dice_fg": dice_fg,
        "dice_bg": dice_bg,
        "iou_fg": iou_fg,
        "iou_bg": iou_bg,
        "miou": (iou_fg + iou_bg) / 2,
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows]) * 100.0) for k in rows[0]}


def centred_gaussian(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """A centred Gaussian map in [0, 1]; sigma as a fraction of each side. A layout-only baseline."""
    y = (np.arange(height) - (height - 1) / 2) / (sigma * height)
    x = (np.arange(width) - (width - 1) / 2) / (sigma * width)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)
