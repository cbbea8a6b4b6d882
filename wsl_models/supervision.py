"""Pixel supervision for members: human masks, pseudo-masks, and the min-max entropy localizer.

Per image, whatever exists is used: an image label (classification loss), a human mask (pixel
loss on the member's class map), or neither (a weighted pixel loss against a pseudo-mask: the
confident regions of the previous model's consensus, the uncertain band between the two
thresholds ignored). This is the self-learning of Belharbi et al. (WACV 2021), here on the
CAM itself instead of a separate segmentation head: the map users see is the map trained.

Targets are uint8 maps at the model's input size: 0 background, 1 foreground, 255 ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torchvision import tv_tensors

from .cam import AnalyticCAM, XGradCAM, normalize_maps, resize_maps
from .data import ImageDataset, Sample
from .images import open_mask
from .masks import resize_mask
from .members import Member

IGNORE = 255
NO_TARGET, HUMAN, PSEUDO = 0, 1, 2
_EPS = 1e-6


def human_target(sample: Sample, size: tuple[int, int]) -> np.ndarray | None:
    """The sample's mask file as a 0/1 target at ``size`` (nearest), or None without one."""
    if sample.mask is None:
        return None
    return resize_mask(open_mask(sample.mask), size).astype(np.uint8)


def pseudo_target(consensus: np.ndarray, fg: float, bg: float) -> np.ndarray:
    """1 where the map is >= fg, 0 where <= bg, IGNORE in the uncertain band between."""
    if not 0.0 <= bg < fg <= 1.0:
        raise ValueError(f"pseudo-mask thresholds need 0 <= bg < fg <= 1, got bg={bg}, fg={fg}")
    out = np.full(consensus.shape, IGNORE, np.uint8)
    out[consensus >= fg] = 1
    out[consensus <= bg] = 0
    return out


class PixelDataset(ImageDataset):
    """An ImageDataset that also yields a pixel target and its kind, augmented together."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        size: tuple[int, int],
        targets: Sequence[np.ndarray | None],
        kinds: Sequence[int],
        augment: bool = False,
    ) -> None:
        super().__init__(samples, classes, size, augment)
        if not len(targets) == len(kinds) == len(self.samples):
            raise ValueError("one target and one kind per sample")
        blank = np.full(size, IGNORE, np.uint8)
        self.targets = [torch.from_numpy(blank if t is None else t) for t in targets]
        self.kinds = [
            k if t is not None else NO_TARGET for t, k in zip(targets, kinds, strict=True)
        ]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        x, t = self.image(i), self.targets[i]
        if self.augment is not None:
            x, t = self.augment(tv_tensors.Image(x), tv_tensors.Mask(t))
        return x.float() / 255.0, self.labels[i], t.as_subclass(torch.Tensor), self.kinds[i]


def class_map(member: Member, features: torch.Tensor, labels: torch.Tensor, cam: AnalyticCAM):
    """(B, h, w) differentiable, per-image min-max normalised map of each image's class."""
    maps = cam.from_features(features, member.head.weight)
    picked = maps[torch.arange(len(labels)), labels.clamp_min(0)]
    return normalize_maps(picked)


def pixel_loss(
    maps: torch.Tensor, target: torch.Tensor, kind: torch.Tensor, weights: dict[int, float]
) -> torch.Tensor:
    """Binary cross-entropy of (B, h, w) maps in [0, 1] against (B, H, W) targets.

    Maps are upsampled to the target size; IGNORE pixels and NO_TARGET images count for
    nothing; each image's mean loss is weighted by its kind (human or pseudo).
    """
    up = resize_maps(maps, tuple(target.shape[-2:])).clamp(_EPS, 1 - _EPS)
    valid = (target != IGNORE).float()
    bce = F.binary_cross_entropy(up, (target == 1).float(), reduction="none") * valid
    per_image = bce.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    w = torch.tensor([weights.get(int(k), 0.0) for k in kind], device=maps.device)
    return (per_image * w).sum() / max(len(kind), 1)


def minmax_entropy_loss(
    member: Member,
    x: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor,
    area: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max entropy objective (Belharbi et al., arXiv 1907.12934) with a size prior.

    The localizer's soft mask M must keep what the classifier needs (low entropy, right class
    on M*x) and leave nothing useful outside (maximum entropy on (1-M)*x: cross-entropy to the
    uniform distribution); the area of M is kept inside ``area`` so neither side is empty.
    Returns (loss, M upsampled to the input size).
    """
    mask = F.interpolate(member.localize(features), size=x.shape[-2:], mode="bilinear")
    keep = labels >= 0
    if not keep.any():
        return features.sum() * 0.0, mask
    xk, mk, yk = x[keep], mask[keep], labels[keep]
    inside = F.cross_entropy(member(xk * mk), yk)
    outside = -F.log_softmax(member(xk * (1 - mk)), dim=1).mean(dim=1).mean()
    fraction = mk.mean(dim=(1, 2, 3))
    size = (F.relu(area[0] - fraction) + F.relu(fraction - area[1])).mean()
    return inside + outside + 10.0 * size, mask


def default_cam(cam: object) -> AnalyticCAM:
    """Pixel losses need a differentiable closed-form map: the ensemble's, or XGrad-CAM."""
    return cam if isinstance(cam, AnalyticCAM) else XGradCAM()
