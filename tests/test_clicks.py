"""Clicks as training data: point targets, the simulated annotator, keypoints submitted in
Label Studio, and a decoder trained from clicks alone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from backend.annotations import clicks_of, collect_dataset
from backend.fetch import ImageFetcher
from backend.settings import Settings
from wsl_models.clicks import (
    click_radius,
    click_target,
    clicks_in,
    load_points,
    save_points,
    simulated_clicks,
)
from wsl_models.data import load_dataset
from wsl_models.ensemble import EnsembleConfig
from wsl_models.evaluation import evaluate
from wsl_models.mask_training import click_affinity, segmentation_loss
from wsl_models.supervision import IGNORE
from wsl_models.synthetic import make_dataset
from wsl_models.training import TrainConfig, train_ensemble

from .images import png_data_uri

CONFIG = (Path(__file__).parents[1] / "label_config" / "clicks.xml").read_text()


def test_click_targets_are_disks_of_the_right_sign_and_ignore_the_rest():
    t = click_target([(10.0, 5.0, True), (30.0, 20.0, False)], (40, 50), radius=3)
    assert t[5, 10] == 1 and t[20, 30] == 0
    assert (t == 1).sum() == (t == 0).sum() == 29  # a radius-3 disk
    assert set(np.unique(t)) == {0, 1, IGNORE}
    with pytest.raises(ValueError, match="outside"):
        click_target([(50.0, 5.0, True)], (40, 50), 3)
    assert click_radius((522, 775)) == 5 and click_radius((64, 64)) == 2


def test_points_files_round_trip_and_resize_without_new_values(tmp_path):
    t = click_target([(40.0, 30.0, True), (10.0, 10.0, False)], (60, 80), radius=4)
    save_points(t, tmp_path / "p.png")
    assert np.array_equal(load_points(tmp_path / "p.png", (60, 80)), t)
    small = load_points(tmp_path / "p.png", (30, 40))
    assert set(np.unique(small)) <= {0, 1, IGNORE} and small[15, 20] == 1 and small[5, 5] == 0


def test_the_clicks_of_a_points_target_are_its_disks_centres():
    clicks = [(40.0, 30.0, True), (10.0, 10.0, False), (70.0, 50.0, False), (5.0, 50.0, True)]
    found = clicks_in(click_target(clicks, (60, 80), radius=4))
    assert sorted(found) == sorted(clicks)  # negatives first, each disk once
    assert [p for *_, p in found] == [False, False, True, True]
    # Two disks of one side that touch give one click between them.
    merged = clicks_in(click_target([(20.0, 20.0, True), (26.0, 20.0, True)], (60, 80), 4))
    assert merged == [(23.0, 20.0, True)]
    assert clicks_in(np.full((8, 8), IGNORE, np.uint8)) == []


def test_simulated_clicks_go_to_the_innermost_errors():
    truth = np.zeros((60, 80), bool)
    truth[10:40, 10:50] = True
    predicted = np.zeros_like(truth)
    predicted[10:40, 10:30] = True  # the right half of the object is missed
    predicted[45:55, 55:75] = True  # a false region below
    clicks = simulated_clicks(predicted, truth, 2, radius=2)
    pos = [(x, y) for x, y, p in clicks if p]
    neg = [(x, y) for x, y, p in clicks if not p]
    assert len(pos) == len(neg) == 2
    assert all(truth[int(y), int(x)] and not predicted[int(y), int(x)] for x, y in pos)
    assert all(predicted[int(y), int(x)] and not truth[int(y), int(x)] for x, y in neg)
    # The first positive click is deep inside the missed part, not on its edge.
    x, y = pos[0]
    assert 34 <= x <= 46 and 19 <= y <= 31
    # Nothing wrong: clicks still land inside the object and the background.
    perfect = simulated_clicks(truth, truth, 3, radius=2)
    assert all(truth[int(y), int(x)] == p for x, y, p in perfect) and len(perfect) == 6


def test_spread_clicks_cover_the_error_regions_instead_of_piling_into_the_largest():
    truth = np.zeros((80, 120), bool)
    truth[10:50, 10:50] = True  # a large missed object
    truth[60:75, 70:85] = True  # and a small one
    predicted = np.zeros_like(truth)
    piled = [(x, y) for x, y, p in simulated_clicks(predicted, truth, 2, radius=2) if p]
    spread = [(x, y) for x, y, p in simulated_clicks(predicted, truth, 2, 2, spread=True) if p]
    assert all(10 <= x < 50 and 10 <= y < 50 for x, y in piled)  # both in the large object
    assert 10 <= spread[0][0] < 50 and 10 <= spread[0][1] < 50  # the first as before
    assert 70 <= spread[1][0] < 85 and 60 <= spread[1][1] < 75  # the second in the small one


def test_interactive_clicks_alternate_and_follow_the_re_segmented_mask():
    truth = np.zeros((80, 120), bool)
    truth[10:50, 10:50] = True
    truth[60:75, 70:85] = True
    truth[5:20, 90:110] = True
    comps, _ = ndimage.label(truth)
    seen = []

    def add_component(mask, click):  # a perfect smart tool: the clicked object, whole
        x, y, positive = click
        seen.append(mask.copy())
        part = comps == comps[int(y), int(x)]
        return mask | part if positive else mask & ~part

    clicks = simulated_clicks(np.zeros_like(truth), truth, 3, 2, update=add_component)
    assert [p for _, _, p in clicks] == [True, False] * 3
    pos = [(int(x), int(y)) for x, y, p in clicks if p]
    # Each positive click goes to an object the tool has not added yet, largest first.
    assert [comps[y, x] for x, y in pos] == [comps[30, 30], comps[12, 100], comps[67, 77]]
    assert len(seen) == 6 and not seen[0].any() and seen[-1].sum() == truth.sum()
    # No error left on the negative side: those clicks go deep into the background, apart.
    neg = [(x, y) for x, y, p in clicks if not p]
    assert all(not truth[int(y), int(x)] for x, y in neg) and len(set(neg)) == 3


def test_sparse_targets_get_no_dice_term():
    logits = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.full((2, 16, 16), IGNORE, dtype=torch.uint8)
    target[:, 4:6, 4:6] = 1
    target[:, 10:12, 10:12] = 0
    bce_only = segmentation_loss(logits, target, 0.0)
    assert torch.allclose(segmentation_loss(logits, target, 1.0, torch.tensor([False, False])),
                          bce_only)  # fmt: skip
    assert segmentation_loss(logits, target, 1.0) > bce_only


def test_submitted_keypoints_become_a_points_file(tmp_path):
    img = np.full((100, 200, 3), 128, np.uint8)
    points = [
        {"from_name": "point", "to_name": "image", "type": "keypointlabels",
         "value": {"x": 25.0, "y": 50.0, "width": 1, "keypointlabels": ["finding"]}},
        {"from_name": "point", "to_name": "image", "type": "keypointlabels",
         "value": {"x": 75.0, "y": 20.0, "width": 1, "keypointlabels": ["background"]}},
        {"from_name": "point", "to_name": "image", "type": "keypointlabels", "is_positive": False,
         "value": {"x": 10.0, "y": 90.0, "width": 1, "keypointlabels": ["finding"]}},
        {"from_name": "point", "to_name": "image", "type": "keypointlabels",
         "value": {"x": 140.0, "y": 20.0, "keypointlabels": ["finding"]}},  # outside: dropped
    ]  # fmt: skip
    choice = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
              "value": {"choices": ["finding"]}}  # fmt: skip
    assert clicks_of(points, (200, 100)) == [(50.0, 50.0, True), (150.0, 20.0, False),
                                             (20.0, 90.0, False)]  # fmt: skip
    tasks = [
        {
            "id": 1,
            "data": {"image": png_data_uri(img)},
            "annotations": [{"result": [choice, *points]}],
        },
        {"id": 2, "data": {"image": png_data_uri(img)}, "annotations": [{"result": points[:1]}]},
    ]
    counts = collect_dataset(tasks, CONFIG, ImageFetcher(Settings()), tmp_path)
    assert counts["clicked"] == 2 and counts["masks"] == 0 and counts["skipped"] == 0
    saved = np.asarray(Image.open(tmp_path / "points" / "task_1.png"))
    assert saved.shape == (100, 200)
    assert saved[50, 50] == 1 and saved[20, 150] == 0 and saved[90, 20] == 0
    assert saved[0, 0] == IGNORE and not (tmp_path / "masks" / "task_1.png").exists()
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert [r["label"] for r in rows] == ["finding", ""]  # clicks alone: an unlabelled image
    loaded = {s.name: s for s in load_dataset(tmp_path).samples}
    assert loaded["task_1.png"].points is not None and loaded["task_1.png"].mask is None


def test_click_affinity_prefers_maps_that_follow_colour_edges():
    """Spreading clicks along colour: a map that changes where the image's colour changes
    costs less than one that cuts through a uniform region, and a uniform map costs ~0."""
    image = torch.zeros(1, 3, 32, 32)
    image[..., :, 16:] = 1.0  # two colours, left and right
    along = torch.full((1, 1, 8, 8), -6.0)
    along[..., :, 4:] = 6.0  # changes at the colour edge
    across = torch.full((1, 1, 8, 8), -6.0)
    across[..., 4:, :] = 6.0  # changes across each uniform half
    cfg = TrainConfig()
    assert click_affinity(along, image, cfg) < 0.25 * click_affinity(across, image, cfg)
    assert float(click_affinity(torch.full((1, 1, 8, 8), 6.0), image, cfg)) < 0.01


def test_clicks_alone_train_a_decoder_that_finds_the_disks(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 32, "test": 12}, (96, 96), 4)
    ds = load_dataset(root)
    # An annotator clicks 5 + 5 times on each lesion image of train (no masks given).
    (root / "points").mkdir()
    for s in ds.split("train"):
        if s.label != "lesion":
            continue
        truth = np.asarray(Image.open(s.mask)) > 0
        clicks = simulated_clicks(np.zeros_like(truth), truth, 5, 2)
        save_points(click_target(clicks, truth.shape, 2), root / "points" / s.name)
        s.mask.unlink()
    ds = load_dataset(root)
    cfg = EnsembleConfig(list(ds.classes), ["tiny"], (96, 96), mask_classes=["lesion"])
    tcfg = TrainConfig(
        epochs=12, lr=3e-3, decoder_epochs=10, weights="none", progress=False, train_masks=True,
        seg_steps_per_mask=4, seg_min_steps=40, seg_max_steps=60, seg_click_affinity_weight=1.0,
    )  # fmt: skip
    ens, metrics = train_ensemble(ds, cfg, tcfg)
    seg = metrics["segmentation"]
    assert seg["masks"] == 0 and seg["clicked"] > 0 and ens.config.decoder_scale == 2.0
    # Test masks were kept: the decoder trained on clicks finds the disks.
    row = evaluate(ens, ds, "test", progress=False)["by_source"]["decoder"]["0-tiny"]
    assert row["pxap"] > 60
