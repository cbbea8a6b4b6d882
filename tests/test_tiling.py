"""The decoder run tile by tile on images past ``decoder_tile``: the tiles' kept parts
partition the image, a local map is stitched exactly, and the decoder's tiled map equals its
whole-image map where both fit."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.members import build_member
from wsl_models.tiling import STRIDE, tile_spans, tiled_map


@settings(max_examples=200, deadline=None)
@given(
    cells=st.integers(1, 80),
    tile_cells=st.integers(3, 24),
    margin_cells=st.integers(0, 4),
)
def test_kept_parts_partition_the_axis_inside_their_tiles(cells, tile_cells, margin_cells):
    length, tile, margin = cells * STRIDE, tile_cells * STRIDE, margin_cells * STRIDE
    if tile <= 2 * margin:
        with pytest.raises(ValueError, match="keeps nothing"):
            tile_spans(length, tile, margin)
        return
    spans = tile_spans(length, tile, margin)
    assert spans[0][2] == 0 and spans[-1][3] == length
    for (start, end, keep_from, keep_to), nxt in zip(spans, [*spans[1:], None], strict=True):
        assert 0 <= start <= keep_from < keep_to <= end <= length
        assert end - start == min(tile, length)
        assert all(v % STRIDE == 0 for v in (start, end, keep_from, keep_to))
        if nxt is not None:
            assert keep_to == nxt[2]  # no gap, no overlap
            assert nxt[0] > start  # tiles move forward


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="multiples"):
        tile_spans(100, 64, 0)
    with pytest.raises(ValueError, match="decoder_tile"):
        EnsembleConfig(["a", "b"], ["tiny"], decoder_tile=100)


def test_a_local_map_is_stitched_exactly():
    images = torch.rand(2, 3, 320, 416, generator=torch.Generator().manual_seed(0))

    def local(x: torch.Tensor) -> torch.Tensor:  # each output cell sees its own 4x4 pixels
        return F.avg_pool2d(x, 4)

    whole = local(images)
    tiled = tiled_map(local, images, tile=128, margin=32)
    assert tiled.shape == whole.shape and torch.equal(tiled, whole)


def _scaled(tile: int) -> Ensemble:
    torch.manual_seed(0)
    member = build_member("tiny", 2, decoder=True)
    config = EnsembleConfig(["a", "b"], ["tiny"], (96, 96), decoder_scale=4.0, decoder_tile=tile)
    return Ensemble([member], config)


def test_the_tiled_decoder_matches_the_whole_image_forward():
    large = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    whole, tiled = _scaled(1024), _scaled(256)
    assert whole.config.input_size == (384, 384)
    a, b = whole.predict(large, seed=0), tiled.predict(large, seed=0)
    # The classifier side never tiles: the same probabilities and CAMs, bit for bit.
    assert torch.equal(a.probs, b.probs) and torch.equal(a.cams[0], b.cams[0])
    da, db = a.decoder_maps[0], b.decoder_maps[0]
    assert da.shape == db.shape and da.shape[-1] > 96  # finer than the classifier
    # Tiles see 64 px of context on each side: the maps agree, and their masks too.
    assert (da - db).abs().mean() < 0.01, (da - db).abs().mean()
    assert ((da > da.median()) == (db > da.median())).float().mean() > 0.97
    # Below the tile size nothing changes.
    fits = dataclasses.replace(tiled.config, decoder_tile=384)
    tiled.config = fits
    assert torch.equal(tiled.predict(large, seed=0).decoder_maps[0], da)
