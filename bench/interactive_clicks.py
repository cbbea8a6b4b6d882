"""How much smart keypoints improve a mask on GlaS: a simulated annotator clicks, one at a time.

    python bench/interactive_clicks.py --data ../shared/data/glas --model MODELS/lite_224 \
        --clicks 5 --out bench/results/interactive_clicks.json

The usual protocol of interactive segmentation (e.g. DEXTR's and RITM's click simulators):
start from the pre-annotation at native size; before each click, find the largest connected
error region against the ground truth, and click at its innermost pixel (the maximum of its
distance transform), positive on a missed region, negative on a false one. Each click goes
through the smart keypoints as /predict runs them. Scored after every click by foreground IoU
and Dice per image, for:
- the feature probe (camlabel's keypoints, probe.probe_clicks: every answer refits from the
  pre-annotation and all clicks so far, as Label Studio sends them all);
- GrabCut in a window seeded by the served map (refine.apply_clicks, ``KEYPOINTS=grabcut``);
- the window alone (no model);
- the map-seeded window with the earlier negative click, which removed the whole connected
  component under it (kept here as the reference the change was measured against).
An all-ones mask is the reference a mask has to beat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from wsl_models import probe, refine  # noqa: E402
from wsl_models.clicks import innermost, largest_region  # noqa: E402
from wsl_models.data import load_dataset  # noqa: E402
from wsl_models.images import open_image, open_mask, to_tensor  # noqa: E402
from wsl_models.metrics import segmentation_scores  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402


def _scores(mask: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Foreground (IoU, Dice)."""
    s = segmentation_scores(mask, truth)
    return s["iou_fg"], s["dice_fg"]


def next_click(mask: np.ndarray, truth: np.ndarray) -> tuple[float, float, bool] | None:
    """The simulated annotator's click: the innermost pixel of the largest error region,
    missed (positive) or false (negative), whichever is larger."""
    found = [
        (region, size, positive)
        for positive, error in ((True, truth & ~mask), (False, mask & ~truth))
        if (hit := largest_region(error)) is not None
        for region, size in [hit]
    ]
    if not found:
        return None
    region, _, positive = max(found, key=lambda f: f[1])
    y, x, _ = innermost(region)
    return float(x) + 0.5, float(y) + 0.5, positive


def _click(image, prob, mask, click, whole_component: bool) -> np.ndarray:
    x, y, positive = click
    if positive or not whole_component:
        return refine.apply_clicks(image, prob, mask, [click])
    comp, _ = ndimage.label(mask)
    xi, yi = int(x), int(y)
    return mask & (comp != comp[yi, xi]) if mask[yi, xi] else mask.copy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    p.add_argument("--with-mask", action="store_true", help="only images whose mask is not empty")
    p.add_argument("--methods", choices=("all", "current"), default="current",
                   help="current: without the earlier whole-component negative click")  # fmt: skip
    p.add_argument("--out", default="bench/results/interactive_clicks.json")
    args = p.parse_args()
    store = ModelStore(args.model)
    ens = store.load()
    cfg = ens.config
    samples = load_dataset(args.data).split(args.split)
    if args.with_mask:  # a finding-vs-normal set: the clicks' protocol needs an object
        samples = [
            s for s in samples if s.mask is not None and np.asarray(Image.open(s.mask)).any()
        ]
    samples = samples[: args.limit] if args.limit else samples
    seeds = {  # name: (seed the window with the map, a negative click removes its component)
        "feature probe (camlabel)": None,
        "map-seeded window (GrabCut)": (True, False),
        "window alone (no model)": (False, False),
        "map-seeded, negative removes the whole component (before)": (True, True),
    }
    seeds = {k: v for k, v in seeds.items() if args.methods == "all" or v is None or not v[1]}
    iou = {name: np.zeros((len(samples), args.clicks + 1)) for name in seeds}
    dice = {name: np.zeros((len(samples), args.clicks + 1)) for name in seeds}
    positives = {name: 0 for name in seeds}
    ones = []
    for i, s in enumerate(tqdm(samples, desc="images")):
        img = open_image(s.image)
        truth = open_mask(s.mask, img.size)
        with torch.no_grad():
            out = ens.predict(to_tensor(img, cfg.image_size)[None], seed=0, samples=0)
        m = ens.masks(out, 0, truth.shape)
        start = m.mask if m.mask is not None else np.zeros_like(truth)
        pixels = np.asarray(img)
        ones.append(_scores(np.ones_like(truth), truth))
        features = None  # the probe's, computed at its first click
        for name, how in seeds.items():
            mask, clicks = start, []
            iou[name][i, 0], dice[name][i, 0] = _scores(mask, truth)
            for c in range(1, args.clicks + 1):
                click = next_click(mask, truth)
                if click is not None:
                    positives[name] += click[2]
                    clicks.append(click)
                    if how is None:
                        if features is None:
                            features = probe.image_features(ens.members[0], img, cfg.input_size)
                        mask = probe.probe_clicks(features, start, clicks)
                    else:
                        prob = m.intersection_map if how[0] else None
                        mask = _click(pixels, prob, mask, click, how[1])
                iou[name][i, c], dice[name][i, c] = _scores(mask, truth)
    rows = {name: {"mean_iou_after_clicks": iou[name].mean(0).round(4).tolist(),
                   "mean_dice_after_clicks": dice[name].mean(0).round(4).tolist(),
                   "positive_click_share": positives[name] / (len(samples) * args.clicks)}
            for name in seeds}  # fmt: skip
    all_ones = {"mean_iou": float(np.mean([o[0] for o in ones])),
                "mean_dice": float(np.mean([o[1] for o in ones]))}  # fmt: skip
    for name, r in rows.items():
        print(f"{name}\n  IoU by clicks  {r['mean_iou_after_clicks']}")
        print(f"  Dice by clicks {r['mean_dice_after_clicks']}")
    print(f"all-ones mask: IoU {all_ones['mean_iou']:.3f}  Dice {all_ones['mean_dice']:.3f}")
    result = {"machine": machine(), "model": store.current_id(), "map_source": cfg.map_source,
              "split": args.split, "images": len(samples), "clicks": args.clicks,
              "rows": rows, "all_ones": all_ones}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
