"""Acquisition functions, scores for Label Studio, batch diversity, and the promotion rule."""

import math

import numpy as np
import pytest
import torch

from wsl_models.acquisition import (
    ACQUISITIONS,
    acquisition,
    bald,
    diverse_order,
    entropy,
    margin,
    random,
    score_from_value,
)
from wsl_models.promotion import Tolerance, promote
from wsl_models.uncertainty import bald as raw_bald
from wsl_models.uncertainty import predictive_entropy


def _samples(seed: int, t: int = 20, b: int = 50, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, b, c, generator=g) * torch.rand(1, b, 1, generator=g) * 4
    return torch.softmax(logits, -1)


def test_values_are_normalised_by_the_class_count_not_the_batch():
    probs = _samples(0)
    for name in ("entropy", "bald", "margin"):
        v = acquisition(name)(probs)
        assert v.shape == (50,) and float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        # The same image gets the same value whatever else is in the batch.
        assert torch.allclose(acquisition(name)(probs[:, 7:8]), v[7:8])
    assert torch.allclose(entropy(probs), predictive_entropy(probs) / math.log(3))
    assert torch.allclose(bald(probs), raw_bald(probs) / math.log(3))
    uniform = torch.full((4, 1, 3), 1 / 3)
    assert entropy(uniform).item() == pytest.approx(1.0)
    assert margin(uniform).item() == pytest.approx(1.0)
    certain = torch.tensor([[[1.0, 0.0, 0.0]]] * 4)
    assert entropy(certain).item() == pytest.approx(0.0, abs=1e-6)


def test_scores_put_the_most_informative_first_in_label_studio_order():
    values = entropy(_samples(1))
    scores = [score_from_value(v) for v in values]
    # Label Studio serves ascending score; that must be descending acquisition value.
    assert (
        np.argsort(scores, kind="stable").tolist()
        == np.argsort(-values.numpy(), kind="stable").tolist()
    )


def test_random_is_reproducible_with_a_generator_and_uniform():
    probs = _samples(2, b=2000)
    a = random(probs, generator=torch.Generator().manual_seed(3))
    b = random(probs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 0.45 < float(a.mean()) < 0.55
    assert set(ACQUISITIONS) == {"entropy", "bald", "margin", "random"}
    with pytest.raises(ValueError, match="known: entropy"):
        acquisition("vibes")


def test_diverse_order_skips_near_duplicates():
    values = np.array([0.90, 0.89, 0.88, 0.60, 0.10])
    same = np.array([1.0, 0.0])
    emb = np.stack([same, same * 2, same + [0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    assert diverse_order(values, emb, 3, weight=0.0) == [0, 1, 2]  # pure uncertainty
    picked = diverse_order(values, emb, 3, weight=0.5)
    assert picked[0] == 0 and picked[1] == 3  # the next duplicate of 0 is skipped
    assert len(set(picked)) == 3
    assert diverse_order(values, emb, 10) and len(diverse_order(values, emb, 10)) == 5
    assert diverse_order(values, emb, 0) == []


def test_promotion_refuses_a_worse_version_and_says_why():
    old = {"images": 10, "accuracy": 90.0, "dice_fg": 70.0, "pxap": 65.0}
    ok, reason = promote({**old, "dice_fg": 69.0}, old, Tolerance(dice_fg=2.0))
    assert ok, reason
    ok, reason = promote({**old, "dice_fg": 60.0}, old)
    assert not ok and "dice_fg 60.0 < 70.0" in reason
    ok, reason = promote({**old, "accuracy": 70.0, "pxap": 80.0}, old)
    assert not ok and "accuracy" in reason and "pxap" not in reason
    assert promote(old, {"images": 0})[0]  # nothing to compare with: the first version wins
    # Without masks on the hold-out only accuracy decides.
    assert promote({"images": 5, "accuracy": 100.0}, old)[0]


def _held_out(right: int, n: int) -> dict:
    return {"images": n, "accuracy": 100.0 * right / n}


def test_promotion_lets_one_held_out_image_flip_but_never_adds_such_losses_up():
    """On a hold-out of 7 one image is 14 points: a version that flips one is not refused
    (2 points would refuse any flip), two are; and against the line's first version the same
    allowance holds, so a line cannot lose one image per job for ever."""
    assert promote(_held_out(6, 7), _held_out(7, 7))[0]
    ok, reason = promote(_held_out(5, 7), _held_out(7, 7))
    assert not ok and "accuracy 71.4 < 100.0 - 14.3" in reason
    assert not promote(_held_out(6, 7), _held_out(7, 7), Tolerance(images=0))[0]  # points only
    # The next job: one image below the current version is two below the line's first.
    ok, reason = promote(_held_out(5, 7), _held_out(6, 7), first=_held_out(7, 7))
    assert not ok and "worse than the line's first version" in reason
    ok, reason = promote(_held_out(6, 7), _held_out(6, 7), first=_held_out(7, 7))
    assert ok and "nor than the line's first" in reason
    # A large hold-out: the points decide (2 points are 4 of 200 images).
    assert promote(_held_out(196, 200), _held_out(200, 200))[0]
    assert not promote(_held_out(195, 200), _held_out(200, 200))[0]
    # Dice and PxAP keep their points whatever the hold-out's size.
    masks = {"images": 7, "accuracy": 100.0, "dice_fg": 70.0, "pxap": 70.0}
    assert not promote({**masks, "dice_fg": 67.0}, masks)[0]
