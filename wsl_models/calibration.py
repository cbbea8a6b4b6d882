"""Operating points from held-out data: the review threshold and every map source's mask threshold.

The few pixel-labelled held-out images (the Survey's ``valpx``) choose each threshold by pooled
mIoU. Without them CAMs keep Otsu, and a decoder trained from CAM seeds alone (also with fewer
than three of them, ``MIN_DECODER_CALIBRATION``) gets the threshold at which its masks cover
as much of the training images as the mean of the seed maps it last learned from, or, where
the objects are large, the plug-in Dice threshold of its maps (``weak_decoder_threshold``):
its probabilities follow how often the seeds hit a pixel, not the object, so 0.5 leaves most
of a large object out and spreads a small one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import ImageDataset, Sample, load_masks
from .ensemble import Ensemble
from .masks import calibrate_threshold, plug_in_threshold
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


# Held-out masks needed before they set a weak decoder's threshold. On GlaS (Lite trio, labels
# only) one or two set it to 0.02 / 0.01: decoder Dice fg / bg 71.4 / 57.7 and 73.0 / 54.9 on
# six other held-out train images, against 70.0 / 60.2 and 71.5 / 63.4 at the CAM-area
# threshold; three set 0.06: 71.7 / 63.1, against 57.0 / 67.6 (bench/results/decoder/judges_*).
# Since the probe rounds, the CAM-area rule with one mask picked 0.05 (Dice bg 20.3): below
# three, the rule without masks sets it (GlaS, the plug-in rule: 0.375 / 0.388, Dice
# 66.6 / 67.3 and 64.0 / 65.6; judges_plug_in_scored.json).
MIN_DECODER_CALIBRATION = 3

AREA_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 ... 0.95


def seeds_recorded(decoders: dict[str, Any] | None) -> tuple[float | None, bool]:
    """What ``weak_decoder_threshold`` takes from ``train_decoders``' report: the mass of the
    seed maps the decoders last learned from (None before it was recorded) and whether the
    probe gate opened (the seed CAMs found large objects)."""
    decoders = decoders or {}
    mass = (decoders.get("seed_area") or {}).get("mass")
    return mass, bool((decoders.get("probe_gate") or {}).get("open", False))


def weak_decoder_threshold(
    ensemble: Ensemble,
    samples: list[Sample],
    seed: int,
    seed_area: float | None = None,
    large_objects: bool = False,
    limit: int = 48,
) -> dict[str, Any] | None:
    """The weak decoder's threshold without pixel-labelled images, from its consensus maps of
    up to ``limit`` labelled training images of mask classes: the lowest grid value whose
    masks cover, on average, no more of the image than ``seed_area`` (the mean of the seed
    maps the decoders last learned from, ``train_decoders``' ``seed_area["mass"]``) or,
    without it, the CAMs' consensus masks. With ``large_objects`` (the probe gate opened: the
    seed CAMs cover a large share of an image) and a seed mass, the plug-in Dice threshold of
    the maps shifted to that mass (``masks.plug_in_threshold``). None without such images.

    A decoder's probabilities follow how often the seeds hit a pixel, so 0.5 suits no object
    size; cut where its masks are as big as its seed maps' mass, it keeps their size. The
    CAMs' masks are no size to match in a new project: nothing calibrated their thresholds.
    Seeds of a large object undershoot it (GlaS: mass 0.40, glands 0.50), and the plug-in
    rule's masks are larger; those of a small finding overreach it (LGG: 0.045, tumours
    0.029), where the mass is the better bound. New GlaS / LGG projects' decoders, held-out
    train Dice fg / bg: 67.2 / 65.7 at the plug-in's 0.35 (60.0 / 66.2 at the mass's 0.5) and
    55.8 / 98.7 at the mass's 0.95 (48.0 / 97.4 at the plug-in's 0.86; docs/weak-masks.md)."""
    maps, cam_areas = weak_decoder_maps(ensemble, samples, seed, seed_area is None, limit)
    if not maps:
        return None
    target = float(np.mean(cam_areas)) if seed_area is None else float(seed_area)
    rule, threshold = weak_threshold_rule(maps, target, seed_area is not None, large_objects)
    ensemble.config.decoder_threshold = threshold
    return {
        "rule": rule,
        "threshold": threshold,
        "target_area": target,
        "decoder_area": mean_area(maps, threshold),
        "images": len(maps),
    }


def weak_decoder_maps(
    ensemble: Ensemble, samples: list[Sample], seed: int, cam_areas: bool, limit: int = 48
) -> tuple[list[np.ndarray], list[float]]:
    """The decoders' consensus maps of up to ``limit`` training images of mask classes whose
    members agree enough for a mask, at the model's size, and (``cam_areas``) the share of
    each image the CAMs' consensus mask covers."""
    conf = ensemble.config
    wanted = set(conf.mask_classes or conf.classes)
    chosen = [s for s in samples if s.label in wanted][:limit]
    if not chosen:
        return [], []
    ds = ImageDataset(chosen, conf.classes, conf.input_size)
    size = tuple(conf.image_size)
    maps, areas = [], []
    for start in range(0, len(ds), 16):
        idx = range(start, min(start + 16, len(ds)))
        out = ensemble.predict(torch.stack([ds[i][0] for i in idx]), seed=seed, samples=0)
        for j, i in enumerate(idx):
            decoded = ensemble.masks(out, j, size, label=ds.labels[i], source="decoder")
            if decoded.mask is None:  # too few members agree: no seeds, no mask to match
                continue
            maps.append(decoded.intersection_map)
            if cam_areas:  # the CAMs' masks (same members agreeing)
                cam = ensemble.masks(out, j, size, label=ds.labels[i], source="cam").mask
                areas.append(float(cam.mean()))
    return maps, areas


def mean_area(maps: list[np.ndarray], t: float) -> float:
    """The mean share of an image the maps' masks at ``t`` cover."""
    return float(np.mean([(m > t).mean() for m in maps]))


def weak_threshold_rule(
    maps: list[np.ndarray], target: float, from_seeds: bool, large_objects: bool
) -> tuple[str, float]:
    """(rule, threshold) of ``weak_decoder_threshold`` for the consensus ``maps``: the plug-in
    Dice threshold at the seeds' mass ``target`` where the objects are large, else the lowest
    grid value whose masks cover no more than ``target`` (the seeds' mass, or without
    ``from_seeds`` the CAMs' masks' area)."""
    if from_seeds and large_objects:
        return "plug_in", round(plug_in_threshold(np.stack(maps), target), 3)
    rule = "seed_area" if from_seeds else "cam_area"
    return rule, next((t for t in AREA_GRID if mean_area(maps, t) <= target), AREA_GRID[-1])


def calibrate(
    ensemble: Ensemble,
    val_ds: ImageDataset,
    calib: list[Sample],
    seed: int,
    quantile: float,
    map_source: bool = False,
    weak_decoder_images: list[Sample] | None = None,
    seeds: tuple[float | None, bool] = (None, False),
) -> dict[str, Any]:
    """Set review and mask thresholds from held-out data and, with ``map_source``, choose
    between the decoder and the CAM (``choose_map_source``); returns what was measured.
    ``weak_decoder_images``: training images to set a decoder's threshold from when no
    pixel-labelled held-out images exist (``weak_decoder_threshold`` with ``seeds``, the
    decoders' ``seeds_recorded``);
    only for a decoder that learned from CAM seeds alone (one trained on human masks keeps
    0.5); also where fewer than ``MIN_DECODER_CALIBRATION`` held-out masks exist (they still
    set the other thresholds)."""
    report: dict[str, Any] = {}
    if len(val_ds):
        report.update(review_threshold(ensemble, val_ds, seed, quantile))
    if calib:
        report["calibration"] = mask_thresholds(ensemble, calib, seed)
        if map_source and ensemble.config.decoder:
            report["map_source"] = choose_map_source(ensemble, report["calibration"]["pxap"])
    # Fewer than MIN_DECODER_CALIBRATION masks still choose the map source (and, in training,
    # the decoder's epoch), but a threshold fitted to one or two images goes to extremes.
    if len(calib) < MIN_DECODER_CALIBRATION and weak_decoder_images and ensemble.config.decoder:
        found = weak_decoder_threshold(ensemble, weak_decoder_images, seed, *seeds)
        if found is not None:
            report["decoder_threshold"] = {**found, "held_out_masks": len(calib)}
    return report
