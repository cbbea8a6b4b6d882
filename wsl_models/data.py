"""Datasets on the GlaS layout: ``images/``, ``labels.csv`` (image,label,split), optional
``masks/`` and ``points/`` (clicks as sparse targets, ``clicks.py``)."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from .images import open_image, open_mask, to_tensor

REQUIRED_COLUMNS = ("image", "label", "split")


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    image: Path
    label: str
    split: str
    mask: Path | None = None
    points: Path | None = None  # clicks as a sparse target (clicks.py): points/NAME.png

    @property
    def name(self) -> str:
        return self.image.name


@dataclass(frozen=True)
class Dataset:
    root: Path
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]

    def split(self, spec: str) -> list[Sample]:
        """Samples whose split equals, or starts with, one of the comma-separated names.

        ``test`` selects GlaS ``testA`` and ``testB``.
        """
        names = [s.strip() for s in spec.split(",") if s.strip()]
        chosen = [s for s in self.samples if any(s.split.startswith(n) for n in names)]
        if not chosen:
            found = sorted({s.split for s in self.samples})
            raise DatasetError(f"no samples in split {spec!r}; splits present: {found}")
        return chosen


def load_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    table = root / "labels.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found (expected images/, labels.csv, optional masks/)")
    with table.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{table}: missing column(s) {', '.join(missing)}; "
                f"required: {', '.join(REQUIRED_COLUMNS)}"
            )
        rows = list(reader)
    samples = []
    for n, row in enumerate(rows, start=2):
        name, label = (row["image"] or "").strip(), (row["label"] or "").strip()
        if not name:
            raise DatasetError(f"{table}:{n}: empty image name")
        # An empty label is an unlabelled image: it can still teach through a pseudo-mask.
        image = root / "images" / name
        if not image.is_file():
            raise DatasetError(f"{table}:{n}: image {image} not found")
        mask, points = root / "masks" / name, root / "points" / name
        split = (row["split"] or "").strip()
        samples.append(
            Sample(image, label, split, mask if mask.is_file() else None,
                   points if points.is_file() else None)
        )  # fmt: skip
    if not samples:
        raise DatasetError(f"{table} lists no images")
    classes = tuple(sorted({s.label for s in samples if s.label}))
    if not classes:
        raise DatasetError(f"{table}: no image has a label")
    return Dataset(root, classes, tuple(samples))


def _unit_hash(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stratified_holdout(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out about ``fraction`` of each class's labelled images (at least one per class
    when it has two); unlabelled images always train.

    An image is held out when a hash of its name falls below ``fraction``, so its place never
    changes as a project grows: a model trained earlier never saw the images that judge it
    against its successor. (The one exception: a class with no image below ``fraction`` holds
    out its lowest-hash image until the class has one.)
    """
    by_class: dict[str, list[Sample]] = defaultdict(list)
    train, held = [], []
    for s in samples:
        (by_class[s.label] if s.label else train).append(s)
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: _unit_hash(s.name, seed))
        k = sum(_unit_hash(s.name, seed) < fraction for s in group)
        k = max(k, 1) if fraction > 0 and len(group) >= 2 else k
        k = min(k, len(group) - 1) if len(group) >= 2 else 0
        held += group[:k]
        train += group[k:]
    return train, held


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights so every class is drawn equally often (unlabelled, -1: as often as
    an average labelled image)."""
    known = [y for y in labels if y >= 0]
    counts = np.bincount(known) if known else np.ones(1)
    per = [1.0 / counts[y] if y >= 0 else 0.0 for y in labels]
    mean = float(np.mean([p for p in per if p > 0])) if known else 1.0
    return torch.tensor([p if p > 0 else mean for p in per], dtype=torch.double)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes each image once (at the model's input size) and keeps it as uint8."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        size: tuple[int, int],
        augment: bool = False,
    ) -> None:
        unknown = sorted({s.label for s in samples if s.label} - set(classes))
        if unknown:
            raise DatasetError(f"unknown class(es) {unknown}; the model knows {list(classes)}")
        self.samples = list(samples)
        # -1: an unlabelled image (no classification loss)
        self.labels = [list(classes).index(s.label) if s.label else -1 for s in samples]
        self.size = size
        self.augment = _augmentation(size) if augment else None
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            img = open_image(self.samples[i].image)
            self._cache[i] = (to_tensor(img, self.size) * 255).round().to(torch.uint8)
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.image(i)
        if self.augment is not None:
            x = self.augment(x)
        return x.float() / 255.0, self.labels[i]


def _augmentation(size: tuple[int, int]) -> v2.Transform:
    steps: list[v2.Transform] = [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=_ratio(size), antialias=True),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.03),
    ]
    return v2.Compose(steps)


def _ratio(size: tuple[int, int]) -> tuple[float, float]:
    r = size[1] / size[0]
    return (r * 0.8, r * 1.25)


def load_masks(samples: Sequence[Sample]) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for s in samples:
        out.append(open_mask(s.mask) if s.mask is not None else None)
    return out
