"""What each member saw and why an image was flagged, as plain data for any front end.

A pre-annotation is the overlap of the maps of the members that agree on the class. When it
is wrong, an annotator needs to see whether every member looked at the wrong place or one
member disagreed; a reviewer needs to know why the image was flagged. Nothing here knows
Label Studio: the backend draws the layers as brush regions and the reasons as a note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .ensemble import EnsembleOutput, ImageMasks, disagreement_floor

CONSENSUS = "consensus"
DEFAULT_LEVELS = (0.5,)
STYLES = ("outline", "fill")


@dataclass(frozen=True)
class Layer:
    """One level of one map: where ``source`` (a member key, or CONSENSUS) is >= ``level``."""

    source: str
    level: float
    mask: np.ndarray  # (H, W) bool


def nested_levels(prob: np.ndarray, levels: Sequence[float]) -> list[tuple[float, np.ndarray]]:
    """``prob >= t`` for each level, lowest first, the empty ones left out.

    Each region lies inside the one below it by construction, so translucent regions drawn
    on top of each other darken where the map is high: a few smooth regions (a small RLE)
    instead of a dense heat map."""
    out = []
    for t in sorted(set(float(v) for v in levels)):
        region = prob >= t
        if region.any():
            out.append((t, region))
    return out


def outline(region: np.ndarray, width: int) -> np.ndarray:
    """The inner band of ``region``'s boundary, ``width`` pixels wide (the image edge counts
    as a boundary). Drawn for each level, the bands are a contour map: members whose maps
    overlap stay apart as lines of their own colours, where filled regions would cover each
    other (tried in Label Studio 1.23, which draws brush regions nearly opaque)."""
    inner = ndimage.binary_erosion(region, iterations=width, border_value=0)
    return region & ~inner


def outline_width(shape: tuple[int, int]) -> int:
    """About a 150th of the shorter side: visible at any zoom, small against the object."""
    return max(1, round(min(shape) / 150))


def explanation_layers(
    masks: ImageMasks, levels: Sequence[float] = DEFAULT_LEVELS, style: str = "outline"
) -> list[Layer]:
    """Every agreeing member's map (the one its mask was made from) and the consensus, as
    nested levels: each level's region (``style="fill"``) or its outline. None where the class
    gets no masks, nor for members that disagree."""
    if style not in STYLES:
        raise ValueError(f"explanation style must be one of {STYLES}, not {style!r}")
    if not masks.wanted or not masks.agreeing:
        return []
    maps = [(name, masks.member_maps[name]) for name in masks.agreeing]
    maps.append((CONSENSUS, masks.intersection_map))
    width = outline_width(masks.intersection_map.shape)
    return [
        Layer(name, level, region if style == "fill" else outline(region, width))
        for name, prob in maps
        for level, region in nested_levels(prob, levels)
    ]


@dataclass(frozen=True)
class Vote:
    member: str
    label: str  # the member's own class
    probability: float  # its probability of that class (mean of the MC samples)


def member_votes(out: EnsembleOutput, index: int, classes: Sequence[str]) -> list[Vote]:
    """What each member said about image ``index``."""
    probs = out.member_probs[:, index]  # (M, C)
    return [
        Vote(name, classes[int(p.argmax())], float(p.max()))
        for name, p in zip(out.member_keys, probs, strict=True)
    ]


def flag_reasons(
    out: EnsembleOutput,
    index: int,
    classes: Sequence[str],
    review_measure: str,
    review_threshold: float | None,
) -> list[str]:
    """Why image ``index`` was flagged for review (empty when it was not), in words: the
    same two tests as ``Ensemble.predict``, with which member said what."""
    reasons = []
    agree = int(out.agree[:, index].sum())
    if agree < disagreement_floor(len(out.member_keys)):
        said = "; ".join(f"{v.member}: {v.label} {v.probability:.2f}" for v in
                         member_votes(out, index, classes))  # fmt: skip
        reasons.append(f"the models disagree on the class ({said})")
    if review_threshold is not None:
        value = float(out.uncertainty[review_measure][index])
        if value > review_threshold:
            reasons.append(
                f"{review_measure} {value:.2f} is above the calibrated review threshold "
                f"{review_threshold:.2f}"
            )
    return reasons
