"""Tiny synthetic datasets on the GlaS layout: bright blobs or disks = "lesion", none = "normal"."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def blob_image(
    rng: np.random.Generator, size: tuple[int, int], blobs: int
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image with ``blobs`` bright elliptic blobs on noise, and their mask."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.normal(0.35, 0.06, (h, w, 3))
    mask = np.zeros((h, w), bool)
    for _ in range(blobs):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.08, 0.16) * h, rng.uniform(0.08, 0.16) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img[mask] += np.array([0.45, 0.2, 0.05])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def disk_image(
    rng: np.random.Generator, size: tuple[int, int], disks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bright blurred disks on textured noise (smoothed noise at two scales), and their mask.

    Harder than ``blob_image`` for a map at 1/32: the edge is soft and the background has
    structure of its own, so a mask must follow the image, not a bright spot."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 3) * 1.5
    img = 0.35 + 0.06 * texture[..., None] + rng.normal(0, 0.04, (h, w, 3))
    mask = np.zeros((h, w), bool)
    for _ in range(disks):
        r = rng.uniform(0.12, 0.2) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    soft = ndimage.gaussian_filter(mask.astype(float), 1.5)
    img += soft[..., None] * np.array([0.35, 0.18, 0.05])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def make_dataset(
    out: str | Path,
    per_class: dict[str, int] | None = None,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    kind: str = "blobs",
) -> Path:
    """Write images/, masks/ and labels.csv (splits train/test) under ``out``.

    ``kind``: ``blobs`` (1-2 sharp ellipses on plain noise) or ``disks`` (one blurred disk on
    textured noise)."""
    draw = {"blobs": blob_image, "disks": disk_image}[kind]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    per_class = per_class or {"train": 24, "test": 8}
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_class.items():
        for i in range(n):
            for label in ("lesion", "normal"):
                name = f"{split}_{label}_{i}.png"
                if kind == "blobs":
                    count = int(rng.integers(1, 3)) if label == "lesion" else 0
                else:
                    count = 1 if label == "lesion" else 0
                img, mask = draw(rng, size, count)
                Image.fromarray(img).save(out / "images" / name)
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name)
                rows.append({"image": name, "label": label, "split": split})
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out
