"""Interactive refinement: smart rectangles and keypoints re-segment with the project's model,
and the "review here" layer."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from backend.app import create_app
from backend.interactive import parse_prompt
from backend.rle import mask_to_rle, rle_to_mask
from backend.settings import Settings
from wsl_models import probe, refine
from wsl_models.ensemble import Ensemble
from wsl_models.masks import review_region
from wsl_models.synthetic import disk_image
from wsl_models.versions import ModelStore

from .images import png_data_uri

CONFIG = (Path(__file__).parents[1] / "label_config" / "interactive.xml").read_text()
SYNTH_CONFIG = CONFIG.replace('"finding"', '"lesion"')


def _disk(seed: int, size=(120, 160)) -> tuple[np.ndarray, np.ndarray]:
    return disk_image(np.random.default_rng(seed), size, 1)


def _two_disks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image with two separate disks: (image, left disk, right disk)."""
    rng = np.random.default_rng(2)
    img, _ = disk_image(rng, (100, 200), 0)  # textured background only
    yy, xx = np.mgrid[0:100, 0:200]
    left = (yy - 50) ** 2 + (xx - 50) ** 2 <= 18**2
    right = (yy - 50) ** 2 + (xx - 150) ** 2 <= 18**2
    out = img.astype(float)
    out[left | right] += np.array([90, 45, 12])
    return np.clip(out, 0, 255).astype(np.uint8), left, right


def _bridged() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two disks joined by a false bridge of another colour: (image, disks, bridge)."""
    img, left, right = _two_disks()
    bridge = np.zeros_like(left)
    bridge[44:57, 60:141] = True
    bridge &= ~(left | right)
    img = np.clip(img + np.where(bridge[..., None], [-40, 40, 60], 0), 0, 255).astype(np.uint8)
    return img, left | right, bridge


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------- the image math


def test_a_box_mask_stays_in_the_box_and_covers_the_disk():
    img, disk = _disk(0)
    ys, xs = np.nonzero(disk)
    box = (xs.min() - 12, ys.min() - 10, xs.max() + 12, ys.max() + 10)
    # A coarse map, as a CAM at 1/32 is: blurred far beyond the edge and off by 8 px.
    vague = ndimage.shift(ndimage.gaussian_filter(disk.astype(float), 10), (8, 8))
    vague /= vague.max()
    mask = refine.box_mask(img, vague, box)
    x0, y0, x1, y1 = refine.clip_box(box, disk.shape)
    outside = np.ones_like(mask)
    outside[y0:y1, x0:x1] = False
    assert not (mask & outside).any()
    iou = _iou(mask, disk)
    print(f"box IoU {iou:.2f}, the probability map's own {_iou(vague > 0.5, disk):.2f}")
    assert iou >= 0.7


def test_the_box_alone_finds_the_disk_without_a_map():
    img, disk = _disk(0)
    ys, xs = np.nonzero(disk)
    box = (xs.min() - 12, ys.min() - 10, xs.max() + 12, ys.max() + 10)
    mask = refine.box_mask(img, None, box)
    assert _iou(mask, disk) >= 0.7
    assert np.array_equal(refine.box_mask(img, None, box), mask)  # the same prompt, same answer


def test_a_box_over_a_blank_map_still_finds_the_object():
    """The model sees nothing (e.g. an unseen class), the box says an object is there."""
    img, disk = _disk(5)
    ys, xs = np.nonzero(disk)
    box = (xs.min() - 10, ys.min() - 10, xs.max() + 10, ys.max() + 10)
    mask = refine.box_mask(img, np.zeros(disk.shape), box)
    assert _iou(mask, disk) >= 0.6


def test_a_negative_click_removes_a_stray_component_whole():
    _, left, right = _two_disks()
    mask = left | right
    out = refine.apply_clicks(np.zeros((100, 200, 3), np.uint8), np.zeros((100, 200)), mask,
                              [(150, 50, False)])  # fmt: skip
    assert np.array_equal(out, left)
    # A negative click on background changes nothing.
    same = refine.apply_clicks(np.zeros((100, 200, 3), np.uint8), np.zeros((100, 200)), mask,
                               [(100, 90, False)])  # fmt: skip
    assert np.array_equal(same, mask)


def test_a_negative_click_on_a_large_blob_removes_only_the_part_around_it():
    """Two disks joined by a false bridge of another colour are one component (as a GlaS mask
    joins many glands): a click on the bridge cuts the bridge around it and leaves the disks."""
    img, _, bridge = _bridged()
    _, left, right = _two_disks()
    mask = left | right | bridge
    window = np.zeros_like(mask)
    window[25:76, 75:126] = True  # the click's window: a quarter of the shorter side each way
    for prob in (np.where(left | right, 0.95, 0.5), None):
        out = refine.apply_clicks(img, prob, mask, [(100, 50, False)])
        assert np.array_equal(out & ~window, mask & ~window)  # nothing changes outside it
        assert (out & left).sum() == left.sum() and (out & right).sum() == right.sum()
        left_over = (out & bridge & window).sum() / (bridge & window).sum()
        print(f"bridge left in the window: {left_over:.2f}")
        assert left_over <= 0.1
        assert not (out & ~mask).any()


def test_a_positive_click_on_a_missed_disk_adds_it():
    img, left, right = _two_disks()
    prob = np.where(left, 0.9, 0.1)  # the model found the left disk only
    out = refine.apply_clicks(img, prob, left.copy(), [(150, 50, True)])
    assert (out & left).sum() == left.sum()  # the left one stays
    added = out & ~left
    print(f"added disk IoU {_iou(added, right):.2f}")
    assert _iou(added, right) >= 0.6
    alone = refine.click_region(img, None, (150, 50))  # no map: the window alone
    assert _iou(alone, right) >= 0.6


def test_review_region_holds_disagreement_and_the_uncertain_band():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:1] = True
    score = np.zeros((4, 4))
    score[3, 3] = 0.5
    region = review_region([a, b], score, (0.3, 0.7))
    expected = a & ~b
    expected[3, 3] = True
    assert np.array_equal(region, expected)


# ---------------------------------------------------------------- through /predict


def _prompt(client, task, items, config=SYNTH_CONFIG):
    body = {"tasks": [task], "label_config": config, "project": "1.1",
            "params": {"context": {"result": items}}}  # fmt: skip
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    return r.get_json()["results"][0]


def _rect(x, y, w, h, label="lesion"):
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "original_width": 160, "original_height": 120,
            "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]}}  # fmt: skip


def _point(x, y, positive=True, label="lesion"):
    return {"type": "keypointlabels", "from_name": "point", "to_name": "image",
            "is_positive": positive, "original_width": 160, "original_height": 120,
            "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}  # fmt: skip


@pytest.fixture()
def client(model_dir):
    return create_app(Settings(model_dir=str(model_dir))).test_client()


@pytest.fixture()
def grabcut_client(model_dir):
    return create_app(Settings(model_dir=str(model_dir), keypoints="grabcut")).test_client()


@pytest.mark.parametrize("prior", ["box", "map"])
def test_a_smart_rectangle_answers_one_brush_region_inside_it(model_dir, prior):
    client = create_app(Settings(model_dir=str(model_dir), box_prior=prior)).test_client()
    img, disk = _disk(1)
    ys, xs = np.nonzero(disk)
    x0, y0, x1, y1 = xs.min() - 8, ys.min() - 8, xs.max() + 8, ys.max() + 8
    task = {"id": 1, "data": {"image": png_data_uri(img)}}
    rect = _rect(100 * x0 / 160, 100 * y0 / 120, 100 * (x1 - x0) / 160, 100 * (y1 - y0) / 120)
    pred = _prompt(client, task, [rect])
    (region,) = pred["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["lesion"]
    assert (region["original_width"], region["original_height"]) == (160, 120)
    mask = rle_to_mask(region["value"]["rle"], 120, 160)
    inside = np.zeros_like(mask)
    inside[max(y0 - 1, 0) : y1 + 2, max(x0 - 1, 0) : x1 + 2] = True
    assert mask.any() and not (mask & ~inside).any()
    print(f"rectangle on a disk ({prior} prior), IoU {_iou(mask, disk):.2f}")
    assert _iou(mask, disk) >= 0.7
    assert "uncertainty" not in pred and "acquisition" not in pred  # no ranking work


def test_grabcut_keypoints_edit_the_tasks_current_mask(grabcut_client):
    img, left, right = _two_disks()
    draft = {"result": [{"from_name": "mask", "to_name": "image", "type": "brushlabels",
                         "original_width": 200, "original_height": 100,
                         "value": {"format": "rle", "rle": mask_to_rle(left | right),
                                   "brushlabels": ["lesion"]}}],
             "created_at": "2026-12-01T10:00:00Z"}  # fmt: skip
    task = {"id": 2, "data": {"image": png_data_uri(img)}, "drafts": [draft], "predictions": []}
    pred = _prompt(grabcut_client, task, [_point(75, 50, positive=False)])  # on the right disk
    mask = rle_to_mask(pred["result"][0]["value"]["rle"], 100, 200)
    assert np.array_equal(mask, left)


def test_each_click_answer_applies_every_keypoint_so_far(grabcut_client):
    """Label Studio's UI sends, with each new smart keypoint, all smart keypoints of that label
    in the annotation (getConnectedDynamicRegions in its 1.23 frontend): the second answer
    holds both edits, on top of the same draft."""
    img, left, right = _two_disks()
    draft = {"result": [{"from_name": "mask", "to_name": "image", "type": "brushlabels",
                         "original_width": 200, "original_height": 100,
                         "value": {"format": "rle", "rle": mask_to_rle(left),
                                   "brushlabels": ["lesion"]}}]}  # fmt: skip
    task = {"id": 3, "data": {"image": png_data_uri(img)}, "drafts": [draft]}
    clicks = [_point(75, 50), _point(25, 50, positive=False)]  # add the right, drop the left
    first, second = (
        rle_to_mask(_prompt(grabcut_client, task, c)["result"][0]["value"]["rle"], 100, 200)
        for c in (clicks[:1], clicks)
    )
    assert (first & left).sum() == left.sum() and _iou(first & ~left, right) >= 0.6
    assert not (second & left).any() and _iou(second, right) >= 0.6
    assert np.array_equal(second, first & ~left)


def _draft(mask: np.ndarray) -> dict:
    return {"result": [{"from_name": "mask", "to_name": "image", "type": "brushlabels",
                        "original_width": 200, "original_height": 100,
                        "value": {"format": "rle", "rle": mask_to_rle(mask),
                                  "brushlabels": ["lesion"]}}]}  # fmt: skip


def test_keypoints_re_segment_by_the_feature_probe(client):
    """The default (KEYPOINTS=probe): the answer refits the probe on the draft and the clicks,
    so a click on the missed disk adds it, one on the false bridge drops the bridge."""
    img, left, right = _two_disks()
    task = {"id": 6, "data": {"image": png_data_uri(img)}, "drafts": [_draft(left)]}
    added = rle_to_mask(
        _prompt(client, task, [_point(75, 50)])["result"][0]["value"]["rle"], 100, 200
    )
    img, disks, bridge = _bridged()
    task = {"id": 7, "data": {"image": png_data_uri(img)}, "drafts": [_draft(disks | bridge)]}
    clicks = [_point(50, 50, positive=False)]  # on the bridge, between the disks
    cut = rle_to_mask(_prompt(client, task, clicks)["result"][0]["value"]["rle"], 100, 200)
    print(f"probe: disk added IoU {_iou(added, left | right):.2f}, "
          f"bridge left {(cut & bridge).sum() / bridge.sum():.2f}, disks IoU {_iou(cut, disks):.2f}")  # fmt: skip
    assert _iou(added, left | right) >= 0.6
    assert (cut & bridge).sum() <= 0.5 * bridge.sum() and _iou(cut, disks) >= 0.6


def test_smart_tools_run_the_ensemble_only_where_its_maps_are_used(model_dir, monkeypatch):
    """A rectangle (GrabCut in the box) and the probe's keypoints on the mask the annotator
    sees use no map, so they answer without the ensemble's forward (the probe's own features
    aside), with the same mask and no score; keypoints on a task with no mask start from the
    pre-annotation and a rectangle with BOX_PRIOR=map uses the map: one forward each, and
    the answer carries the ensemble's confidence."""
    forwards = []
    real = Ensemble.predict

    def counted(self, *args, **kwargs):
        forwards.append(len(args[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "predict", counted)
    img, left, right = _two_disks()
    uri = png_data_uri(img)
    clicks = [_point(75, 50)]
    rect = _rect(10, 10, 40, 80)

    def answer(client, task, items):
        before = len(forwards)
        pred = _prompt(client, task, items)
        (region,) = pred["result"]
        return pred, region, len(forwards) - before

    client = create_app(Settings(model_dir=str(model_dir))).test_client()
    on_draft = {"id": 8, "data": {"image": uri}, "drafts": [_draft(left)]}
    for task, items in ((on_draft, clicks), ({"id": 9, "data": {"image": uri}}, [rect])):
        pred, region, ran = answer(client, task, items)
        assert ran == 0 and "score" not in pred and "score" not in region
    # The probe's answer on the draft is the probe's re-fit of that draft after the click.
    ensemble = ModelStore(model_dir).load()
    pil = Image.fromarray(img)
    features = probe.image_features(ensemble.members[0], pil, ensemble.config.input_size)
    expected = probe.probe_clicks(features, left, parse_prompt({"result": clicks}, pil.size).clicks)
    pred, _, _ = answer(client, on_draft, clicks)
    assert np.array_equal(rle_to_mask(pred["result"][0]["value"]["rle"], 100, 200), expected)

    mapped = create_app(Settings(model_dir=str(model_dir), box_prior="map")).test_client()
    for app, task, items in ((client, {"id": 10, "data": {"image": uri}}, clicks),
                             (mapped, {"id": 11, "data": {"image": uri}}, [rect])):  # fmt: skip
        pred, region, ran = answer(app, task, items)
        assert ran == 1 and 0.5 <= pred["score"] <= 1.0 and region["score"] == pred["score"]


def test_an_unknown_keypoints_method_fails_the_start(model_dir):
    with pytest.raises(ValueError, match="KEYPOINTS"):
        create_app(Settings(model_dir=str(model_dir), keypoints="magic"))


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "empty"),
        ([{"type": "polygonlabels", "value": {}}], "unknown prompt type"),
        ([_rect(50, 50, 80, 10)], None),  # 50 + 80 > 100: clipped, still inside the image
        ([_rect(120, 10, 10, 10)], "outside the image"),
        ([_rect(10, 10, 0, 10)], "outside the image"),
        ([_point(-20, 10)], "outside the image"),
        ([_point("a", 10)], "must be a number"),
        (
            [{"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5}}],
            "names no label",
        ),
        ([_rect(10, 10, 20, 20, label="normal")], "not a BrushLabels label"),
        ([_rect(10, 10, 20, 20), _point(5, 5, label="other")], "one label per prompt"),
        (["not an object"], "must be an object"),
    ],
)
def test_malformed_prompts_get_a_clear_per_task_error(client, items, message):
    img, _ = _disk(3)
    task = {"id": 9, "data": {"image": png_data_uri(img)}}
    pred = _prompt(client, task, items)
    if message is None:
        assert pred["result"] and "error" not in pred
    else:
        assert message in pred["error"] and "task 9" in pred["error"]


def test_a_context_without_a_result_list_is_a_per_task_error(client):
    img, _ = _disk(3)
    body = {"tasks": [{"id": 4, "data": {"image": png_data_uri(img)}}], "label_config": SYNTH_CONFIG,
            "params": {"context": {"foo": 1}}}  # fmt: skip
    r = client.post("/predict", json=body)
    assert r.status_code == 200 and "no 'result' list" in r.get_json()["results"][0]["error"]


def test_review_layer_is_a_second_brush_region_when_switched_on(model_dir, synth_dir):
    image = synth_dir / "images" / "test_lesion_0.png"
    task = {"id": 1, "data": {"image": "data:image/png;base64,"
                              + base64.b64encode(image.read_bytes()).decode()}}  # fmt: skip
    body = {"tasks": [task], "label_config": SYNTH_CONFIG, "project": "1.1"}
    off = create_app(Settings(model_dir=str(model_dir))).test_client().post("/predict", json=body)
    assert all(r["value"].get("brushlabels") != ["Uncertain"]
               for r in off.get_json()["results"][0]["result"] if r["type"] == "brushlabels")  # fmt: skip
    on = create_app(Settings(model_dir=str(model_dir), review_label="Uncertain"))
    regions = on.test_client().post("/predict", json=body).get_json()["results"][0]["result"]
    brushes = {r["value"]["brushlabels"][0]: r for r in regions if r["type"] == "brushlabels"}
    assert set(brushes) == {"lesion", "Uncertain"}
    review = rle_to_mask(brushes["Uncertain"]["value"]["rle"], 96, 96)
    assert 0 < review.mean() < 0.5


def test_a_submitted_review_region_is_not_training_data(tmp_path):
    """An annotator who submits the pre-annotation as is also submits the "Uncertain" region:
    it must not become part of the human mask or make the image unlabelled."""
    from backend.annotations import collect_dataset
    from backend.fetch import ImageFetcher

    img, disk = _disk(6)
    review = np.zeros_like(disk)
    review[:10] = True
    brush = [
        {"from_name": "mask", "to_name": "image", "type": "brushlabels",
         "original_width": 160, "original_height": 120,
         "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": [name]}}
        for m, name in ((disk, "finding"), (review, "Uncertain"))
    ]  # fmt: skip
    task = {"id": 5, "data": {"image": png_data_uri(img)}, "annotations": [{"result": brush}]}
    counts = collect_dataset([task], CONFIG, ImageFetcher(Settings()), tmp_path,
                             review_label="Uncertain")  # fmt: skip
    assert counts["labelled"] == 1 and counts["masks"] == 1
    saved = np.asarray(Image.open(tmp_path / "masks" / "task_5.png")) > 0
    assert np.array_equal(saved, disk)
    assert "task_5.png,finding,train" in (tmp_path / "labels.csv").read_text()


def test_an_unknown_box_prior_fails_the_start(model_dir):
    with pytest.raises(ValueError, match="BOX_PRIOR"):
        create_app(Settings(model_dir=str(model_dir), box_prior="magic"))


def test_a_malformed_review_band_fails_the_start(model_dir):
    bad = Settings(model_dir=str(model_dir), review_label="Uncertain", review_band="0.7,0.3")
    with pytest.raises(ValueError, match="REVIEW_BAND"):
        create_app(bad)
