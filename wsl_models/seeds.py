"""Where the decoder's seeds come from: seed CAMs, and the two ways to draw seeds from them.

A decoder trained on CAM seeds learns the seeds' mistakes: a 7x7 CAM's errors are whole
32-px cells. Two things make seeds worth learning from (``shared/notes/decoder-from-cam-seeds.md``):

- **finer seed CAMs**: the frozen classifier run on the image at 2-3x its input size gives a
  14x14 / 21x21 CAM of the same network (``seed_cams``); the decoder keeps its taps at the
  model size;
- **probability seeding** (NEGEV's): fresh seeds each step, foreground pixels drawn with
  probability proportional to the consensus CAM, background ones to 1 - CAM
  (``probability_seeds``), instead of uniformly inside a thresholded region
  (``seed_regions`` + ``sample_seeds``, kept as an option).

Pure functions over numpy maps; targets are uint8: 1 foreground, 0 background, IGNORE elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from .cam import AnalyticCAM, normalize_maps, resize_maps
from .masks import otsu_threshold
from .members import Member
from .supervision import IGNORE


def seed_regions(
    fg_map: np.ndarray, bg_map: np.ndarray, erode: int, bg_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Where region seeds may be drawn: (confident foreground, confident background), disjoint.

    Foreground: ``fg_map`` above its Otsu threshold, eroded ``erode`` times (kept un-eroded
    when erosion would empty it). Background: the ``bg_fraction`` lowest pixels of ``bg_map``.
    A constant map gives no foreground.
    """
    t = otsu_threshold(fg_map)
    fg = fg_map > t
    if erode > 0 and fg.any():
        eroded = ndimage.binary_erosion(fg, iterations=erode)
        fg = eroded if eroded.any() else fg
    cut = np.quantile(bg_map, bg_fraction) if bg_fraction > 0 else -np.inf
    bg = (bg_map <= cut) & ~fg
    return fg, bg


def sample_seeds(
    fg: np.ndarray, bg: np.ndarray, n_fg: int, n_bg: int, rng: np.random.Generator
) -> np.ndarray:
    """Region seeds: ``n_fg`` pixels of ``fg`` = 1, ``n_bg`` of ``bg`` = 0, uniformly."""
    out = np.full(fg.shape, IGNORE, np.uint8)
    for region, n, value in ((fg, n_fg, 1), (bg, n_bg, 0)):
        idx = np.flatnonzero(region)
        if len(idx) and n > 0:
            out.flat[rng.choice(idx, size=min(n, len(idx)), replace=False)] = value
    return out


def _weighted_draw(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(B, k) flat indices, per row ``n`` pixels without replacement with probability
    proportional to ``weights`` (B, P) (Gumbel top-k); pixels of weight 0 are never drawn,
    so a row with fewer than ``n`` positive weights gets fewer (padded with -1)."""
    with np.errstate(divide="ignore"):
        keys = np.log(weights) + rng.gumbel(size=weights.shape)
    k = min(n, weights.shape[1])
    if k <= 0:
        return np.empty((len(weights), 0), np.int64)
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return np.where(np.isfinite(np.take_along_axis(keys, top, 1)), top, -1)


def probability_seeds(
    fg_maps: np.ndarray,
    bg_maps: np.ndarray,
    n_fg: int,
    n_bg: int,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """(B, h, w) targets: per image ``n_fg`` foreground seeds drawn with probability
    proportional to ``fg_maps`` (in [0, 1]) and ``n_bg`` background seeds proportional to
    1 - ``bg_maps``. A pixel drawn as both is dropped (as NEGEV's seeder does); pixels where
    ``valid`` is False (padding, ignored regions) never get a seed."""
    b, h, w = fg_maps.shape
    fg_w = np.clip(fg_maps, 0, 1).reshape(b, -1) + 1e-6
    bg_w = 1.0 - np.clip(bg_maps, 0, 1).reshape(b, -1) + 1e-6
    if valid is not None:
        keep = np.broadcast_to(valid, fg_maps.shape).reshape(b, -1)
        fg_w, bg_w = fg_w * keep, bg_w * keep
    out = np.full((b, h * w), IGNORE, np.uint8)
    fg_idx = _weighted_draw(fg_w, n_fg, rng)
    bg_idx = _weighted_draw(bg_w, n_bg, rng)
    rows = np.arange(b)[:, None]
    hit_fg = np.zeros((b, h * w + 1), bool)  # the extra column absorbs the -1 padding
    hit_bg = np.zeros((b, h * w + 1), bool)
    hit_fg[rows, fg_idx] = True
    hit_bg[rows, bg_idx] = True
    hit_fg, hit_bg = hit_fg[:, : h * w], hit_bg[:, : h * w]
    out[hit_bg & ~hit_fg] = 0
    out[hit_fg & ~hit_bg] = 1
    return out.reshape(b, h, w)


@torch.no_grad()
def seed_cams(
    member: Member,
    images: torch.Tensor,
    labels: Sequence[int] | None,
    cam: AnalyticCAM,
    scale: float,
    batch_size: int = 8,
) -> torch.Tensor:
    """(N, h, w) each image's CAM of its class (``labels`` None: the max over classes, as
    ``map_mode="max"``) from the frozen ``member`` run on the image resized to ``scale`` x its
    size: 2x gives a 14x14 CAM where the model sees 7x7. Min-max normalised per image."""
    member.eval()
    size = [round(s * scale) for s in images.shape[-2:]]
    device = next(member.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        if scale != 1:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        maps = cam.from_features(member.feature_map(x), member.head.weight)
        if labels is None:
            picked = maps.amax(dim=1)
        else:
            y = torch.as_tensor(labels[start : start + batch_size], device=maps.device)
            picked = maps[torch.arange(len(y)), y]
        out.append(normalize_maps(picked).float().cpu())
    return torch.cat(out)


def multiscale_cams(
    member: Member,
    images: torch.Tensor,
    labels: Sequence[int] | None,
    cam: AnalyticCAM,
    scales: Sequence[float],
) -> torch.Tensor:
    """The mean of ``seed_cams`` over ``scales``, on the finest scale's grid, renormalised."""
    maps = [seed_cams(member, images, labels, cam, s) for s in scales]
    grid = max((tuple(m.shape[-2:]) for m in maps), key=lambda g: g[0] * g[1])
    return normalize_maps(torch.stack([resize_maps(m, grid) for m in maps]).mean(0))
