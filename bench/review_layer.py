"""The "review here" layer on GlaS: how much of the image it covers and how many of the
mask's wrong pixels it holds.

    python bench/review_layer.py --data ../shared/data/glas --model MODELS/lite_224 \
        --out bench/results/review_layer.json

For every test image (testA + testB), at its native size: the pre-annotation mask as served
(the version's map source, the predicted class), and the review region as served
(REVIEW_LABEL): agreeing members disagree, or the consensus map inside the band. Pooled over
all pixels: the layer's area fraction, the fraction of wrong pixels (mask XOR ground truth)
inside it, and their ratio ("lift": 1 = no better than a region of the same area placed at
random). Both parts alone and a few bands are reported beside the default (0.3, 0.7). The
layer is useful when it holds most of the errors in a small area.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from wsl_models.data import load_dataset  # noqa: E402
from wsl_models.images import open_image, open_mask, to_tensor  # noqa: E402
from wsl_models.masks import review_region  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

BANDS = [(0.3, 0.7), (0.2, 0.8), (0.4, 0.6), (0.1, 0.9)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="bench/results/review_layer.json")
    args = p.parse_args()
    store = ModelStore(args.model)
    ens = store.load()
    cfg = ens.config
    samples = load_dataset(args.data).split(args.split)
    variants = {f"band {lo}-{hi} + disagreement": (lo, hi, True) for lo, hi in BANDS}
    variants["disagreement only"] = (1.0, 0.0, True)  # an empty band
    variants["band 0.3-0.7 only"] = (0.3, 0.7, False)
    sums = {k: {"area": 0, "errors_inside": 0} for k in variants}
    pixels = errors = 0
    for s in tqdm(samples, desc="review layer"):
        img = open_image(s.image)
        truth = open_mask(s.mask, img.size)
        with torch.no_grad():
            out = ens.predict(to_tensor(img, cfg.image_size)[None], seed=0)
        m = ens.masks(out, 0, truth.shape)
        mask = m.mask if m.mask is not None else np.zeros_like(truth)
        wrong = mask ^ truth
        pixels += truth.size
        errors += int(wrong.sum())
        agreeing = [m.member_masks[n] for n in m.agreeing]
        for name, (lo, hi, disagree) in variants.items():
            region = review_region(agreeing if disagree else [], m.intersection_map, (lo, hi))
            sums[name]["area"] += int(region.sum())
            sums[name]["errors_inside"] += int((region & wrong).sum())
    rows = {}
    for name, v in sums.items():
        area = v["area"] / pixels
        held = v["errors_inside"] / max(errors, 1)
        rows[name] = {
            "area_fraction": area,
            "errors_held": held,
            "lift": held / area if area else 0,
        }
        print(f"{name:32s} area {100 * area:5.1f} %  holds {100 * held:5.1f} % of the wrong "
              f"pixels  (lift {rows[name]['lift']:.2f})")  # fmt: skip
    print(f"wrong pixels: {100 * errors / pixels:.1f} % of all; map source {cfg.map_source}")
    result = {
        "machine": machine(),
        "model": store.current_id(),
        "map_source": cfg.map_source,
        "images": len(samples),
        "wrong_pixel_fraction": errors / pixels,
        "default": "band 0.3-0.7 + disagreement",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
