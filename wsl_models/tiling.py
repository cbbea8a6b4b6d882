"""A fully convolutional map of an image too large for one forward, computed tile by tile.

The decoder serves at ``decoder_scale`` x the model's input (``mask_training.py``), and a
large model input times a large scale can outgrow memory. Each tile runs with a margin of
context on every side; only its centre is kept, so a kept pixel sees nearly what it sees in
the whole-image forward (exactly, for a network whose receptive field fits in the margin).
Tiles start at multiples of the network's stride, so every tile's output grid is a piece of
the whole image's grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

STRIDE = 32  # the backbones' output stride: tile origins on this grid keep the maps aligned
TILE_MARGIN = 64  # context run on each side of a tile and dropped (px of the tile's input)


def tile_spans(length: int, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(start, end, keep_from, keep_to) of the tiles along one axis of ``length`` px.

    Tiles of ``tile`` px (the last one flush with the end) overlap by at least ``2 margin``
    where the stride grid allows; the kept parts meet in the middle of each overlap and
    partition [0, length). All four numbers are multiples of ``STRIDE``."""
    if length % STRIDE or tile % STRIDE or margin % STRIDE:
        raise ValueError(f"length, tile and margin must be multiples of {STRIDE}")
    if tile <= 2 * margin:
        raise ValueError(f"a tile of {tile} px keeps nothing with a margin of {margin} px")
    if length <= tile:
        return [(0, length, 0, length)]
    n = 1 + math.ceil((length - tile) / (tile - 2 * margin))
    starts = [STRIDE * round(i * (length - tile) / (n - 1) / STRIDE) for i in range(n)]
    bounds = [0]
    for a, b in zip(starts, starts[1:], strict=False):
        mid = STRIDE * round((b + a + tile) / 2 / STRIDE)  # the middle of the overlap
        bounds.append(min(max(mid, b), a + tile))
    bounds.append(length)
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, tile: int, margin: int
) -> torch.Tensor:
    """``fn(images)`` for a fully convolutional ``fn`` (B, 3, H, W) -> (B, C, H/f, W/f), run
    on tiles of at most ``tile`` px with ``margin`` px of context; one forward when it fits."""
    height, width = images.shape[-2:]
    if height <= tile and width <= tile:
        return fn(images)
    out: torch.Tensor | None = None
    for y0, y1, ky0, ky1 in tile_spans(height, tile, margin):
        for x0, x1, kx0, kx1 in tile_spans(width, tile, margin):
            piece = fn(images[..., y0:y1, x0:x1])
            f = (y1 - y0) // piece.shape[-2]  # the map's stride (4 for the decoder)
            if out is None:
                out = piece.new_empty((*piece.shape[:-2], height // f, width // f))
            out[..., ky0 // f : ky1 // f, kx0 // f : kx1 // f] = piece[
                ..., (ky0 - y0) // f : (ky1 - y0) // f, (kx0 - x0) // f : (kx1 - x0) // f
            ]
    assert out is not None
    return out
