"""Why the decoder does what it does on GlaS: seed precision, and decoder-only retraining.

    # how often the CAM seeds are right, on the training images (not the test split):
    python bench/decoder_diagnostics.py seeds --model MODEL_DIR --cams xgradcam,gradcam++,cam
    # retrain only the decoders of a saved model with other TrainConfig values, survey PxAP:
    python bench/decoder_diagnostics.py retrain --model MODEL_DIR decoder_affinity_weight=0

MODEL_DIR: a model trained on GlaS with a decoder (e.g. bench/localization.py --models DIR
writes DIR/lite_224). ``retrain`` scores on the test split: a diagnostic, not a way to choose
defaults.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from wsl_models.cam import cam_method, resize_maps
from wsl_models.data import ImageDataset, load_dataset, load_masks, stratified_holdout
from wsl_models.decoder import FPNDecoder
from wsl_models.decoder_training import plan_targets, train_decoders
from wsl_models.evaluation import evaluate
from wsl_models.masks import resize_mask
from wsl_models.train_config import TrainConfig
from wsl_models.versions import ModelStore

GRID = (56, 56)  # the Lite decoders' grid at 224 px


def seeds(args: argparse.Namespace) -> None:
    ens = ModelStore(args.model).load()
    ds = load_dataset(args.data)
    cfg = TrainConfig()
    train_s, _ = stratified_holdout(ds.split("train"), cfg.val_fraction, cfg.seed)
    truths = [resize_mask(t, GRID) for t in load_masks(train_s)]
    print(f"ground-truth foreground: {np.mean([t.mean() for t in truths]):.3f} of the pixels")
    _, plan = plan_targets(ens, train_s, [None] * len(train_s), cfg)
    hit_fg = all_fg = hit_bg = all_bg = 0
    for region, t in zip(plan.seed_regions(GRID, cfg), truths, strict=True):
        if region is None:
            continue
        fg, bg = region
        hit_fg, all_fg = hit_fg + (t & fg).sum(), all_fg + fg.sum()
        hit_bg, all_bg = hit_bg + (~t & bg).sum(), all_bg + bg.sum()
    print(
        f"seed regions (defaults): foreground {hit_fg / all_fg:.3f} on glands, "
        f"background {hit_bg / all_bg:.3f} off them"
    )
    ids = ImageDataset(train_s, ens.config.classes, ens.config.image_size)
    x = torch.stack([ids[i][0] for i in range(len(ids))])
    for method in args.cams.split(","):
        ens.cam = cam_method(method)
        for mode in ("class", "max"):
            ens.config.map_mode = mode
            mins, maxs = [], []
            for s in range(0, len(x), 16):
                out = ens.predict(x[s : s + 16], seed=0)
                for b in range(len(out.label)):
                    m = resize_maps(ens.source_maps(out, b, ids.labels[s + b], "cam"), GRID)
                    mins.append(m.numpy().min(0))
                    maxs.append(m.numpy().max(0))
            row = []
            for q in (0.05, 0.1, 0.2, 0.3):
                fg = np.mean(
                    [
                        t[m >= np.quantile(m, 1 - q)].mean()
                        for m, t in zip(mins, truths, strict=True)
                    ]
                )
                bg = np.mean(
                    [(~t)[m <= np.quantile(m, q)].mean() for m, t in zip(maxs, truths, strict=True)]
                )
                row.append(f"top/bottom {q:.0%}: fg {fg:.2f} bg {bg:.2f}")
            print(method, mode, " | ".join(row))


def retrain(args: argparse.Namespace) -> None:
    ens = ModelStore(args.model).load()
    ds = load_dataset(args.data)
    base = TrainConfig()
    values = {}
    for item in args.settings:
        key, raw = item.split("=", 1)
        cur = getattr(base, key)
        values[key] = (
            tuple(type(cur[0])(v) for v in raw.split(","))
            if isinstance(cur, tuple)
            else type(cur)(raw)
        )
    cfg = dataclasses.replace(base, **values)
    train_s, _ = stratified_holdout(ds.split("train"), cfg.val_fraction, cfg.seed)
    torch.manual_seed(0)
    for m in ens.members:
        m.decoder = FPNDecoder([lateral.in_channels for lateral in m.decoder.lateral])
    report = train_decoders(ens, train_s, [None] * len(train_s), cfg, torch.device("cpu"))
    r = evaluate(ens, ds, "test", progress=False, protocol="survey", sources=["decoder"])
    loc = r["by_source"]["decoder"]
    print(
        values,
        f"decoders {report['seconds']:.0f} s",
        {k: round(v["pxap"], 1) for k, v in loc.items()},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["seeds", "retrain"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--cams", default="xgradcam,gradcam++,cam")
    p.add_argument("settings", nargs="*", help="retrain: TrainConfig field=value ...")
    args = p.parse_intermixed_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"seeds": seeds, "retrain": retrain}[args.what](args)


if __name__ == "__main__":
    main()
