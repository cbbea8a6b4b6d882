"""How good a smart rectangle's mask is on GlaS: one box per gland, as an annotator draws it.

    python bench/interactive_quality.py --data ../shared/data/glas --model MODELS/lite_224 \
        --out bench/results/interactive_quality.json

For every gland of the test images (a connected component of the ground truth of at least
--min-area pixels, native size), the box is its bounding box grown by 5 % a side. Scored by
IoU with that gland, over the same boxes:
- camlabel's rectangle answer (refine.box_mask seeded by the served map, as /predict runs it,
  with the map's "probably background" cut at BACKGROUND_BELOW, and at each --cuts value);
- GrabCut from the box alone (no model: what the image's colours give);
- the pre-annotation mask clipped to the box (what the annotator had before drawing);
- the whole box (the mask a plain rectangle would be).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from wsl_models import refine  # noqa: E402
from wsl_models.data import load_dataset  # noqa: E402
from wsl_models.images import open_image, open_mask, to_tensor  # noqa: E402
from wsl_models.metrics import segmentation_scores  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return segmentation_scores(a, b)["iou_fg"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--min-area", type=int, default=2000)
    p.add_argument("--cuts", default="0.02,0.3", help="other background cuts to compare")
    p.add_argument("--out", default="bench/results/interactive_quality.json")
    args = p.parse_args()
    store = ModelStore(args.model)
    ens = store.load()
    cfg = ens.config
    cuts = [refine.BACKGROUND_BELOW] + [float(c) for c in args.cuts.split(",") if c]
    names = {c: f"camlabel rectangle, cut {c:g}" for c in cuts}
    scores: dict[str, list[float]] = {n: [] for n in names.values()}
    scores |= {"GrabCut, box only": [], "pre-annotation in the box": [], "whole box": []}
    for s in tqdm(load_dataset(args.data).split(args.split), desc="glands"):
        img = open_image(s.image)
        truth = open_mask(s.mask, img.size)
        h, w = truth.shape
        with torch.no_grad():
            out = ens.predict(to_tensor(img, cfg.image_size)[None], seed=0, samples=0)
        m = ens.masks(out, 0, (h, w))
        prob, pre = m.intersection_map, (m.mask if m.mask is not None else np.zeros_like(truth))
        pixels = np.asarray(img)
        comps, n = ndimage.label(truth)
        for k in range(1, n + 1):
            gland = comps == k
            if gland.sum() < args.min_area:
                continue
            ys, xs = np.nonzero(gland)
            pad_x, pad_y = 0.05 * (xs.max() - xs.min()), 0.05 * (ys.max() - ys.min())
            box = (xs.min() - pad_x, ys.min() - pad_y, xs.max() + 1 + pad_x, ys.max() + 1 + pad_y)
            x0, y0, x1, y1 = refine.clip_box(box, (h, w))
            inside = np.zeros_like(gland)
            inside[y0:y1, x0:x1] = True
            for cut, name in names.items():
                scores[name].append(_iou(refine.box_mask(pixels, prob, box, cut), gland))
            scores["GrabCut, box only"].append(_iou(refine.box_mask(pixels, None, box), gland))
            scores["pre-annotation in the box"].append(_iou(pre & inside, gland))
            scores["whole box"].append(_iou(inside, gland))
    rows = {k: {"mean_iou": float(np.mean(v)), "median_iou": float(np.median(v))}
            for k, v in scores.items()}  # fmt: skip
    glands = len(scores["whole box"])
    for k, r in rows.items():
        print(f"{k:28s} mean IoU {r['mean_iou']:.3f}  median {r['median_iou']:.3f}")
    print(f"{glands} glands of at least {args.min_area} px; map source {cfg.map_source}")
    result = {"machine": machine(), "model": store.current_id(), "map_source": cfg.map_source,
              "split": args.split, "glands": glands, "min_area": args.min_area,
              "default_cut": refine.BACKGROUND_BELOW, "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
