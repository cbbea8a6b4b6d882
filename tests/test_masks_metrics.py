import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from wsl_models.masks import (
    binarize,
    calibrate_threshold,
    intersect,
    otsu_threshold,
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
