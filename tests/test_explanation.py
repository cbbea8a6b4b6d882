"""Explanation layers (what each agreeing member saw) and the reasons a task is flagged."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from backend.annotations import collect_dataset
from backend.app import create_app
from backend.explain import layer_label
from backend.fetch import ImageFetcher
from backend.label_config import parse_label_config
from backend.rle import mask_to_rle, rle_to_mask
from backend.settings import Settings
from wsl_models.ensemble import EnsembleOutput, ImageMasks
from wsl_models.explanation import CONSENSUS, explanation_layers, flag_reasons, nested_levels
from wsl_models.synthetic import disk_image
from wsl_models.versions import ModelStore

from .images import png_data_uri

CONFIGS = Path(__file__).parents[1] / "label_config"
EXPLAIN = (CONFIGS / "explain.xml").read_text()
PLAIN = (CONFIGS / "finding_normal.xml").read_text()
# The test model's classes are lesion / normal.
SYNTH_EXPLAIN = EXPLAIN.replace('"finding"', '"lesion"')
SYNTH_PLAIN = PLAIN.replace('"finding"', '"lesion"')


def _smooth_map(seed: int, shape=(60, 80)) -> np.ndarray:
    noise = np.random.default_rng(seed).random(shape)
    m = ndimage.gaussian_filter(noise, 6)
    return (m - m.min()) / (m.max() - m.min())


# ---------------------------------------------------------------- the math


@pytest.mark.parametrize("seed", range(5))
def test_levels_are_nested_lowest_first(seed):
    prob = _smooth_map(seed)
    levels = nested_levels(prob, (0.75, 0.25, 0.5))  # any order in, lowest first out
    assert [t for t, _ in levels] == [0.25, 0.5, 0.75]
    for (_, below), (_, above) in zip(levels, levels[1:], strict=False):
        assert not (above & ~below).any()  # each region inside the one below
        assert above.sum() < below.sum()
    assert np.array_equal(levels[1][1], prob >= 0.5)


def test_an_empty_level_is_left_out():
    prob = _smooth_map(0) * 0.6  # never reaches 0.75
    assert [t for t, _ in nested_levels(prob, (0.25, 0.5, 0.75))] == [0.25, 0.5]


def _image_masks(agreeing: list[str], wanted: bool = True) -> ImageMasks:
    maps = {n: _smooth_map(i) for i, n in enumerate(("0-a", "1-b", "2-c"))}
    chosen = np.stack([maps[n] for n in agreeing]) if agreeing else np.stack(list(maps.values()))
    return ImageMasks(0, agreeing, maps, chosen.min(0), chosen.mean(0), {}, None, wanted)


def test_only_agreeing_members_and_the_consensus_get_layers():
    masks = _image_masks(["0-a", "2-c"])
    layers = explanation_layers(masks, (0.25, 0.5), style="fill")
    assert {layer.source for layer in layers} == {"0-a", "2-c", CONSENSUS}
    for layer in layers:
        source = (
            masks.intersection_map if layer.source == CONSENSUS else masks.member_maps[layer.source]
        )
        assert np.array_equal(layer.mask, source >= layer.level)
    consensus = [layer for layer in layers if layer.source == CONSENSUS and layer.level == 0.5]
    member = [layer for layer in layers if layer.source == "0-a" and layer.level == 0.5]
    assert not (consensus[0].mask & ~member[0].mask).any()  # the overlap is inside each member


def test_outlines_are_each_levels_contour():
    masks = _image_masks(["0-a", "1-b"])
    filled = explanation_layers(masks, (0.25, 0.5, 0.75), style="fill")
    lines = explanation_layers(masks, (0.25, 0.5, 0.75))  # the default style
    assert [(f.source, f.level) for f in filled] == [(o.source, o.level) for o in lines]
    for f, o in zip(filled, lines, strict=True):
        assert o.mask.any() and not (o.mask & ~f.mask).any()  # on the region's own pixels
        assert o.mask.sum() < f.mask.sum() / 2 or f.mask.sum() < 200  # a line, not the area
        # Every outline pixel touches the outside of its region (4-neighbourhood, edge = out).
        outside = np.pad(~f.mask, 1, constant_values=True)
        touches = outside[:-2, 1:-1] | outside[2:, 1:-1] | outside[1:-1, :-2] | outside[1:-1, 2:]
        assert not (o.mask & ~touches).any()  # width 1 here: 60x80 maps
    with pytest.raises(ValueError, match="style"):
        explanation_layers(masks, style="heatmap")


def test_a_class_without_masks_or_agreement_gets_no_layers():
    assert explanation_layers(_image_masks(["0-a"], wanted=False)) == []
    assert explanation_layers(_image_masks([])) == []


def test_layer_labels_by_key_architecture_then_position():
    members = ["0-resnet50", "1-densenet121", "2-tiny", "3-tiny"]
    labels = ("model 1", "DenseNet121", "model 3", "model 4", "Consensus", "2-tiny")
    assert layer_label("0-resnet50", members, labels) == "model 1"
    assert layer_label("1-densenet121", members, labels) == "DenseNet121"
    assert layer_label("2-tiny", members, labels) == "2-tiny"  # its own key first
    assert layer_label("3-tiny", members, labels) == "model 4"  # "tiny" is not unique
    assert layer_label(CONSENSUS, members, labels) == "Consensus"
    assert layer_label("0-resnet50", members, ("consensus",)) is None


def _output(member_probs: list[list[float]], entropy: float) -> EnsembleOutput:
    mc = torch.tensor(member_probs)[:, None, None, :]  # (M, T=1, B=1, C)
    probs = mc.mean(dim=(0, 1))
    label = probs.argmax(-1)
    agree = mc.mean(1).argmax(-1) == label[None]
    unc = {"entropy": torch.tensor([entropy])}
    return EnsembleOutput(["0-a", "1-b", "2-c"], mc, [], probs, label, agree, unc,
                          torch.tensor([False]))  # fmt: skip


def test_flag_reasons_name_the_disagreement_and_who_said_what():
    out = _output([[0.9, 0.1], [0.3, 0.7], [0.45, 0.55]], entropy=0.2)
    (reason,) = flag_reasons(out, 0, ["finding", "normal"], "entropy", None)
    assert "disagree" in reason
    assert "0-a: finding 0.90" in reason and "1-b: normal 0.70" in reason
    assert "2-c: normal 0.55" in reason


def test_flag_reasons_name_the_threshold_and_nothing_when_all_is_well():
    agreed = _output([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]], entropy=0.62)
    (reason,) = flag_reasons(agreed, 0, ["finding", "normal"], "entropy", 0.5)
    assert reason == "entropy 0.62 is above the calibrated review threshold 0.50"
    assert flag_reasons(agreed, 0, ["finding", "normal"], "entropy", 0.7) == []
    assert flag_reasons(agreed, 0, ["finding", "normal"], "entropy", None) == []


# ---------------------------------------------------------------- the backend


def test_the_explanation_control_is_not_the_annotation_brush():
    schema = parse_label_config(EXPLAIN)
    assert schema.brush_name == "mask" and schema.brush_labels == ("finding",)
    assert schema.explanation_name == "explanation"
    assert schema.explanation_labels == ("model 1", "model 2", "model 3", "consensus")
    explanation_first = """<View><Image name="image" value="$image"/>
      <BrushLabels name="explanation" toName="image"><Label value="model 1"/></BrushLabels>
      <BrushLabels name="outline" toName="image"><Label value="gland"/></BrushLabels></View>"""
    schema = parse_label_config(explanation_first)
    assert (schema.brush_name, schema.explanation_name) == ("outline", "explanation")
    assert parse_label_config(PLAIN).explanation_name is None


def _task(path: Path, size: tuple[int, int] | None = None, task_id: int = 1) -> dict:
    image = Image.open(path).convert("RGB")
    if size:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"id": task_id, "data": {"image": uri}}


def _predict(model_dir: Path, tasks: list[dict], config: str, **settings) -> list[dict]:
    app = create_app(Settings(model_dir=str(model_dir), **settings))
    body = {"tasks": tasks, "label_config": config, "project": "1.1"}
    r = app.test_client().post("/predict", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["results"]


def _without_ids(result: dict) -> dict:
    return {
        **result,
        "result": [{k: v for k, v in r.items() if k != "id"} for r in result["result"]],
    }


def test_explanation_regions_at_the_displayed_size_one_set_per_agreeing_member(
    model_dir, synth_dir
):
    tasks = [_task(synth_dir / "images" / f"test_lesion_{i}.png", (150, 110), i) for i in range(2)]
    levels = {"explain_style": "fill", "explain_levels": "0.25,0.5,0.75"}
    for result in _predict(model_dir, tasks, SYNTH_EXPLAIN, **levels):
        regions = [r for r in result["result"] if r["from_name"] == "explanation"]
        assert regions, "a lesion image gets explanation layers"
        note = next(r for r in result["result"] if r["from_name"] != "explanation")
        note = note["meta"]["text"][0]
        agreeing = int(note.split(" models agree")[0].rsplit(" ", 1)[1].split("/")[0])
        by_label: dict[str, list[np.ndarray]] = {}
        for r in regions:
            assert (r["original_width"], r["original_height"]) == (150, 110)
            (label,) = r["value"]["brushlabels"]
            by_label.setdefault(label, []).append(rle_to_mask(r["value"]["rle"], 110, 150))
            assert "explanation" in r["meta"]["text"][0]
        members = set(by_label) - {"consensus"}
        assert len(members) == agreeing and members <= {"model 1", "model 2"}
        assert "consensus" in by_label
        for stack in by_label.values():  # each set nested, lowest level first
            for below, above in zip(stack, stack[1:], strict=False):
                assert not (above & ~below).any()
        for label in members:  # the overlap lies inside each agreeing member's lowest level
            assert not (by_label["consensus"][0] & ~by_label[label][0]).any()
        # The annotation brush is untouched: the same region as without the control.
        assert [
            r["value"]["brushlabels"] for r in result["result"] if r["from_name"] == "mask"
        ] == [["lesion"]]


def test_a_config_without_the_control_predicts_exactly_as_before(model_dir, synth_dir):
    tasks = [_task(synth_dir / "images" / name, (130, 100), i) for i, name in
             enumerate(["test_lesion_0.png", "test_normal_0.png"])]  # fmt: skip
    plain = _predict(model_dir, tasks, SYNTH_PLAIN)
    explained = _predict(model_dir, tasks, SYNTH_EXPLAIN)
    assert all(r["from_name"] != "explanation" for p in plain for r in p["result"])
    stripped = [
        {**p, "result": [r for r in p["result"] if r["from_name"] != "explanation"]}
        for p in explained
    ]
    assert [_without_ids(p) for p in stripped] == [_without_ids(p) for p in plain]


def test_a_malformed_explain_levels_fails_the_start(model_dir):
    with pytest.raises(ValueError, match="EXPLAIN_LEVELS"):
        create_app(Settings(model_dir=str(model_dir), explain_levels="0.5,high"))
    with pytest.raises(ValueError, match="EXPLAIN_LEVELS"):
        create_app(Settings(model_dir=str(model_dir), explain_levels="0,0.5"))
    with pytest.raises(ValueError, match="EXPLAIN_STYLE"):
        create_app(Settings(model_dir=str(model_dir), explain_style="heatmap"))


def test_outlined_layers_are_lines_on_the_filled_regions(model_dir, synth_dir):
    tasks = [_task(synth_dir / "images" / "test_lesion_1.png", (150, 110))]
    levels = "0.25,0.5,0.75"
    (filled,) = _predict(
        model_dir, tasks, SYNTH_EXPLAIN, explain_style="fill", explain_levels=levels
    )
    (lines,) = _predict(model_dir, tasks, SYNTH_EXPLAIN, explain_levels=levels)  # outline

    def layers(result):
        return [(r["value"]["brushlabels"][0], rle_to_mask(r["value"]["rle"], 110, 150))
                for r in result["result"] if r["from_name"] == "explanation"]  # fmt: skip

    pairs = list(zip(layers(filled), layers(lines), strict=True))
    assert pairs
    for (label_f, f), (label_o, o) in pairs:
        assert label_f == label_o and o.any() and not (o & ~f).any()
        assert o.sum() < f.sum()


def test_a_flagged_task_says_why(model_dir, synth_dir, tmp_path):
    """A calibrated threshold below every image's entropy flags them all; the note says so."""
    store = ModelStore(model_dir)
    ensemble = store.load()
    ensemble.config.review_threshold = 0.0
    ModelStore(tmp_path).save(ensemble, store.manifest(store.current_id())["metrics"])
    (result,) = _predict(
        tmp_path, [_task(synth_dir / "images" / "test_lesion_0.png")], SYNTH_EXPLAIN
    )
    assert result["flagged"]
    note = next(r for r in result["result"] if r["from_name"] != "explanation")["meta"]["text"][0]
    assert "please review (entropy" in note and "above the calibrated review threshold 0.00" in note


def test_a_submitted_annotation_with_explanation_regions_collects_as_one_without(tmp_path):
    img, disk = disk_image(np.random.default_rng(7), (90, 120), 1)
    mask = {"from_name": "mask", "to_name": "image", "type": "brushlabels",
            "original_width": 120, "original_height": 90,
            "value": {"format": "rle", "rle": mask_to_rle(disk), "brushlabels": ["finding"]}}  # fmt: skip
    choice = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
              "value": {"choices": ["finding"]}}  # fmt: skip
    layers = [
        {**mask, "from_name": "explanation",
         "value": {"format": "rle", "rle": mask_to_rle(np.ones_like(disk)), "brushlabels": [lab]}}
        for lab in ("model 1", "model 2", "consensus")
    ]  # fmt: skip
    fetcher = ImageFetcher(Settings())
    for name, results in (("plain", [mask]), ("explained", [mask, *layers]),
                          ("brush only", [mask, *layers]), ("choice", [choice, *layers])):  # fmt: skip
        if name == "brush only":  # the image label comes from the one annotation brush label
            results = [r for r in results if r["from_name"] != "diagnosis"]
        task = {"id": 3, "data": {"image": png_data_uri(img)}, "annotations": [{"result": results}]}
        counts = collect_dataset([task], EXPLAIN, fetcher, tmp_path / name)
        assert (tmp_path / name / "labels.csv").read_text() == (
            "image,label,split\ntask_3.png,finding,train\n"
        ) or name == "choice"
        if name == "choice":  # a Choices answer and layers only: labelled, no mask at all
            assert counts["labelled"] == 1 and counts["masks"] == 0
            continue
        saved = np.asarray(Image.open(tmp_path / name / "masks" / "task_3.png")) > 0
        assert np.array_equal(saved, disk), name
    assert (tmp_path / "plain" / "masks" / "task_3.png").read_bytes() == (
        tmp_path / "explained" / "masks" / "task_3.png"
    ).read_bytes()
