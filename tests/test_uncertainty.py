import math

import pytest
import torch

from wsl_models.members import build_member
from wsl_models.uncertainty import (
    bald,
    margin,
    mc_dropout_probs,
    member_disagreement,
    predictive_entropy,
    uncertainty_measure,
    variation_ratio,
)


@pytest.mark.parametrize("name", ["tiny", "efficientnet_b0"])
def test_head_only_mc_equals_full_network_passes(name):
    """Seed for seed, T head samples == T full passes with only dropout layers in train mode."""
    torch.manual_seed(1)
    member = build_member(name, 3, "none", dropout=0.4).eval()
    for m in member.modules():  # non-trivial activations (fresh BatchNorm can zero them)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.01, 0.1)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pooled = member.feature_map(x).mean(dim=(2, 3))
        fast = mc_dropout_probs(member, pooled, samples=7, seed=123)
        for m in member.modules():
            if isinstance(m, torch.nn.Dropout):
                m.train()
        torch.manual_seed(123)
        slow = torch.stack([torch.softmax(member(x), -1) for _ in range(7)])
    assert fast.shape == (7, 1, 3)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_an_images_samples_do_not_depend_on_its_batch():
    """One task predicted live and the same task ranked within a page get the same samples."""
    member = build_member("tiny", 2, "none", dropout=0.5).eval()
    pooled = torch.rand(4, 64)
    alone = mc_dropout_probs(member, pooled[2:3], samples=9, seed=4)
    batch = mc_dropout_probs(member, pooled, samples=9, seed=4)
    reordered = mc_dropout_probs(member, pooled.flip(0), samples=9, seed=4)
    assert torch.allclose(batch[:, 2:3], alone, atol=1e-6)
    assert torch.allclose(reordered[:, 1:2], alone, atol=1e-6)
    assert not torch.equal(alone[0], alone[1])  # the samples really differ


def test_mc_does_not_disturb_global_rng():
    member = build_member("tiny", 2, "none").eval()
    pooled = torch.rand(1, 64)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    mc_dropout_probs(member, pooled, samples=4, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_measures_on_known_samples():
    uniform = torch.full((5, 1, 4), 0.25)
    assert predictive_entropy(uniform).item() == pytest.approx(math.log(4))
    assert bald(uniform).item() == pytest.approx(0.0, abs=1e-6)  # no disagreement between samples
    # Confident but contradicting samples: high entropy AND high mutual information.
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]] * 2)
    assert bald(split).item() == pytest.approx(math.log(2), rel=1e-4)
    assert variation_ratio(split).item() == pytest.approx(0.5)
    assert margin(split).item() == pytest.approx(1.0)
    certain = torch.tensor([[[1.0, 0.0]]] * 4)
    assert predictive_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    assert variation_ratio(certain).item() == 0.0
    assert margin(certain).item() == pytest.approx(0.0)


def test_member_disagreement():
    member_probs = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.2, 0.8]]])
    assert member_disagreement(member_probs).item() == pytest.approx(1 / 3)


def test_unknown_measure():
    with pytest.raises(ValueError, match="known"):
        uncertainty_measure("vibes")
