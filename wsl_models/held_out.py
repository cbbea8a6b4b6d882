"""Selection on pixel-labelled held-out images (the Survey's B-LOC): the images with their
masks, which score a decoder's probabilities by PxAP, and the best state seen so far. Shared by
the weak decoder's training (decoder_training.py) and the segmenter's (mask_training.py)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .cam import resize_maps
from .data import ImageDataset, Sample, load_masks
from .ensemble import Ensemble
from .masks import resize_mask
from .metrics import pxap


@dataclass
class HeldOut:
    """Pixel-labelled held-out images that choose each decoder's epoch (the Survey's B-LOC)."""

    images: torch.Tensor  # (N, 3, H, W) at the model's input size
    truths: list[np.ndarray]  # (H, W) bool at the same size

    @classmethod
    def of(
        cls, ensemble: Ensemble, samples: Sequence[Sample], size: tuple[int, int] | None = None
    ) -> HeldOut | None:
        """The samples at ``size`` (default the model's input size); None without any."""
        if not samples:
            return None
        size = tuple(size or ensemble.config.image_size)
        ds = ImageDataset(samples, ensemble.config.classes, size)
        truths = [resize_mask(m, size) for m in load_masks(samples)]
        return cls(torch.stack([ds[i][0] for i in range(len(ds))]), truths)

    def score(self, probs: torch.Tensor) -> float:
        """PxAP of (N, 1, h, w) decoder probabilities upsampled to the masks' size."""
        up = resize_maps(probs[:, 0].cpu(), self.truths[0].shape).clamp(0, 1).numpy()
        return pxap(list(up), self.truths)


class BestCheckpoint:
    """The module state with the best held-out score seen so far (ties: the later one)."""

    def __init__(self) -> None:
        self.score: float | None = None
        self.at: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def offer(self, score: float, at: int, module: torch.nn.Module) -> None:
        if self.score is None or score >= self.score:
            self.score, self.at, self._state = score, at, copy.deepcopy(module.state_dict())

    def restore(self, module: torch.nn.Module) -> None:
        """Load the kept state into ``module`` (nothing kept: left as it is)."""
        if self._state is not None:
            module.load_state_dict(self._state)
