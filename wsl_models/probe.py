"""Smart keypoints by a linear probe on the backbone's features, fitted per image and click.

GrabCut (refine.py) separates an object from its surroundings by colour, and on H&E glands
and stroma share colours: five simulated clicks lifted a GlaS mask's IoU by 0.02. A
backbone's features tell tissue apart where colour does not. Here each answer fits a
logistic regression on the image's own feature cells: every cell of the mask the annotator
sees is an example of its side (each side's cells together weigh as much as half of
``prior_weight`` clicks), each click one of weight 1 on the cell under it. The probe's probability above 0.5,
upsampled to the image, is the new mask, and each click's disk keeps its side. So a click
teaches what that kind of tissue is everywhere in the image, not only around the click.

``probe_map`` fits the same probe to a soft map instead of a mask and clicks: the decoders'
seed maps re-fitted on each image's features (refined_seeds.py).

Stateless, like Label Studio's prompts: every answer refits from the same starting mask and
all clicks so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from torch.nn import functional as F

from .clicks import Click, click_radius
from .images import scaled_size, to_tensor
from .members import Member

# Chosen on train images, 10 simulated clicks each (docs/interactive.md): 40 of GlaS (mean IoU
# 0.562 / 0.690 / 0.766 after 1 / 5 / 10 clicks at weight 10, 0.540 / 0.637 / 0.756 at 5;
# GrabCut 0.499 / 0.505 / 0.526 on 20) and 30 LGG tumour slices (0.342 / 0.748 / 0.785 at
# 10, 0.397 / 0.701 / 0.771 at 5; GrabCut 0.129 / 0.257 / 0.215).
PRIOR_WEIGHT = 10.0
FEATURE_SCALE = 2.0  # the image at twice the model's input: 28x28 cells at stride 16 for 224


@torch.no_grad()
def click_features(member: Member, x: torch.Tensor) -> np.ndarray:
    """(C, h, w) float32 features of one image (1, 3, H, W): the member's two coarsest maps
    (stride 16 and 32 for the CNN members; the last map alone without a decoder's taps),
    each L2-normalised over its channels, at the finer map's grid."""
    member.eval()
    last, taps = member.features_and_taps(x.to(next(member.parameters()).device))
    maps = taps[-2:] if len(taps) >= 2 else [last]
    grid = maps[0].shape[-2:]
    parts = [
        F.normalize(
            F.interpolate(m.float(), size=grid, mode="bilinear", align_corners=False), dim=1
        )
        for m in maps
    ]
    return F.normalize(torch.cat(parts, dim=1), dim=1)[0].cpu().numpy()


def image_features(member: Member, image: Image.Image, input_size: tuple[int, int]) -> np.ndarray:
    """``click_features`` of a PIL image seen at FEATURE_SCALE times the model's input size."""
    return click_features(member, to_tensor(image, scaled_size(input_size, FEATURE_SCALE))[None])


def probe_map(
    features: np.ndarray, soft: np.ndarray, prior_weight: float = PRIOR_WEIGHT
) -> np.ndarray:
    """``soft`` (H, W) in [0, 1] re-fitted by a probe on ``features`` (C, h, w): each cell is
    an example of the foreground with weight ~ its mean of ``soft`` and of the background
    with weight ~ 1 minus it (each side half of ``prior_weight``); the probe's probability
    (h, w) float32. A map that is one side everywhere comes back as its cell means."""
    channels, h, w = features.shape
    cells = features.reshape(channels, -1).T
    mean = cv2.resize(soft.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA).ravel()
    fg, bg = mean.sum(), (1 - mean).sum()
    if fg <= 1e-6 or bg <= 1e-6:
        return mean.reshape(h, w)
    weights = np.concatenate([mean / fg, (1 - mean) / bg]) * prior_weight / 2
    sides = np.concatenate([np.ones(len(mean), bool), np.zeros(len(mean), bool)])
    return _fitted(cells, np.concatenate([cells, cells]), sides, weights).reshape(h, w)


def _fitted(
    cells: np.ndarray, examples: np.ndarray, sides: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """The foreground probability of ``cells`` (n, C) by a logistic regression fitted on the
    weighted ``examples`` and their ``sides``; float32 (n,)."""
    probe = LogisticRegression(C=10.0, max_iter=200)
    probe.fit(examples, sides, sample_weight=weights)
    return probe.predict_proba(cells)[:, 1].astype(np.float32)


def probe_clicks(
    features: np.ndarray,
    mask: np.ndarray,
    clicks: Sequence[Click],
    prior_weight: float = PRIOR_WEIGHT,
) -> np.ndarray:
    """``mask`` (H, W) bool re-segmented after ``clicks`` (x, y, positive in pixels of the
    mask) by a probe on ``features`` (C, h, w). Without clicks, or when mask and clicks hold
    one side only (nothing to tell apart), only the clicks' disks change."""
    out = mask.copy()
    if not clicks:
        return out
    channels, h, w = features.shape
    height, width = mask.shape
    cells = features.reshape(channels, -1).T
    shown = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
    under = [
        min(int(y * h / height), h - 1) * w + min(int(x * w / width), w - 1) for x, y, _ in clicks
    ]
    sides = np.concatenate([shown.ravel(), [bool(p) for *_, p in clicks]])
    if sides.min() != sides.max():
        # Each side of the mask shown weighs half the prior, however few its cells (a small
        # finding would otherwise weigh next to nothing and vanish at the first click).
        shown_side = shown.ravel()
        per_cell = np.where(
            shown_side,
            prior_weight / 2 / max(int(shown_side.sum()), 1),
            prior_weight / 2 / max(int((~shown_side).sum()), 1),
        )
        weights = np.concatenate([per_cell, np.ones(len(under))])
        examples = np.concatenate([cells, cells[under]])
        prob = _fitted(cells, examples, sides, weights).reshape(h, w)
        out = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
    radius = click_radius((height, width))
    yy, xx = np.ogrid[:height, :width]
    for x, y, positive in clicks:
        out[(yy - int(y)) ** 2 + (xx - int(x)) ** 2 <= radius**2] = bool(positive)
    return out
