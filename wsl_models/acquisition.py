"""Acquisition functions: which unlabelled image should a human annotate next.

Plain functions over MC samples ``probs`` of shape (T, B, C) -> (B,) values in [0, 1], larger =
more informative (the baal pattern; adding one = one function + one line in ``ACQUISITIONS``).
Each is normalised by its maximum for C classes, not by the batch, so values computed in
different batches are comparable: Label Studio orders tasks by one stored score per task,
and a project is scored page by page.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .uncertainty import bald as _bald
from .uncertainty import margin as _margin
from .uncertainty import predictive_entropy


def _max_entropy(probs: torch.Tensor) -> float:
    return math.log(probs.shape[-1]) if probs.shape[-1] > 1 else 1.0


def entropy(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Predictive entropy / log C: total uncertainty."""
    return (predictive_entropy(probs) / _max_entropy(probs)).clamp(0.0, 1.0)


def bald(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mutual information / log C: the part of the uncertainty more labels can remove."""
    return (_bald(probs) / _max_entropy(probs)).clamp(0.0, 1.0)


def margin(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """1 - (top-1 - top-2) of the mean prediction."""
    return _margin(probs).clamp(0.0, 1.0)


def random(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform values: the baseline every acquisition function has to beat."""
    return torch.rand(probs.shape[1], generator=generator)


ACQUISITIONS: dict[str, Callable[..., torch.Tensor]] = {
    "entropy": entropy,
    "bald": bald,
    "margin": margin,
    "random": random,
}


def acquisition(name: str) -> Callable[..., torch.Tensor]:
    try:
        return ACQUISITIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown acquisition function {name!r}; known: {', '.join(ACQUISITIONS)}"
        ) from None


def score_from_value(value: float) -> float:
    """Label Studio serves the lowest score first, so score = 1 - acquisition value."""
    return 1.0 - float(value)


def diverse_order(
    values: np.ndarray, embeddings: np.ndarray, k: int, weight: float = 0.5
) -> list[int]:
    """Pick ``k`` indices, most informative first, that are not near-duplicates of each other.

    Greedy: each step takes the candidate maximising value - weight * (max cosine similarity to
    the ones already taken). Without it one query batch can be ten views of the same tissue.
    """
    values = np.asarray(values, dtype=np.float64)
    k = min(k, len(values))
    if k <= 0:
        return []
    emb = np.asarray(embeddings, dtype=np.float64).reshape(len(values), -1)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    similarity = np.full(len(values), -np.inf)
    chosen: list[int] = []
    for _ in range(k):
        penalty = np.where(np.isfinite(similarity), np.maximum(similarity, 0.0), 0.0)
        gain = values - weight * penalty
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        similarity = np.maximum(similarity, emb @ emb[best])
    return chosen
