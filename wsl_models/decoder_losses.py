"""The decoder's losses, pure functions over tensors: partial cross-entropy on seeds and
masks, the colour-affinity term (a local dense-CRF relaxation) and the area prior. Shared by
the weak decoder's training (decoder_training.py) and the segmenter's (mask_training.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .supervision import IGNORE


def _pairs(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): every pixel and its neighbour at offset (dy >= 0, dx), both cropped to fit."""
    h, w = t.shape[-2:]
    a = t[..., : h - dy, max(0, -dx) : w - max(0, dx)]
    b = t[..., dy:, max(0, dx) : w + min(0, dx)]
    return a, b


Offsets = list[tuple[int, int, torch.Tensor]]


def pair_weights(image: torch.Tensor, sigma: float, dilations: Sequence[int]) -> Offsets:
    """For each offset (d, 0), (0, d), (d, d), (d, -d): exp(-|I_a - I_b|^2 / 2 sigma^2) of every
    pixel pair (B, 1, ...). They depend on the image only: computed once per training run."""
    out: Offsets = []
    for d in dilations:
        for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):
            if dy >= image.shape[-2] or abs(dx) >= image.shape[-1]:
                continue
            ia, ib = _pairs(image, dy, dx)
            out.append((dy, dx, torch.exp(-((ia - ib) ** 2).sum(1, keepdim=True) / (2 * sigma**2))))
    return out


def affinity_loss(probs: torch.Tensor, weights: Offsets) -> torch.Tensor:
    """Colour-weighted disagreement of neighbouring pixels (a local dense-CRF relaxation):
    the ``pair_weights``-weighted mean of the Potts relaxation p_a (1 - p_b) + p_b (1 - p_a).
    probs (B, 1, h, w) foreground probability, on the grid the weights were made on."""
    total = probs.new_zeros(())
    norm = probs.new_zeros(())
    for dy, dx, w in weights:
        pa, pb = _pairs(probs, dy, dx)
        total = total + (w * (pa * (1 - pb) + pb * (1 - pa))).sum()
        norm = norm + w.sum()
    return total / norm.clamp_min(1e-6)


def select_offsets(weights: Offsets, idx: torch.Tensor) -> Offsets:
    """The ``pair_weights`` of the images ``idx`` (a batch of the images they were made on)."""
    return [(dy, dx, w[idx]) for dy, dx, w in weights]


def area_loss(probs: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Mean over images of how far the foreground fraction lies outside [low, high]."""
    fraction = probs.flatten(1).mean(1)
    return (F.relu(low - fraction) + F.relu(fraction - high)).mean()


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the pixels of ``target`` (uint8) that are not IGNORE."""
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid], (target[valid] == 1).float())
