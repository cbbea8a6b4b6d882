"""Label Studio annotations <-> a training dataset on disk (images/, masks/, labels.csv).

Images are decoded as the browser shows them (EXIF orientation applied), so a brush RLE, which
Label Studio stores at the displayed size, lands on the right pixels.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsl_models.clicks import click_radius, click_target, save_points

from .fetch import FetchError, ImageFetcher
from .label_config import parse_label_config
from .rle import rle_to_mask

log = logging.getLogger(__name__)


def _latest_annotation(task: dict) -> dict | None:
    live = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
    return max(live, key=lambda a: a.get("updated_at") or a.get("created_at") or "", default=None)


def _image_label(results: list[dict], schema: Any) -> str:
    """The Choices answer; else the one brush label used; else "" (unlabelled)."""
    for r in results:
        if r.get("from_name") == schema.choices_name and r.get("value", {}).get("choices"):
            return r["value"]["choices"][0]
    brushes = {b for r in results if r.get("type") == "brushlabels" for b in _brush_labels(r)}
    return brushes.pop() if len(brushes) == 1 else ""


def _results(task: dict, schema: Any, review_label: str = "") -> list[dict]:
    """The results of the task's latest annotation, without ``review_label`` brush regions
    and without the explanation control's regions (the models' maps, never training data)."""
    annotation = _latest_annotation(task)
    results = annotation.get("result", []) if annotation else []
    if schema.explanation_name:
        results = [
            r for r in results
            if not (isinstance(r, dict) and r.get("from_name") == schema.explanation_name)
        ]  # fmt: skip
    if review_label:
        results = [r for r in results if review_label not in _brush_labels(r)]
    return results


def annotated_labels(tasks: list[dict], label_config: str, review_label: str = "") -> set[str]:
    """The image labels the tasks' latest annotations give (before any image is fetched)."""
    schema = parse_label_config(label_config)
    return {_image_label(_results(task, schema, review_label), schema) for task in tasks} - {""}


# KeyPointLabels labels that mark background (a negative click); any other keypoint label is
# a positive click unless the result says ``is_positive: false`` (Alt-click of a smart tool).
NEGATIVE_POINT_LABELS = frozenset({"background", "negative"})


def clicks_of(results: list[dict], size: tuple[int, int]) -> list[tuple[float, float, bool]]:
    """(x, y, positive) in pixels of the image as displayed (W, H = ``size``) of every
    keypoint result; points outside the image are dropped."""
    w, h = size
    clicks = []
    for r in results:
        value = r.get("value") if isinstance(r, dict) else None
        if r.get("type") != "keypointlabels" or not isinstance(value, dict):
            continue
        x, y = value.get("x"), value.get("y")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
            continue
        px, py = x * w / 100, y * h / 100
        if not (0 <= px < w and 0 <= py < h):
            continue
        names = value.get("keypointlabels") or []
        negative = r.get("is_positive") is False or any(
            isinstance(n, str) and n.lower() in NEGATIVE_POINT_LABELS for n in names
        )
        clicks.append((float(px), float(py), not negative))
    return clicks


def _brush_labels(result: Any) -> list:
    value = result.get("value") if isinstance(result, dict) else None
    return (value.get("brushlabels") or []) if isinstance(value, dict) else []


def collect_dataset(
    tasks: list[dict],
    label_config: str,
    fetcher: ImageFetcher,
    out: Path,
    unlabelled: list[dict] | None = None,
    review_label: str = "",
) -> dict[str, int]:
    """Write tasks as a dataset (images/, masks/, labels.csv) under ``out``.

    Brush regions labelled ``review_label`` (the "review here" layer an annotator may have
    submitted along with the mask) and the explanation control's regions are not part of any
    mask or label.

    Per task whatever exists: the image label (Choices, or the single brush label used), a
    human mask (union of the BrushLabels regions), clicks (KeyPointLabels results, written as
    ``points/``: sparse pixel labels, ``wsl_models.clicks``), or none of them for
    ``unlabelled`` tasks (they teach through pseudo-masks). Annotated tasks with nothing, and
    tasks whose image fails, are skipped and counted.
    """
    schema = parse_label_config(label_config)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "points").mkdir(parents=True, exist_ok=True)
    rows = []
    counts = {"tasks": len(tasks), "used": 0, "labelled": 0, "masks": 0, "clicked": 0,
              "unlabelled": 0, "skipped": 0}  # fmt: skip
    work = [(t, True) for t in tasks] + [(t, False) for t in unlabelled or []]
    for task, annotated in work:
        results = _results(task, schema, review_label) if annotated else []
        label = _image_label(results, schema)
        brush = [
            r for r in results if r.get("type") == "brushlabels" and r.get("value", {}).get("rle")
        ]
        points = [r for r in results if r.get("type") == "keypointlabels"]
        if annotated and not label and not brush and not points:
            counts["skipped"] += 1
            continue
        try:
            image = fetcher.fetch(task["data"][schema.image_key])
        except (FetchError, KeyError, TypeError) as exc:
            log.warning("training: task %s skipped: %s", task.get("id"), exc)
            counts["skipped"] += 1
            continue
        name = f"task_{task['id']}.png"
        image.save(out / "images" / name)
        mask = np.zeros((image.height, image.width), bool)
        for r in brush:
            mask |= rle_to_mask(r["value"]["rle"], image.height, image.width)
        if mask.any():
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name)
            counts["masks"] += 1
        clicks = clicks_of(points, image.size)
        if clicks:
            shape = (image.height, image.width)
            save_points(click_target(clicks, shape, click_radius(shape)), out / "points" / name)
            counts["clicked"] += 1
        rows.append({"image": name, "label": label, "split": "train"})
        counts["used"] += 1
        counts["labelled" if label else "unlabelled"] += 1
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return counts
