"""Evaluation on pixel-labelled data: accuracy, PxAP, Dice/IoU of fg and bg, two baselines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Dataset, DatasetError
from .ensemble import Ensemble, ImageMasks
from .images import open_image, open_mask, to_tensor
from .masks import Threshold, binarize, resize_mask
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


SURVEY_SIZE = (224, 224)
PROTOCOLS = ("native", "survey")


def evaluate(
    ensemble: Ensemble,
    dataset: Dataset,
    split: str = "test",
    batch_size: int = 8,
    overlays: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    protocol: str = "native",
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Accuracy and, for every map source (CAM, localizer, decoder), PxAP and Dice/IoU.

    ``protocol``: ``native``: maps of the ensemble's class at each image's own size, scored
    against its full-resolution mask (what annotators get). ``survey``: the published WSOL
    protocol (Choe et al.; NEGEV): masks resized to 224x224 (nearest), the map of the
    ground-truth class, pooled PxAP. The model itself still sees its own input size.
    """
    cfg = ensemble.config
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    sources = sources or cfg.sources
    unknown_src = sorted(set(sources) - set(cfg.sources))
    if unknown_src:
        raise ValueError(f"map source(s) {unknown_src} not available; this model has {cfg.sources}")
    samples = [s for s in dataset.split(split)]
    unknown = sorted({s.label for s in samples} - set(cfg.classes))
    if unknown:
        raise DatasetError(f"split {split!r} has classes {unknown} the model does not know")
    if any(s.mask is None for s in samples):
        raise DatasetError(f"every image of split {split!r} needs a mask in masks/ to evaluate")
    names = cfg.member_keys
    keys = [*names, "intersection", "mean_map"]
    tallies = {src: {k: _Tally() for k in keys} for src in sources}
    baselines = {k: _Tally() for k in ("baseline_all_ones", "baseline_gaussian")}
    correct = {k: 0 for k in ["ensemble", *names]}
    flagged = 0
    no_mask = {src: 0 for src in sources}
    overlay_dir = Path(overlays) if overlays else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=len(samples), desc="evaluate", disable=not progress)
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        imgs = [open_image(s.image) for s in batch]
        x = torch.stack([to_tensor(im, cfg.input_size) for im in imgs])
        out = ensemble.predict(x, seed=seed)
        member_pred = out.member_probs.argmax(-1)
        for j, s in enumerate(batch):
            truth = open_mask(s.mask, imgs[j].size)
            if protocol == "survey":
                truth = resize_mask(truth, SURVEY_SIZE)
            y = cfg.classes.index(s.label)
            correct["ensemble"] += int(out.label[j]) == y
            for k, n in enumerate(names):
                correct[n] += int(member_pred[k, j]) == y
            flagged += bool(out.flagged[j])
            label = y if protocol == "survey" else None
            for src in sources:
                res = ensemble.masks(out, j, truth.shape, label=label, source=src)
                no_mask[src] += res.mask is None
                _score(tallies[src], res, truth, names, cfg.mean_threshold_for(src))
                if overlay_dir and src == cfg.map_source:
                    write_overlay(
                        overlay_dir / f"{Path(s.name).stem}.png",
                        imgs[j],
                        res,
                        truth,
                        cfg.classes,
                        s.label,
                    )
            ones = np.ones_like(truth, dtype=np.float32)
            baselines["baseline_all_ones"].add(ones, ones > 0, truth)
            g = centred_gaussian(*truth.shape)
            baselines["baseline_gaussian"].add(g, g > GAUSSIAN_THRESHOLD, truth)
        bar.update(len(batch))
    bar.close()
    n = len(samples)
    base = {k: t.result() for k, t in baselines.items()}
    by_source = {src: {k: t.result() for k, t in tallies[src].items()} for src in sources}
    main = cfg.map_source if cfg.map_source in sources else sources[0]
    return {
        "split": split,
        "protocol": protocol,
        "images": n,
        "image_size": list(cfg.image_size),
        "eval_size": list(SURVEY_SIZE) if protocol == "survey" else "native",
        "members": names,
        "map_source": main,
        "accuracy": {k: 100.0 * v / n for k, v in correct.items()},
        "flagged": flagged,
        "no_mask": no_mask[main],
        "no_mask_by_source": no_mask,
        # The serving source's rows and the baselines (as before), then every source's.
        "localization": {**by_source[main], **base},
        "by_source": {**by_source, "baselines": base},
        "seconds": time.perf_counter() - start,
    }


def _score(
    tally: dict[str, _Tally],
    res: ImageMasks,
    truth: np.ndarray,
    names: list[str],
    mean_threshold: Threshold,
) -> None:
    """Add one image's maps and masks of one source to its tallies."""
    mask = res.mask if res.mask is not None else np.zeros_like(truth)
    # A class without masks (e.g. "normal") predicts no foreground anywhere.
    off = np.zeros(truth.shape, np.float32)
    for n in names:
        tally[n].add(res.member_maps[n] if res.wanted else off, res.member_masks[n], truth)
    inter = res.intersection_map if res.wanted else off
    mean = res.mean_map if res.wanted else off
    tally["intersection"].add(inter, mask, truth)
    tally["mean_map"].add(mean, binarize(mean, mean_threshold) & res.wanted, truth)


def format_table(result: dict[str, Any]) -> str:
    cols = ["pxap", "dice_fg", "dice_bg", "iou_fg", "iou_bg", "miou"]
    where = "224x224 (survey protocol)" if result.get("protocol") == "survey" else "native size"
    lines = [
        f"split {result['split']}: {result['images']} images, model input "
        f"{result['image_size'][1]}x{result['image_size'][0]}, scored at {where}; "
        f"flagged {result['flagged']}, without mask {result['no_mask']}",
        "accuracy: " + ", ".join(f"{k} {v:.1f}" for k, v in result["accuracy"].items()),
        f"{'map':<32}" + "".join(f"{c:>9}" for c in cols),
    ]
    for src, rows in result.get("by_source", {"": result["localization"]}).items():
        for name, row in rows.items():
            label = name if src in ("", "baselines") else f"{src} {name}"
            cells = "".join(f"{row[c]:9.1f}" if c in row else f"{'-':>9}" for c in cols)
            lines.append(f"{label:<32}{cells}")
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
