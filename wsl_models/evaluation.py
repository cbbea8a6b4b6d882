"""Evaluation on pixel-labelled data: accuracy, PxAP, Dice/IoU of fg and bg, two baselines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Dataset, DatasetError
from .ensemble import Ensemble
from .images import open_image, open_mask, to_tensor
from .masks import binarize
from .metrics import (
    PXAP_BINS,
    centred_gaussian,
    mean_scores,
    pxap_from_histograms,
    score_histograms,
    segmentation_scores,
)

GAUSSIAN_THRESHOLD = 0.5


class _Tally:
    """Pooled PxAP histograms and per-image Dice/IoU rows for one map/mask source."""

    def __init__(self) -> None:
        self.fg = np.zeros(PXAP_BINS, np.int64)
        self.bg = np.zeros(PXAP_BINS, np.int64)
        self.rows: list[dict[str, float]] = []

    def add(self, score_map: np.ndarray | None, mask: np.ndarray, truth: np.ndarray) -> None:
        if score_map is not None:
            f, b = score_histograms(score_map, truth)
            self.fg += f
            self.bg += b
        self.rows.append(segmentation_scores(mask, truth))

    def result(self) -> dict[str, float]:
        out = mean_scores(self.rows)
        if self.fg.sum():
            out["pxap"] = pxap_from_histograms(self.fg, self.bg)
        return out


def evaluate(
    ensemble: Ensemble,
    dataset: Dataset,
    split: str = "test",
    batch_size: int = 8,
    overlays: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    cfg = ensemble.config
    samples = [s for s in dataset.split(split)]
    unknown = sorted({s.label for s in samples} - set(cfg.classes))
    if unknown:
        raise DatasetError(f"split {split!r} has classes {unknown} the model does not know")
    if any(s.mask is None for s in samples):
        raise DatasetError(f"every image of split {split!r} needs a mask in masks/ to evaluate")
    names = cfg.member_keys
    keys = [*names, "intersection", "mean_map"]
    tallies = {k: _Tally() for k in [*keys, "baseline_all_ones", "baseline_gaussian"]}
    correct = {k: 0 for k in ["ensemble", *names]}
    flagged = no_mask = 0
    overlay_dir = Path(overlays) if overlays else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=len(samples), desc="evaluate", disable=not progress)
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        imgs = [open_image(s.image) for s in batch]
        x = torch.stack([to_tensor(im, cfg.image_size) for im in imgs])
        out = ensemble.predict(x, seed=seed)
        member_pred = out.member_probs.argmax(-1)
        for j, s in enumerate(batch):
            truth = open_mask(s.mask, imgs[j].size)
            y = cfg.classes.index(s.label)
            correct["ensemble"] += int(out.label[j]) == y
            for k, n in enumerate(names):
                correct[n] += int(member_pred[k, j]) == y
            flagged += bool(out.flagged[j])
            res = ensemble.masks(out, j, truth.shape)
            mask = res.mask if res.mask is not None else np.zeros_like(truth)
            no_mask += res.mask is None
            # A class without masks (e.g. "normal") predicts no foreground anywhere.
            off = np.zeros(truth.shape, np.float32)
            for n in names:
                m = res.member_maps[n] if res.wanted else off
                tallies[n].add(m, res.member_masks[n], truth)
            inter = res.intersection_map if res.wanted else off
            mean = res.mean_map if res.wanted else off
            tallies["intersection"].add(inter, mask, truth)
            tallies["mean_map"].add(mean, binarize(mean, cfg.mean_threshold) & res.wanted, truth)
            ones = np.ones_like(truth, dtype=np.float32)
            tallies["baseline_all_ones"].add(ones, ones > 0, truth)
            g = centred_gaussian(*truth.shape)
            tallies["baseline_gaussian"].add(g, g > GAUSSIAN_THRESHOLD, truth)
            if overlay_dir:
                write_overlay(
                    overlay_dir / f"{Path(s.name).stem}.png",
                    imgs[j],
                    res,
                    truth,
                    cfg.classes,
                    s.label,
                )
        bar.update(len(batch))
    bar.close()
    n = len(samples)
    return {
        "split": split,
        "images": n,
        "image_size": list(cfg.image_size),
        "members": names,
        "accuracy": {k: 100.0 * v / n for k, v in correct.items()},
        "flagged": flagged,
        "no_mask": no_mask,
        "localization": {k: t.result() for k, t in tallies.items()},
        "seconds": time.perf_counter() - start,
    }


def format_table(result: dict[str, Any]) -> str:
    cols = ["pxap", "dice_fg", "dice_bg", "iou_fg", "iou_bg", "miou"]
    lines = [
        f"split {result['split']}: {result['images']} images at "
        f"{result['image_size'][1]}x{result['image_size'][0]}, "
        f"flagged {result['flagged']}, without mask {result['no_mask']}",
        "accuracy: " + ", ".join(f"{k} {v:.1f}" for k, v in result["accuracy"].items()),
        f"{'source':<28}" + "".join(f"{c:>9}" for c in cols),
    ]
    for name, row in result["localization"].items():
        cells = "".join(f"{row[c]:9.1f}" if c in row else f"{'-':>9}" for c in cols)
        lines.append(f"{name:<28}{cells}")
    return "\n".join(lines)


def write_overlay(path: Path, image, res, truth: np.ndarray, classes, true_label: str) -> None:
    """Image | each member's heat map | consensus mask | ground truth, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(res.member_maps) + 2
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3.2))
    arr = np.asarray(image)
    axes[0].imshow(arr)
    axes[0].set_title(f"true {true_label}\npred {classes[res.label]}", fontsize=8)
    for ax, (name, m) in zip(axes[1:], res.member_maps.items(), strict=False):
        ax.imshow(arr)
        ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name + (" (agrees)" if name in res.agreeing else ""), fontsize=8)
    mask = res.mask if res.mask is not None else np.zeros_like(truth)
    axes[-2].imshow(mask, cmap="gray")
    axes[-2].set_title("consensus mask" + (" (none)" if res.mask is None else ""), fontsize=8)
    axes[-1].imshow(truth, cmap="gray")
    axes[-1].set_title("ground truth", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
