"""Operating points from held-out data: the review threshold and every map source's mask threshold.

The few pixel-labelled held-out images (the Survey's ``valpx``) choose each threshold by pooled
mIoU; without them the defaults stay (Otsu for CAMs, 0.5 for the decoder's probability).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import ImageDataset, Sample, load_masks
from .ensemble import Ensemble
from .masks import calibrate_threshold
from .metrics import pxap


def calibration_samples(held: list[Sample], n: int, mask_classes: list[str] | None) -> list[Sample]:
    """Up to n pixel-labelled held-out images of mask classes, alternating classes (valpx)."""
    with_masks = [
        s for s in held if s.mask is not None and (mask_classes is None or s.label in mask_classes)
    ]
    by_class: dict[str, list[Sample]] = {}
    for s in with_masks:
        by_class.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    while len(out) < n and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(out) < n:
                out.append(by_class[label].pop(0))
    return out


def review_threshold(
    ensemble: Ensemble, val_ds: ImageDataset, seed: int, quantile: float
) -> dict[str, Any]:
    """Validation accuracy; flag images less certain than ``quantile`` of the correct ones."""
    conf = ensemble.config
    x = torch.stack([val_ds[i][0] for i in range(len(val_ds))])
    outs = [ensemble.predict(x[i : i + 16], seed=seed) for i in range(0, len(x), 16)]
    labels = torch.tensor(val_ds.labels)
    pred = torch.cat([o.label for o in outs])
    unc = torch.cat([o.uncertainty[conf.review_measure] for o in outs])
    member_pred = torch.cat([o.member_probs.argmax(-1) for o in outs], dim=1)
    report: dict[str, Any] = {
        "val_accuracy": {
            "ensemble": float((pred == labels).float().mean()),
            **{
                n: float((member_pred[k] == labels).float().mean())
                for k, n in enumerate(conf.member_keys)
            },
        }
    }
    ok = unc[pred == labels]
    if len(ok) >= 3:
        conf.review_threshold = float(torch.quantile(ok, quantile))
    report["review_threshold"] = conf.review_threshold
    return report


def mask_thresholds(ensemble: Ensemble, calib: list[Sample], seed: int) -> dict[str, Any]:
    """Per source: each member's threshold and the intersection's, by pooled mIoU at native size."""
    conf = ensemble.config
    cds = ImageDataset(calib, conf.classes, conf.input_size)
    truths = load_masks(calib)
    keys = [*conf.member_keys, "_min", "_mean"]
    maps: dict[str, dict[str, list[np.ndarray]]] = {
        src: {n: [] for n in keys} for src in conf.sources
    }
    for i, truth in enumerate(truths):
        out = ensemble.predict(cds[i][0][None], seed=seed)
        for source in conf.sources:
            res = ensemble.masks(out, 0, truth.shape, label=cds.labels[i], source=source)
            for n in conf.member_keys:
                maps[source][n].append(res.member_maps[n])
            # The consensus over every member (calibration images are of the true class).
            stack = np.stack([res.member_maps[n] for n in conf.member_keys])
            maps[source]["_min"].append(stack.min(0))
            maps[source]["_mean"].append(stack.mean(0))
    found = {
        src: {n: calibrate_threshold(v, truths) for n, v in by_key.items()}
        for src, by_key in maps.items()
    }
    cam = found["cam"]
    conf.member_thresholds = {n: cam[n][0] for n in conf.member_keys}
    conf.intersection_threshold = cam["_min"][0]
    conf.mean_threshold = cam["_mean"][0]
    if "decoder" in found:
        conf.decoder_threshold = found["decoder"]["_min"][0]
    return {
        "images": [s.name for s in calib],
        "thresholds": {src: {n: t for n, (t, _) in f.items()} for src, f in found.items()},
        "miou": {src: {n: m for n, (_, m) in f.items()} for src, f in found.items()},
        # PxAP of each source's consensus (the intersection map) at native size.
        "pxap": {src: pxap(by_key["_min"], truths) for src, by_key in maps.items()},
    }


def choose_map_source(ensemble: Ensemble, pxaps: dict[str, float]) -> dict[str, Any]:
    """Serve the decoder only where its consensus scores at least the CAM's PxAP on the
    pixel-labelled held-out images: a decoder that learned its seeds' mistakes never serves.
    Only demotes: a CAM chosen by the user stays."""
    conf = ensemble.config
    before = conf.map_source
    if before == "decoder" and {"decoder", "cam"} <= pxaps.keys():
        conf.map_source = "decoder" if pxaps["decoder"] >= pxaps["cam"] else "cam"
    return {
        "map_source": conf.map_source,
        "was": before,
        "why": f"held-out PxAP decoder {pxaps.get('decoder', float('nan')):.1f}, "
        f"cam {pxaps.get('cam', float('nan')):.1f}",
    }


def calibrate(
    ensemble: Ensemble,
    val_ds: ImageDataset,
    calib: list[Sample],
    seed: int,
    quantile: float,
    map_source: bool = False,
) -> dict[str, Any]:
    """Set review and mask thresholds from held-out data and, with ``map_source``, choose
    between the decoder and the CAM (``choose_map_source``); returns what was measured."""
    report: dict[str, Any] = {}
    if len(val_ds):
        report.update(review_threshold(ensemble, val_ds, seed, quantile))
    if calib:
        report["calibration"] = mask_thresholds(ensemble, calib, seed)
        if map_source and ensemble.config.decoder:
            report["map_source"] = choose_map_source(ensemble, report["calibration"]["pxap"])
    return report
