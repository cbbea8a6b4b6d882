"""Datasets on the GlaS layout: ``images/``, ``labels.csv`` (image,label,split), optional ``masks/``."""

from __future__ import annotations

import csv
import random
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
        if not name or not label:
            raise DatasetError(f"{table}:{n}: empty image name or label")
        image = root / "images" / name
        if not image.is_file():
            raise DatasetError(f"{table}:{n}: image {image} not found")
        mask = root / "masks" / name
        samples.append(
            Sample(image, label, (row["split"] or "").strip(), mask if mask.is_file() else None)
        )
    if not samples:
        raise DatasetError(f"{table} lists no images")
    classes = tuple(sorted({s.label for s in samples}))
    return Dataset(root, classes, tuple(samples))


def stratified_holdout(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of each class (at least one image per class when it has two)."""
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: s.name)
        rng.shuffle(group)
        k = round(len(group) * fraction) if fraction > 0 else 0
        k = max(k, 1) if fraction > 0 and len(group) >= 2 else k
        held += group[:k]
        train += group[k:]
    return train, held


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights so every class is drawn equally often."""
    counts = np.bincount(labels)
    return torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes each image once (at the model's input size) and keeps it as uint8."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        size: tuple[int, int],
        augment: bool = False,
    ) -> None:
        unknown = sorted({s.label for s in samples} - set(classes))
        if unknown:
            raise DatasetError(f"unknown class(es) {unknown}; the model knows {list(classes)}")
        self.samples = list(samples)
        self.labels = [list(classes).index(s.label) for s in samples]
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
