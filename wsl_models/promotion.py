"""Whether a newly trained version may replace the current one: judged on the same hold-out.

Never replace a better model with a worse one: both versions are scored on the new version's
held-out images (a hash of the name decides, so earlier versions never trained on them), and
the new one becomes current only if it is not worse by more than a tolerance on accuracy and,
where held-out images have human masks, on foreground Dice and PxAP.

A project's hold-out is small (about 9 of 60 annotated tasks), so accuracy moves in whole
images: 2 points is less than one, and one image that flips would refuse a version whose masks
improved. The accuracy tolerance is therefore at least ``Tolerance.images`` images. A new
version is also compared with its line's first served version, so that one image lost per job
cannot add up over jobs: a line never falls more than the tolerance below where it started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import ImageDataset, Sample
from .ensemble import Ensemble
from .images import open_mask
from .metrics import mean_scores, pxap_from_histograms, score_histograms, segmentation_scores


@dataclass(frozen=True)
class Tolerance:
    """Allowed drop, in points (0-100), before a new version is refused."""

    accuracy: float = 2.0
    dice_fg: float = 2.0
    pxap: float = 2.0
    images: int = 1  # held-out images a new version may misclassify beyond the other's

    def allowed(self, key: str, held_out: int) -> float:
        """The drop allowed on ``key`` over ``held_out`` labelled images, in points."""
        points = float(getattr(self, key))
        if key == "accuracy" and self.images > 0 and held_out > 0:
            # a hair above the whole images, so that float rounding never refuses them
            return max(points, 100.0 * self.images / held_out + 1e-9)
        return points


def holdout_scores(ensemble: Ensemble, samples: list[Sample], seed: int = 0) -> dict[str, Any]:
    """Accuracy on labelled held-out images; Dice/PxAP on those with masks of mask classes."""
    cfg = ensemble.config
    labelled = [s for s in samples if s.label in cfg.classes]
    if not labelled:
        return {"images": 0}
    ds = ImageDataset(labelled, cfg.classes, tuple(cfg.input_size))
    correct, rows = 0, []
    fg = bg = None
    for start in range(0, len(ds), 8):
        idx = list(range(start, min(start + 8, len(ds))))
        out = ensemble.predict(torch.stack([ds[i][0] for i in idx]), seed=seed)
        for b, i in enumerate(idx):
            correct += int(out.label[b]) == ds.labels[i]
            s = labelled[i]
            wanted = cfg.mask_classes is None or s.label in cfg.mask_classes
            if s.mask is None or not wanted:
                continue
            with Image.open(s.image) as header:  # the size only: no second decode
                truth = open_mask(s.mask, header.size)
            res = ensemble.masks(out, b, truth.shape, label=ds.labels[i])
            mask = res.mask if res.mask is not None else np.zeros_like(truth)
            rows.append(segmentation_scores(mask, truth))
            f, g = score_histograms(res.intersection_map, truth)
            fg, bg = (f, g) if fg is None else (fg + f, bg + g)
    scores: dict[str, Any] = {"images": len(labelled), "accuracy": 100.0 * correct / len(ds)}
    if rows:
        scores["masks"] = len(rows)
        scores["dice_fg"] = mean_scores(rows)["dice_fg"]
        scores["pxap"] = pxap_from_histograms(fg, bg)
    return scores


def losses(new: dict[str, Any], old: dict[str, Any], tolerance: Tolerance) -> list[str]:
    """What ``new`` lost beyond the tolerance against ``old`` (``holdout_scores`` of the same
    images), one line per metric; empty when nothing was."""
    if not old.get("images") or not new.get("images"):
        return []
    out = []
    for key in ("accuracy", "dice_fg", "pxap"):
        allowed = tolerance.allowed(key, int(new["images"]))
        if key in new and key in old and new[key] < old[key] - allowed:
            out.append(f"{key} {new[key]:.1f} < {old[key]:.1f} - {allowed:.3g}")
    return out


def promote(
    new: dict[str, Any],
    old: dict[str, Any],
    tolerance: Tolerance = Tolerance(),
    first: dict[str, Any] | None = None,
) -> tuple[bool, str]:
    """(accept, reason) from ``holdout_scores`` results on the same images: the new version,
    the current one and, where it is another, the line's first served version (``first``)."""
    if not old.get("images"):
        return True, "no current version to compare with"
    if not new.get("images"):
        return True, "no held-out images to compare on"
    worse = losses(new, old, tolerance)
    if worse:
        return False, "worse than the current version on the hold-out: " + "; ".join(worse)
    worse = losses(new, first or {}, tolerance)
    if worse:
        return False, "worse than the line's first version on the hold-out: " + "; ".join(worse)
    return True, "not worse than the current version on the hold-out" + (
        ", nor than the line's first" if first and first.get("images") else ""
    )
