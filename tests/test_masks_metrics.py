import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import expit, logit
from sklearn.metrics import average_precision_score

from wsl_models.masks import (
    PLUG_IN_GRID,
    binarize,
    calibrate_threshold,
    expected_dice,
    intersect,
    otsu_threshold,
    plug_in_threshold,
    remove_small_components,
)
from wsl_models.metrics import centred_gaussian, pxap, segmentation_scores


def _disc(h=64, w=64, r=14):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= r * r


def test_otsu_separates_bimodal_map():
    m = np.where(_disc(), 0.9, 0.1) + np.random.default_rng(0).normal(0, 0.02, (64, 64))
    m = np.clip(m, 0, 1)
    t = otsu_threshold(m)
    assert 0.1 < t < 0.9
    assert (binarize(m, "otsu") == _disc()).mean() > 0.995
    assert otsu_threshold(np.full((4, 4), 0.3)) == 1.0  # constant map: empty mask


def test_binarize_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        binarize(np.zeros((2, 2)), 1.5)
    with pytest.raises(ValueError):
        binarize(np.zeros((2, 2)), "median")


def test_intersect_and_small_components():
    a = np.zeros((10, 10), bool)
    a[2:8, 2:8] = True
    b = np.zeros((10, 10), bool)
    b[4:10, 4:10] = True
    assert intersect([a, b]).sum() == 16
    speck = a.copy()
    speck[0, 9] = True
    cleaned = remove_small_components(speck, min_area=4)
    assert cleaned[0, 9] == 0 and cleaned.sum() == 36
    with pytest.raises(ValueError):
        intersect([])


def test_calibrate_threshold_finds_the_separating_value():
    truth = _disc()
    m = np.where(truth, 0.7, 0.3)
    t, miou = calibrate_threshold([m], [truth])
    assert 0.3 <= t < 0.7
    assert miou == pytest.approx(1.0)


def test_pxap_perfect_constant_and_monotone_invariance():
    truth = _disc()
    f = truth.mean()
    assert pxap([truth.astype(float)], [truth]) == pytest.approx(100.0)
    assert pxap([np.full(truth.shape, 0.5)], [truth]) == pytest.approx(100 * f, abs=1e-6)
    rng = np.random.default_rng(0)
    m = np.clip(truth * 0.4 + rng.uniform(0, 0.6, truth.shape), 0, 1)
    assert pxap([m], [truth]) == pytest.approx(pxap([m**2], [truth]), abs=1.0)


def test_pxap_matches_sklearn_on_pooled_pixels():
    rng = np.random.default_rng(1)
    maps, truths = [], []
    for _ in range(4):
        t = _disc(r=int(rng.integers(6, 20)))
        maps.append(np.clip(t * 0.3 + rng.uniform(0, 0.7, t.shape), 0, 1))
        truths.append(t)
    ours = pxap(maps, truths)
    ref = 100 * average_precision_score(
        np.concatenate([t.ravel() for t in truths]), np.concatenate([m.ravel() for m in maps])
    )
    assert ours == pytest.approx(ref, abs=0.2)


def test_dice_iou_of_all_ones_and_background():
    truth = _disc()
    f = truth.mean()
    s = segmentation_scores(np.ones_like(truth), truth)
    assert s["dice_fg"] == pytest.approx(2 * f / (1 + f))
    assert s["iou_fg"] == pytest.approx(f)
    assert s["dice_bg"] == 0.0
    perfect = segmentation_scores(truth, truth)
    assert perfect["dice_fg"] == perfect["dice_bg"] == perfect["miou"] == 1.0
    empty = segmentation_scores(np.zeros((4, 4)), np.zeros((4, 4)))
    assert empty["dice_fg"] == 1.0


def test_centred_gaussian():
    g = centred_gaussian(31, 41)
    assert g.shape == (31, 41)
    assert g[15, 20] == pytest.approx(1.0)
    assert g[0, 0] < 0.1


def _soft_disks(rng: np.random.Generator, n: int = 24, size: int = 64) -> np.ndarray:
    """Maps of a large object with uncertain edges: each pixel's chance of being inside."""
    yy, xx = np.mgrid[:size, :size]
    maps = []
    for _ in range(n):
        cy, cx = rng.uniform(20, 44, 2)
        r = rng.uniform(14, 22)
        maps.append(expit((r - np.hypot(yy - cy, xx - cx)) / 4.0))
    return np.stack(maps)


def test_the_plug_in_threshold_is_what_calibrated_maps_score_best_at():
    """Truths drawn from calibrated maps: the plug-in threshold scores (nearly) the best Dice
    of any threshold, below one half (Dice takes in the uncertain edge), and beats cutting the
    maps where their masks cover no more than their mass (the seed-area rule)."""
    rng = np.random.default_rng(0)
    maps = _soft_disks(rng)
    truths = rng.random(maps.shape) < maps  # calibrated by construction
    t = plug_in_threshold(maps)
    assert 0.05 < t < 0.5
    assert expected_dice(maps, t) == pytest.approx(
        max(expected_dice(maps, q) for q in PLUG_IN_GRID)
    )

    def dice(q: float) -> float:
        return float(
            np.mean(
                [
                    segmentation_scores(m > q, y)["dice_fg"]
                    for m, y in zip(maps, truths, strict=True)
                ]
            )
        )

    grid = np.round(np.arange(0.02, 0.99, 0.01), 2)
    assert dice(t) >= max(dice(q) for q in grid) - 0.01
    mass = maps.mean()
    by_area = next(q for q in grid if (maps > q).mean() <= mass)
    assert t < by_area and dice(t) > dice(by_area)


@pytest.mark.parametrize("shift", [-2.0, 0.7, 3.0])
def test_the_plug_in_threshold_follows_a_shift_of_the_maps_logits(shift):
    """Shifted to a given mass first, the maps' own scale does not matter: maps whose logits
    are shifted by b get the threshold shifted by b."""
    maps = _soft_disks(np.random.default_rng(1), n=8)
    t = plug_in_threshold(maps, mass=0.3)
    moved = plug_in_threshold(expit(logit(maps) + shift), mass=0.3)
    assert logit(moved) == pytest.approx(logit(t) + shift, abs=1e-4)
    assert plug_in_threshold(maps, mass=0.6) < t  # a larger object: a lower cut


@settings(max_examples=60, deadline=None)
@given(
    maps=arrays(np.float64, (2, 6, 6), elements=st.floats(0, 1)),
    mass=st.one_of(st.none(), st.floats(0, 1)),
)
def test_the_plug_in_threshold_is_a_value_in_the_unit_interval_for_any_maps(maps, mass):
    """Constant, saturated or empty maps and a seed mass of exactly 0 or 1 (degenerate seeds)
    still give a threshold: never an error, never NaN."""
    t = plug_in_threshold(maps, mass)
    assert 0.0 <= t <= 1.0
