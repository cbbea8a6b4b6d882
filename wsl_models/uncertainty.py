"""MC Dropout sampling and uncertainty measures.

Measures are plain functions over MC samples ``probs`` of shape (T, B, C) (the baal pattern):
adding one is writing one function and registering it in ``MEASURES``. Larger = more uncertain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .members import Member

_TINY = 1e-12


def mc_dropout_probs(
    member: Member, pooled: torch.Tensor, samples: int = 30, seed: int | None = None
) -> torch.Tensor:
    """(T, B, C) softmax samples of the head only, over pooled features computed once.

    Dropout sits right after pooling, so re-running the backbone T times would recompute the
    same features: sampling the head alone is exact and costs T small matmuls. Each sample
    draws one dropout mask shared by the whole batch (one "thinned network" per sample), so an
    image's samples do not depend on which images share its batch: the live /predict of one
    task and the bulk ranking of a page agree. For one image the draws match T full-network
    passes with only dropout in train mode seeded alike, pass by pass.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    # Our own generator, never the process-wide RNG: requests served on other threads draw
    # from that one concurrently, which made a task's score depend on its neighbours.
    gen = torch.Generator(device=pooled.device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    keep = 1.0 - member.dropout.p
    ones = torch.ones(1, pooled.shape[1], device=pooled.device, dtype=pooled.dtype)
    out = []
    for _ in range(samples):
        # F.dropout's draws (bernoulli of 1 - p, scaled by 1 / (1 - p)), taken from ``gen``.
        mask = torch.empty_like(ones).bernoulli_(keep, generator=gen).div_(max(keep, 1e-12))
        out.append(torch.softmax(member.head(pooled * mask), dim=-1))
    return torch.stack(out)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_TINY))).sum(dim=-1)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H[mean_t p_t]: total uncertainty."""
    return _entropy(probs.mean(dim=0))


def bald(probs: torch.Tensor) -> torch.Tensor:
    """Mutual information H[mean p] - mean H[p_t]: the epistemic part (Houlsby et al. 2011)."""
    return (predictive_entropy(probs) - _entropy(probs).mean(dim=0)).clamp_min(0.0)


def variation_ratio(probs: torch.Tensor) -> torch.Tensor:
    """1 - (votes for the modal class) / T."""
    votes = torch.nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).sum(dim=0)
    return 1.0 - votes.max(dim=-1).values.float() / probs.shape[0]


def margin(probs: torch.Tensor) -> torch.Tensor:
    """1 - (p_(1) - p_(2)) of the mean prediction (1 for a single class is meaningless: 0)."""
    mean = probs.mean(dim=0)
    if mean.shape[-1] < 2:
        return torch.zeros(mean.shape[:-1])
    top = mean.topk(2, dim=-1).values
    return 1.0 - (top[..., 0] - top[..., 1])


def member_disagreement(member_probs: torch.Tensor) -> torch.Tensor:
    """(M, B, C) member means -> fraction of members that disagree with the ensemble class."""
    ensemble = member_probs.mean(dim=0).argmax(dim=-1)
    return (member_probs.argmax(dim=-1) != ensemble).float().mean(dim=0)


MEASURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": predictive_entropy,
    "bald": bald,
    "variation_ratio": variation_ratio,
    "margin": margin,
}


def uncertainty_measure(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return MEASURES[name]
    except KeyError:
        raise ValueError(
            f"unknown uncertainty measure {name!r}; known: {', '.join(MEASURES)}"
        ) from None
