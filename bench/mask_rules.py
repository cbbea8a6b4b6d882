"""How the decoder's consensus map becomes a mask: one threshold per version, or per image.

    python bench/mask_rules.py --model /tmp/models/glas_unjudged \
        --json bench/results/decoder/mask_rules_unjudged.json

Prints Dice fg / bg (survey protocol, 224x224 masks) of each rule on the model's held-out
train images (what chooses) and the test split (information only), mask-class images only:

- ``version``: the version's decoder threshold (calibrated, or the CAM-area rule);
- ``otsu``: Otsu's threshold of each image's map;
- ``probe``: the version's mask re-fitted by a per-image linear probe on the first member's
  features (``wsl_models.probe``, no clicks), the probe's probability above 0.5;
- ``probe+map``: the mean of that probability and the map, above the mean of 0.5 and the
  version's threshold;
- ``grabcut``: GrabCut started from the version's mask (sure only where the map is below 0.05
  or above 0.9).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from weak_threshold import SURVEY, model_args, model_splits

from wsl_models.data import ImageDataset, load_masks
from wsl_models.images import open_image
from wsl_models.masks import otsu_threshold, resize_mask
from wsl_models.metrics import pxap, segmentation_scores
from wsl_models.probe import PRIOR_WEIGHT, image_features
from wsl_models.refine import _grabcut
from wsl_models.versions import ModelStore


def probe_probability(features: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """A per-image probe fitted to ``mask`` (each side half the weight), at the mask's size."""
    channels, h, w = features.shape
    cells = features.reshape(channels, -1).T
    shown = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
    if shown.all() or not shown.any():
        return None
    side = shown.ravel()
    weights = np.where(side, PRIOR_WEIGHT / 2 / side.sum(), PRIOR_WEIGHT / 2 / (~side).sum())
    probe = LogisticRegression(C=10.0, max_iter=200).fit(cells, side, sample_weight=weights)
    prob = probe.predict_proba(cells)[:, 1].reshape(h, w).astype(np.float32)
    return cv2.resize(prob, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)


def grabcut_from(image: np.ndarray, prob: np.ndarray, t: float) -> np.ndarray:
    labels = np.where(prob > t, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    labels[prob < 0.05] = cv2.GC_BGD
    labels[prob > 0.9] = cv2.GC_FGD
    return _grabcut(image, labels)


def rule_masks(ensemble, samples, t: float) -> dict[str, list]:
    cfg = ensemble.config
    ds = ImageDataset(samples, cfg.classes, cfg.input_size)
    member = ensemble.members[0]
    out: dict[str, list] = {"truth": [resize_mask(m, SURVEY) for m in load_masks(samples)]}
    for i, s in enumerate(samples):
        pred = ensemble.predict(ds[i][0][None], seed=0, samples=0)
        m = ensemble.masks(pred, 0, SURVEY, ds.labels[i], "decoder").intersection_map
        image = open_image(s.image)
        rgb = np.asarray(image.resize(SURVEY[::-1]))
        base = m > t
        prob = probe_probability(image_features(member, image, cfg.input_size), base)
        rows = {
            "map": m,
            "version": base,
            "otsu": m > otsu_threshold(m),
            "probe": base if prob is None else prob > 0.5,
            "probe+map": base if prob is None else (prob + m) / 2 > (0.5 + t) / 2,
            "grabcut": grabcut_from(rgb, m, t),
        }
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    return out


def scores(masks: dict[str, list]) -> dict[str, list[float]]:
    truths = masks["truth"]
    res: dict[str, list[float]] = {"pxap": [round(pxap(masks["map"], truths), 1)]}
    for k, preds in masks.items():
        if k in ("truth", "map"):
            continue
        rows = [segmentation_scores(p, y) for p, y in zip(preds, truths, strict=True)]
        res[k] = [
            round(100 * float(np.mean([r[q] for r in rows])), 1) for q in ("dice_fg", "dice_bg")
        ]
    return res


def main() -> None:
    args = model_args(__doc__)
    store = ModelStore(args.model)
    ensemble = store.load()
    t = float(ensemble.config.decoder_threshold)
    _, held, test = model_splits(store, ensemble, args.data)
    splits = {"held_out": held, "test": test}
    result = {"model": args.model, "threshold": t}
    with torch.no_grad():
        for name, samples in splits.items():
            result[name] = scores(rule_masks(ensemble, samples, t))
            print(name, len(samples), json.dumps(result[name]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
