"""Smart keypoints by a feature probe: a click teaches its kind of tissue everywhere in the
image, the mask shown holds where no click disagrees, and a small finding survives."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from backend.inference import InferenceEngine
from wsl_models import probe
from wsl_models.members import build_member

H, W = 80, 160  # the mask's pixels; the features' grid is a quarter of that


def _features(kinds: np.ndarray) -> np.ndarray:
    """(C, h, w) one-hot features of a (h, w) map of tissue kinds, with a little noise."""
    rng = np.random.default_rng(0)
    f = np.eye(kinds.max() + 1)[kinds].transpose(2, 0, 1) + 0.05 * rng.random(
        (kinds.max() + 1, *kinds.shape)
    )
    return (f / np.linalg.norm(f, axis=0, keepdims=True)).astype(np.float32)


def _up(cells: np.ndarray) -> np.ndarray:
    return np.kron(cells, np.ones((4, 4), int)).astype(bool)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinds on a 20x40 grid: 0 background, 1 object (a left and a right blob), 2 a patch of
    background that looks like neither. Returns (kinds, left blob, right blob) in cells."""
    kinds = np.zeros((20, 40), int)
    left, right = np.zeros_like(kinds, bool), np.zeros_like(kinds, bool)
    left[5:15, 4:14] = True
    right[5:15, 26:36] = True
    kinds[left | right] = 1
    kinds[1:4, 16:24] = 2
    return kinds, left, right


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_a_positive_click_adds_every_region_of_its_kind():
    kinds, left, right = _scene()
    feats = _features(kinds)
    shown = _up(left)  # the model found the left blob only
    out = probe.probe_clicks(feats, shown, [(31 * 4.0, 10 * 4.0, True)])  # on the right blob
    assert _iou(out, _up(left | right)) >= 0.9


def test_a_negative_click_removes_its_kind_and_keeps_the_rest():
    kinds, left, right = _scene()
    feats = _features(kinds)
    patch = _up(kinds == 2)
    shown = _up(left | right) | patch  # a false patch the model took for the object
    out = probe.probe_clicks(feats, shown, [(20 * 4.0, 2 * 4.0, False)])
    assert not (out & patch).any()
    assert _iou(out, _up(left | right)) >= 0.9


def test_a_small_finding_survives_a_click_elsewhere():
    """Each side of the mask shown weighs half the prior: a finding of 4 of 800 cells would
    otherwise weigh next to nothing against the click and vanish with the false region."""
    kinds = np.zeros((20, 40), int)
    kinds[9:11, 9:11] = 1  # the finding, found
    false = np.zeros_like(kinds, bool)
    false[2:4, 30:32] = True  # background the model took for the object
    shown = _up((kinds == 1) | false)
    out = probe.probe_clicks(_features(kinds), shown, [(31 * 4.0, 3 * 4.0, False)])
    finding = _up(kinds == 1)
    assert out[finding].mean() >= 0.5 and out[40, 40]  # its edge blurs on the coarse grid
    assert not out[_up(false)].any()


def test_without_two_sides_only_the_clicks_disks_change():
    feats = _features(_scene()[0])
    empty = np.zeros((H, W), bool)
    assert np.array_equal(probe.probe_clicks(feats, empty, []), empty)
    # An empty mask and only negative clicks: nothing to tell apart, nothing to remove.
    assert not probe.probe_clicks(feats, empty, [(10.0, 10.0, False)]).any()
    # The same with a positive click: its disk (1 % of the shorter side, at least 2 px).
    out = probe.probe_clicks(feats, empty, [(100.0, 40.0, True)])
    assert out[40, 100] and out.sum() == (np.hypot(*np.ogrid[-2:3, -2:3]) <= 2).sum()


def test_click_features_are_unit_vectors_on_the_stride_16_grid():
    member = build_member("tiny", 2, decoder=True)
    x = torch.rand(1, 3, 64, 128)
    feats = probe.click_features(member, x)
    _, taps = member.features_and_taps(x)
    assert feats.shape == (taps[-2].shape[1] + taps[-1].shape[1], *taps[-2].shape[-2:])
    assert np.allclose(np.linalg.norm(feats, axis=0), 1.0, atol=1e-5)
    assert np.array_equal(feats, probe.click_features(member, x))  # the same answer again


def test_engine_call_runs_on_the_inference_thread_and_returns_errors():
    engine = InferenceEngine()
    try:
        assert engine.call(lambda: threading.current_thread().name) == "camlabel-infer"
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0)
        assert engine.call(lambda: 42) == 42  # the thread lives on
    finally:
        engine.close()
