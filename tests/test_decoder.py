"""The full-resolution decoder: seeds, affinity, negative evidence, old versions, and masks
that follow the image on synthetic disks from image labels only."""

import json

import numpy as np
import pytest
import torch

from wsl_models.data import load_dataset
from wsl_models.decoder_losses import affinity_loss, area_loss, pair_weights
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.evaluation import evaluate, format_table
from wsl_models.images import open_image, open_mask, to_tensor
from wsl_models.masks import plug_in_threshold
from wsl_models.members import build_member
from wsl_models.seeds import sample_seeds, seed_regions
from wsl_models.supervision import IGNORE
from wsl_models.synthetic import make_dataset
from wsl_models.training import TrainConfig, train_ensemble
from wsl_models.versions import MANIFEST, ModelStore

from .images import without_masks

SIZE = 128


def test_seed_regions_are_disjoint_and_come_from_the_right_ends_of_the_maps():
    yy, xx = np.mgrid[0:40, 0:40]
    fg_map = np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 60.0)  # a bump in the middle
    fg, bg = seed_regions(fg_map, fg_map, erode=1, bg_fraction=0.3)
    assert fg.any() and bg.any() and not (fg & bg).any()
    assert fg[20, 20] and not fg[0, 0]  # the peak, not the corner
    assert bg[0, 0] and not bg[20, 20]
    assert abs(bg.mean() - 0.3) < 0.05  # the 30 % lowest pixels
    assert fg_map[fg].min() > fg_map[bg].max()
    # Erosion shrinks the foreground but never empties it.
    plain, _ = seed_regions(fg_map, fg_map, erode=0, bg_fraction=0.3)
    assert fg.sum() < plain.sum() and (fg <= plain).all()
    tiny = np.zeros((40, 40))
    tiny[5, 5] = 1.0
    single, _ = seed_regions(tiny, tiny, erode=3, bg_fraction=0.3)
    assert single[5, 5] and single.sum() == 1
    # A constant map says nothing: no foreground seeds.
    flat, _ = seed_regions(np.full((8, 8), 0.5), np.full((8, 8), 0.5), 1, 0.3)
    assert not flat.any()


def test_sample_seeds_draws_the_requested_counts_inside_the_regions():
    rng = np.random.default_rng(0)
    fg = np.zeros((30, 30), bool)
    fg[10:20, 10:20] = True
    bg = np.zeros((30, 30), bool)
    bg[:5] = True
    t = sample_seeds(fg, bg, 7, 5, rng)
    assert (t == 1).sum() == 7 and (t == 0).sum() == 5
    assert fg[t == 1].all() and bg[t == 0].all()
    assert ((t == IGNORE) | fg | bg).all()
    again = sample_seeds(fg, bg, 7, 5, rng)
    assert not np.array_equal(t, again)  # re-drawn each epoch
    few = sample_seeds(fg, np.zeros_like(bg), 500, 5, rng)  # more than the region holds
    assert (few == 1).sum() == fg.sum() and (few == 0).sum() == 0


def test_affinity_prefers_boundaries_on_colour_edges():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # a colour edge between columns 7 and 8
    on_edge = torch.zeros(1, 1, 16, 16)
    on_edge[..., 8:] = 1.0
    off_edge = torch.zeros(1, 1, 16, 16)
    off_edge[..., 4:] = 1.0  # cuts through the uniform left half
    constant = torch.full((1, 1, 16, 16), 1.0)
    dil = pair_weights(image, 0.1, (1, 2))
    assert affinity_loss(constant, dil) == pytest.approx(0.0, abs=1e-6)
    assert affinity_loss(on_edge, dil) < 1e-3
    assert affinity_loss(off_edge, dil) > 0.05
    # It is differentiable in the probabilities and pulls them towards the edge.
    # Differentiable: a few gradient steps on logits lower it.
    logits = (off_edge * 4 - 2).requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=50.0)
    start = float(affinity_loss(torch.sigmoid(logits), dil))
    for _ in range(5):
        opt.zero_grad()
        affinity_loss(torch.sigmoid(logits), dil).backward()
        opt.step()
    assert float(affinity_loss(torch.sigmoid(logits), dil)) < start


def test_area_prior_is_zero_inside_the_range_and_grows_outside():
    p = torch.full((2, 1, 8, 8), 0.3)
    assert float(area_loss(p, 0.1, 0.9)) == 0.0
    assert float(area_loss(torch.zeros(1, 1, 8, 8), 0.1, 0.9)) == pytest.approx(0.1)
    assert float(area_loss(torch.ones(1, 1, 8, 8), 0.1, 0.9)) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    root = tmp_path_factory.mktemp("disks")
    return load_dataset(make_dataset(root, {"train": 24, "test": 8}, (SIZE, SIZE), 0, "disks"))


@pytest.fixture(scope="module")
def weak(disks):
    """Image labels only: the masks/ folder is there for calibration and scoring, not training."""
    cfg = EnsembleConfig(
        list(disks.classes), ["tiny", "tiny"], (SIZE, SIZE), mask_classes=["lesion"]
    )
    # One self-seed round, not the default 3: each is a full decoder training (a third of this
    # module's time each), and a round can only replace a decoder by one that scores higher on
    # the held-out masks (tests/test_seeds.py).
    tcfg = TrainConfig(
        epochs=25, lr=3e-3, weights="none", progress=False, decoder_self_seed_rounds=1
    )
    return train_ensemble(disks, cfg, tcfg)


def _ious(ensemble: Ensemble, ds, source: str) -> list[float]:
    lesions = [s for s in ds.split("test") if s.label == "lesion"]
    x = torch.stack([to_tensor(open_image(s.image), ensemble.config.image_size) for s in lesions])
    out = ensemble.predict(x, seed=0)
    ious = []
    for i, s in enumerate(lesions):
        truth = open_mask(s.mask)
        res = ensemble.masks(out, i, truth.shape, source=source)
        mask = res.mask if res.mask is not None else np.zeros_like(truth)
        ious.append(float((mask & truth).sum() / max((mask | truth).sum(), 1)))
    return ious


def test_decoder_masks_follow_synthetic_disks_from_image_labels_only(disks, weak):
    ensemble, metrics = weak
    assert metrics["human_masks"] == 0 and metrics["train_config"]["train_masks"] is False
    assert metrics["decoders"]["seeded"] > 0 and metrics["decoders"]["negative"] > 0
    decoder, cam = _ious(ensemble, disks, "decoder"), _ious(ensemble, disks, "cam")
    print(f"\nmean IoU on disks: decoder {np.mean(decoder):.3f}, CAM {np.mean(cam):.3f}")
    assert np.mean(decoder) >= 0.6
    assert np.mean(decoder) > np.mean(cam)
    assert ensemble.config.map_source == "decoder"
    # Held-out pixel-labelled images calibrated the decoder's threshold (default 0.5 otherwise).
    found = metrics["calibration"]["thresholds"]["decoder"]
    assert ensemble.config.decoder_threshold == found["_min"]
    assert set(metrics["calibration"]["thresholds"]) == {"cam", "decoder"}
    # The decoder's map is at 1/2 of the input for the tiny member (its finest tap).
    x = torch.rand(1, 3, SIZE, SIZE)
    assert ensemble.predict(x).decoder_maps[0].shape == (1, 1, SIZE // 2, SIZE // 2)


def test_without_held_out_masks_the_decoder_threshold_matches_its_seeds_area(disks, weak):
    """No pixel-labelled held-out images: the weak decoder's threshold is the lowest grid
    value whose masks cover no more of the training images than its last seeds did (without
    that cover, than the CAMs' masks do), and they still find the disks; normal images still
    get no mask."""
    import copy

    from wsl_models.calibration import AREA_GRID, calibrate
    from wsl_models.data import ImageDataset

    ensemble = copy.deepcopy(weak[0])
    ensemble.config.decoder_threshold = 0.5
    cfg = ensemble.config
    train = disks.split("train")
    empty = ImageDataset([], cfg.classes, cfg.image_size)
    report = calibrate(ensemble, empty, [], 0, 0.9, weak_decoder_images=train)
    found = report["decoder_threshold"]
    assert found["rule"] == "cam_area" and cfg.decoder_threshold == found["threshold"]
    lesions = [s for s in train if s.label == "lesion"]
    assert found["images"] == len(lesions)  # mask classes only
    # Recomputed here: the CAMs' mean mask area, and the decoder's at every grid value.
    x = torch.stack([to_tensor(open_image(s.image), cfg.image_size) for s in lesions])
    out = ensemble.predict(x, seed=0, samples=0)
    label = cfg.classes.index("lesion")
    cams, maps = [], []
    for i in range(len(lesions)):
        cams.append(ensemble.masks(out, i, cfg.image_size, label=label, source="cam").mask.mean())
        maps.append(ensemble.masks(out, i, cfg.image_size, label, "decoder").intersection_map)
    areas = {t: np.mean([(m > t).mean() for m in maps]) for t in AREA_GRID}
    below = [t for t in AREA_GRID if areas[t] <= np.mean(cams)]  # no bigger than the CAMs'
    assert found["threshold"] == below[0] and found["decoder_area"] <= found["target_area"]
    assert all(areas[t] > np.mean(cams) for t in AREA_GRID if t < below[0])
    assert found["target_area"] == pytest.approx(np.mean(cams), abs=1e-6)
    assert np.mean(_ious(ensemble, disks, "decoder")) >= 0.6
    normal = [s for s in disks.split("test") if s.label == "normal"]
    xn = torch.stack([to_tensor(open_image(s.image), cfg.image_size) for s in normal])
    out = ensemble.predict(xn, seed=0)
    shown = [ensemble.masks(out, i, (SIZE, SIZE), source="decoder").mask for i in range(len(xn))]
    assert all(m is None or not m.any() for m in shown)
    # Given the mass of the decoders' last seed maps, that is the area matched instead.
    mass = float(np.mean([areas[t] for t in AREA_GRID[8:10]]))  # between 0.45's and 0.5's
    seeded = calibrate(ensemble, empty, [], 0, 0.9, weak_decoder_images=train, seeds=(mass, False))
    found = seeded["decoder_threshold"]
    assert found["rule"] == "seed_area" and found["target_area"] == mass
    assert found["threshold"] == next(t for t in AREA_GRID if areas[t] <= mass)
    assert cfg.decoder_threshold == found["threshold"]
    # Where the probe gate opened (large objects), the plug-in Dice rule on the same maps.
    large = calibrate(ensemble, empty, [], 0, 0.9, weak_decoder_images=train, seeds=(mass, True))
    found = large["decoder_threshold"]
    assert found["rule"] == "plug_in" and found["target_area"] == mass
    assert found["threshold"] == round(plug_in_threshold(np.stack(maps), mass), 3)
    assert cfg.decoder_threshold == found["threshold"]
    assert found["decoder_area"] == pytest.approx(
        np.mean([(m > found["threshold"]).mean() for m in maps])
    )
    # No training image of a mask class: nothing to match, nothing set.
    assert calibrate(ensemble, empty, [], 0, 0.9, weak_decoder_images=normal) == {}


def test_a_new_project_without_any_mask_finds_the_disks(disks, tmp_path):
    """No mask anywhere (a new Label Studio project): nothing calibrates the CAMs, and the
    weak decoder's threshold matches the mass of its seed maps; its masks still find the
    disks (IoU >= 0.8 against the masks kept aside) and normal images stay dark."""
    ds = without_masks(disks.root, tmp_path / "nomasks")
    cfg = EnsembleConfig(list(ds.classes), ["tiny", "tiny"], (SIZE, SIZE), mask_classes=["lesion"])
    tcfg = TrainConfig(
        epochs=25, lr=3e-3, weights="none", progress=False, decoder_self_seed_rounds=1
    )
    ensemble, metrics = train_ensemble(ds, cfg, tcfg)
    assert "calibration" not in metrics and ensemble.config.intersection_threshold is None
    found, area = metrics["decoder_threshold"], metrics["decoders"]["seed_area"]
    assert found["rule"] == "seed_area" and found["target_area"] == area["mass"]
    assert ensemble.config.decoder_threshold == found["threshold"]
    ious = _ious(ensemble, disks, "decoder")  # scored against the original masks
    print(f"\nnew project on disks: threshold {found['threshold']}, IoU {np.mean(ious):.3f}")
    assert np.mean(ious) >= 0.8
    normal = [s for s in disks.split("test") if s.label == "normal"]
    xn = torch.stack([to_tensor(open_image(s.image), cfg.image_size) for s in normal])
    out = ensemble.predict(xn, seed=0)
    shown = [ensemble.masks(out, i, (SIZE, SIZE), source="decoder").mask for i in range(len(xn))]
    assert all(m is None or not m.any() for m in shown)


def test_one_or_two_held_out_masks_do_not_set_the_weak_decoders_threshold(disks, weak):
    """A threshold fitted to one or two images goes to extremes: below
    MIN_DECODER_CALIBRATION held-out masks the weak decoder keeps the seed-area threshold (the
    CAMs' thresholds and the map source still come from the masks); from it on, they set it."""
    import copy

    from wsl_models.calibration import MIN_DECODER_CALIBRATION, calibrate, weak_decoder_threshold
    from wsl_models.data import ImageDataset

    ensemble = copy.deepcopy(weak[0])
    cfg = ensemble.config
    train = disks.split("train")
    lesions = [s for s in disks.split("test") if s.label == "lesion" and s.mask is not None]
    assert len(lesions) >= MIN_DECODER_CALIBRATION == 3
    empty = ImageDataset([], cfg.classes, cfg.image_size)
    for n in range(1, MIN_DECODER_CALIBRATION + 1):
        cfg.decoder_threshold = 0.999  # any value the calibration must replace
        report = calibrate(
            ensemble, empty, lesions[:n], 0, 0.9, weak_decoder_images=train, seeds=(0.05, False)
        )
        fitted = report["calibration"]["thresholds"]
        assert cfg.intersection_threshold == fitted["cam"]["_min"]  # the masks set the CAMs'
        if n < MIN_DECODER_CALIBRATION:  # the seed maps' mass, as without masks
            area = weak_decoder_threshold(copy.deepcopy(ensemble), train, 0, 0.05)
            assert report["decoder_threshold"]["held_out_masks"] == n
            assert report["decoder_threshold"]["rule"] == "seed_area"
            assert (
                cfg.decoder_threshold
                == area["threshold"]
                == report["decoder_threshold"]["threshold"]
            )
        else:
            assert "decoder_threshold" not in report
            assert cfg.decoder_threshold == fitted["decoder"]["_min"]
    # A decoder that learned from people is not a weak one: the caller passes no images.
    cfg.decoder_threshold = 0.999
    report = calibrate(ensemble, empty, lesions[:1], 0, 0.9)
    assert "decoder_threshold" not in report
    assert cfg.decoder_threshold == report["calibration"]["thresholds"]["decoder"]["_min"]


def test_negative_evidence_keeps_normal_images_dark(disks, weak):
    ensemble, _ = weak
    normal = [s for s in disks.split("test") if s.label == "normal"]
    lesion = [s for s in disks.split("test") if s.label == "lesion"]

    def peak(samples):
        x = torch.stack([to_tensor(open_image(s.image), (SIZE, SIZE)) for s in samples])
        out = ensemble.predict(x, seed=0)
        return torch.stack([d[:, 0].flatten(1).amax(1) for d in out.decoder_maps]).mean(0)

    assert float(peak(normal).mean()) < 0.5 < float(peak(lesion).mean())


def test_evaluate_reports_every_source_under_both_protocols(disks, weak):
    ensemble, _ = weak
    native = evaluate(ensemble, disks, "test", progress=False)
    survey = evaluate(ensemble, disks, "test", progress=False, protocol="survey")
    assert set(native["by_source"]) == {"cam", "decoder", "baselines"}
    assert survey["eval_size"] == [224, 224] and native["eval_size"] == "native"
    for result in (native, survey):
        dec = result["by_source"]["decoder"]["intersection"]
        base = result["by_source"]["baselines"]["baseline_gaussian"]
        assert dec["pxap"] > base["pxap"] and dec["dice_fg"] > base["dice_fg"]
    text = format_table(survey)
    assert "decoder intersection" in text and "cam intersection" in text and "survey" in text
    with pytest.raises(ValueError, match="protocol"):
        evaluate(ensemble, disks, "test", progress=False, protocol="paper")
    with pytest.raises(ValueError, match="not available"):
        evaluate(ensemble, disks, "test", progress=False, sources=["localizer"])


def test_human_masks_train_the_decoder_with_pseudo_masks_for_the_rest(disks):
    cfg = EnsembleConfig(list(disks.classes), ["tiny"], (SIZE, SIZE), mask_classes=["lesion"])
    tcfg = TrainConfig(epochs=3, decoder_epochs=6, weights="none", progress=False, train_masks=True)
    _, metrics = train_ensemble(disks, cfg, tcfg)
    report = metrics["decoders"]
    assert report["human_masks"] > 0
    assert report["seeded"] == 0  # every lesion image of train has its mask here
    assert report["0-tiny"]["epochs"] == 6
    assert metrics["train_config"]["decoder_mask_weight"] == tcfg.decoder_mask_weight


def test_a_decoder_leaves_the_classifier_init_and_the_rng_stream_alone():
    torch.manual_seed(5)
    plain = build_member("tiny", 2)
    after_plain = torch.rand(3)
    torch.manual_seed(5)
    with_decoder = build_member("tiny", 2, decoder=True)
    assert torch.equal(torch.rand(3), after_plain)  # the same batches will be drawn
    a, b = plain.state_dict(), with_decoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("decoder.") for k in b) and not any(k.startswith("decoder.") for k in a)


def test_a_version_saved_before_decoders_still_loads_and_serves(tmp_path):
    torch.manual_seed(0)
    cfg = EnsembleConfig(["a", "b"], ["tiny"], (64, 64), decoder=False, map_source="cam")
    store = ModelStore(tmp_path)
    vid = store.save(Ensemble([build_member("tiny", 2)], cfg), {})
    path = tmp_path / "versions" / vid / MANIFEST
    manifest = json.loads(path.read_text())
    for key in ("decoder", "map_source", "decoder_threshold"):  # what old manifests lack
        manifest["config"].pop(key)
    path.write_text(json.dumps(manifest))
    loaded = store.load(vid)
    assert loaded.config.decoder is False and loaded.config.map_source == "cam"
    assert loaded.members[0].decoder is None
    out = loaded.predict(torch.rand(2, 3, 64, 64), seed=0)
    assert out.decoder_maps == []
    res = loaded.masks(out, 0, (50, 70))
    assert res.member_maps["0-tiny"].shape == (50, 70)
    with pytest.raises(ValueError, match="no decoder"):
        loaded.masks(out, 0, (50, 70), source="decoder")
    with pytest.raises(ValueError, match="needs members with a decoder"):
        EnsembleConfig(["a", "b"], ["tiny"], decoder=False, map_source="decoder")
