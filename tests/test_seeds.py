"""Decoder seeds and selection: probability seeding follows the map, seed CAMs at a larger
input are finer, held-out masks choose the epoch, the recipe and the served map source."""

import numpy as np
import pytest
import torch
from scipy import stats

from wsl_models.cam import XGradCAM, normalize_maps
from wsl_models.data import load_dataset
from wsl_models.decoder_training import DecoderTargets
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.members import build_member
from wsl_models.seeds import multiscale_cams, probability_seeds, seed_cams
from wsl_models.supervision import IGNORE
from wsl_models.synthetic import make_dataset
from wsl_models.train_config import recipe
from wsl_models.training import TrainConfig, train_ensemble

from .images import without_masks

SIZE = 96


def _two_level(h: int = 8, w: int = 8, high: float = 0.8, low: float = 0.2) -> np.ndarray:
    m = np.full((h, w), low)
    m[:, : w // 2] = high
    return m


def test_probability_seeds_follow_the_map_chi_square():
    rng = np.random.default_rng(0)
    draws = 4000
    m = np.broadcast_to(_two_level(), (draws, 8, 8)).copy()
    fg_only = probability_seeds(m, m, n_fg=1, n_bg=0, rng=rng)
    left, right = (fg_only[:, :, :4] == 1).sum(), (fg_only[:, :, 4:] == 1).sum()
    assert left + right == draws  # one seed per image, never a background one
    # Foreground seeds ~ map: 0.8 vs 0.2 over equal halves.
    assert stats.chisquare([left, right], [0.8 * draws, 0.2 * draws]).pvalue > 1e-3
    bg_only = probability_seeds(m, m, n_fg=0, n_bg=1, rng=rng)
    left, right = (bg_only[:, :, :4] == 0).sum(), (bg_only[:, :, 4:] == 0).sum()
    assert left + right == draws
    # Background seeds ~ 1 - map: 0.2 vs 0.8.
    assert stats.chisquare([left, right], [0.2 * draws, 0.8 * draws]).pvalue > 1e-3
    # And a uniform drawer would have failed the same test.
    assert stats.chisquare([draws // 2, draws // 2], [0.2 * draws, 0.8 * draws]).pvalue < 1e-6


def test_probability_seeds_are_fresh_inside_the_image_and_never_on_ignored_pixels():
    rng = np.random.default_rng(1)
    m = np.random.default_rng(2).random((50, 12, 10))
    valid = np.ones((12, 10), bool)
    valid[:, :3] = False  # e.g. padding
    t = probability_seeds(m, m, 6, 6, rng, valid=valid)
    assert t.shape == m.shape and t.dtype == np.uint8
    assert set(np.unique(t)) <= {0, 1, IGNORE}
    assert (t[:, :, :3] == IGNORE).all()
    per_image = (t != IGNORE).reshape(50, -1).sum(1)
    assert (per_image <= 12).all() and (per_image >= 6).all()  # collisions drop, never add
    assert ((t == 1).reshape(50, -1).sum(1) <= 6).all()
    again = probability_seeds(m, m, 6, 6, rng, valid=valid)
    assert not np.array_equal(t, again)  # fresh every draw
    # Fewer valid pixels than seeds asked: only the valid ones are drawn.
    one = np.zeros((12, 10), bool)
    one[4, 4] = True
    few = probability_seeds(m[:3], m[:3], 20, 0, rng, valid=one)
    assert ((few == 1).reshape(3, -1).sum(1) == 1).all() and (few[:, 4, 4] == 1).all()


def test_seed_cams_at_twice_the_input_are_twice_as_fine_and_at_1x_the_served_cam():
    torch.manual_seed(0)
    member = build_member("tiny", 2)
    x = torch.rand(3, 3, SIZE, SIZE)
    labels = [0, 1, 1]
    cam = XGradCAM()
    at1, at2 = seed_cams(member, x, labels, cam, 1.0), seed_cams(member, x, labels, cam, 2.0)
    assert at2.shape[-2:] == tuple(2 * s for s in at1.shape[-2:])
    served = normalize_maps(cam.from_features(member.feature_map(x), member.head.weight))
    assert torch.allclose(at1, served[torch.arange(3), torch.tensor(labels)], atol=1e-6)
    assert float(at2.min()) == 0.0 and float(at2.max()) == 1.0
    both = multiscale_cams(member, x, labels, cam, (1.0, 2.0))
    assert both.shape == at2.shape
    # labels None: the max over classes (map_mode "max"), normalised again.
    assert torch.allclose(
        seed_cams(member, x, None, cam, 1.0),
        normalize_maps(cam.from_features(member.feature_map(x), member.head.weight).amax(1)),
        atol=1e-6,
    )


def test_a_recipe_sets_decoder_fields_only():
    cfg = TrainConfig()
    r = recipe(cfg, "decoder_affinity_weight=1; decoder_seed_scales=1,2;decoder_seeding=region")
    assert r.decoder_affinity_weight == 1.0 and r.decoder_seed_scales == (1.0, 2.0)
    assert r.decoder_seeding == "region" and cfg.decoder_seeding == "probability"
    for bad in ("epochs=3", "decoder_nope=1", "decoder_lr"):
        with pytest.raises(ValueError, match="decoder_"):
            recipe(cfg, bad)


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    root = tmp_path_factory.mktemp("disks")
    return load_dataset(make_dataset(root, {"train": 24, "test": 4}, (SIZE, SIZE), 0, "disks"))


def _train(disks, **values):
    cfg = EnsembleConfig(list(disks.classes), ["tiny"], (SIZE, SIZE), mask_classes=["lesion"])
    tcfg = TrainConfig(
        epochs=12, lr=3e-3, weights="none", progress=False, decoder_epochs=8, **values
    )
    return train_ensemble(disks, cfg, tcfg)


def test_held_out_masks_choose_the_decoder_epoch_and_the_recipe(disks):
    # The default recipe cannot learn (lr 0); the other one can: the trainer must pick it.
    ensemble, metrics = _train(disks, decoder_lr=0.0, decoder_recipes=("decoder_lr=0.003",))
    rep = metrics["decoders"]["0-tiny"]
    assert metrics["decoders"]["held_out_images"]  # held-out lesion images with masks
    assert rep["recipe"] == "decoder_lr=0.003"
    scores = rep["recipe_held_out_pxap"]
    assert scores["decoder_lr=0.003"] > scores["default"]
    # The kept epoch is the best on the held-out masks (ties: the later).
    curve = [row["held_out_pxap"] for row in rep["history"]]
    assert rep["select"] == "localization" and rep["held_out_pxap"] == max(curve)
    assert rep["selected_epoch"] == max(i + 1 for i, v in enumerate(curve) if v == max(curve))
    # ... and what is served is that epoch: its score again from the saved decoder.
    assert metrics["map_source"]["map_source"] in ("decoder", "cam")


def test_a_decoder_below_its_cam_on_held_out_masks_never_serves(disks):
    # A decoder that never trains (lr 0) scores below the CAM: the version serves the CAM.
    ensemble, metrics = _train(disks, decoder_lr=0.0)
    choice = metrics["map_source"]
    pxaps = metrics["calibration"]["pxap"]
    assert pxaps["decoder"] < pxaps["cam"]
    assert (
        choice["map_source"] == "cam" == ensemble.config.map_source and choice["was"] == "decoder"
    )
    assert "decoder" in choice["why"] and "cam" in choice["why"]
    # Switched off, the decoder stays the source (and the numbers are still recorded).
    ensemble2, metrics2 = _train(disks, decoder_lr=0.0, choose_map_source=False)
    assert ensemble2.config.map_source == "decoder" and "map_source" not in metrics2


def _without_masks(disks, tmp_path):
    """The disks set with its masks/ folder removed (no held-out masks), and its config."""
    ds = without_masks(disks.root, tmp_path / "nomasks")
    return ds, EnsembleConfig(list(ds.classes), ["tiny"], (SIZE, SIZE), mask_classes=["lesion"])


def test_without_held_out_masks_the_last_epoch_and_the_default_recipe_stay(disks, tmp_path):
    ds, cfg = _without_masks(disks, tmp_path)
    tcfg = TrainConfig(
        epochs=2,
        weights="none",
        progress=False,
        decoder_epochs=3,
        decoder_recipes=("decoder_lr=0",),
    )
    ensemble, metrics = train_ensemble(ds, cfg, tcfg)
    rep = metrics["decoders"]["0-tiny"]
    assert rep["select"] == "last" and rep["selected_epoch"] == 3 and rep["recipe"] == "default"
    assert list(rep["recipe_held_out_pxap"]) == ["default"]  # no time spent on others
    # Self-seed rounds (3 by default) need held-out masks to judge them: none run.
    assert tcfg.decoder_self_seed_rounds > 0
    assert not any(k.startswith("self_seed_round") for k in metrics["decoders"])
    assert ensemble.config.map_source == "decoder" and "map_source" not in metrics


def test_region_seeding_is_still_an_option(disks):
    ensemble, metrics = _train(disks, decoder_seeding="region", decoder_seed_scales=(1.0,))
    assert metrics["decoders"]["seeding"] == "region"
    assert metrics["decoders"]["seed_scales"] == [1.0]
    with pytest.raises(ValueError, match="decoder_seeding"):
        _train(disks, decoder_seeding="uniform")
    assert isinstance(ensemble, Ensemble)


def test_seed_cam_is_the_ensembles_by_default_and_must_be_closed_form():
    from types import SimpleNamespace

    from wsl_models.cam import GradCAMPlusPlus, LayerCAM, XGradCAM
    from wsl_models.decoder_training import seed_cam_method

    ensemble = SimpleNamespace(cam=XGradCAM())
    assert isinstance(seed_cam_method(ensemble, TrainConfig()), XGradCAM)
    plus = TrainConfig(decoder_seed_cam="gradcam++")
    assert isinstance(seed_cam_method(ensemble, plus), GradCAMPlusPlus)
    layer = TrainConfig(decoder_seed_cam="layercam")
    assert isinstance(seed_cam_method(ensemble, layer), LayerCAM)
    with pytest.raises(ValueError, match="closed-form"):
        seed_cam_method(ensemble, TrainConfig(decoder_seed_cam="lib-layercam"))


def test_bad_decoder_settings_fail_before_the_classifiers_train(disks, monkeypatch):
    """A library CAM as seed map, an unknown seeding (also inside a recipe) or a bad epoch
    rule: the trainer refuses at once, not after the classifiers' minutes of training."""
    import wsl_models.training as training

    def no_training(*args, **kwargs):
        raise AssertionError("a classifier started training")

    monkeypatch.setattr(training, "train_member", no_training)
    cfg = EnsembleConfig(list(disks.classes), ["tiny"], (SIZE, SIZE), mask_classes=["lesion"])
    bad = [
        ({"decoder_seed_cam": "lib-layercam"}, "closed-form"),
        ({"decoder_recipes": ("decoder_seeding=uniform",)}, "decoder_seeding"),
        ({"decoder_select": "best"}, "decoder_select"),
        ({"decoder_seed_scales": (0.0,)}, "decoder_seed_scales"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            train_ensemble(disks, cfg, TrainConfig(weights="none", progress=False, **options))


def test_reseeded_plan_takes_the_agreeing_members_maps_normalised():
    from wsl_models.decoder_training import DecoderTargets

    cams = [torch.zeros(1, 4, 4), None, torch.zeros(2, 4, 4)]
    plan = DecoderTargets(
        cams, [False, True, False], [None] * 3, [True, False, True], [[1], [], [0, 1]]
    )
    maps = [torch.rand(3, 8, 8) * 0.3, torch.rand(3, 8, 8) * 0.3 + 0.1]
    new = plan.reseeded(maps)
    assert new.cams[1] is None and new.negative == plan.negative  # only seeded images change
    assert new.cams[0].shape == (1, 8, 8) and new.cams[2].shape == (2, 8, 8)
    # Member 1's map of image 0, min-max normalised as seed CAMs are.
    m = maps[1][0]
    assert torch.allclose(new.cams[0][0], (m - m.min()) / (m.max() - m.min()))
    assert new.cams[2].amax(dim=(1, 2)).tolist() == [1.0, 1.0]
    assert plan.cams[0].abs().sum() == 0  # the original plan is untouched


def test_a_self_seed_round_reports_what_it_kept(disks):
    ensemble, metrics = _train(disks, decoder_self_seed_rounds=1)
    dec = metrics["decoders"]
    rnd = dec["self_seed_round_1"]["0-tiny"]
    assert rnd["previous_held_out_pxap"] is not None and rnd["held_out_pxap"] is not None
    assert rnd["kept"] == (rnd["held_out_pxap"] >= rnd["previous_held_out_pxap"])
    rep = dec["0-tiny"]
    assert rep["held_out_pxap"] == max(rnd["held_out_pxap"], rnd["previous_held_out_pxap"])
    assert rep.get("self_seed_rounds", 0) == (1 if rnd["kept"] else 0)


def test_a_self_seed_round_can_run_a_shorter_schedule(disks):
    _, metrics = _train(disks, decoder_self_seed_rounds=1, decoder_self_seed_steps=2)
    # About 20 training images in batches of 16: the first stage runs its 8 epochs, the
    # round 2 steps, i.e. 1 epoch.
    assert metrics["decoders"]["self_seed_round_1"]["0-tiny"]["epochs"] == 1


def test_a_worse_self_seeded_decoder_is_discarded(disks, monkeypatch):
    """Seeds from the inverted decoder maps teach the background as object: that decoder
    scores far below round 1 on the held-out masks and the round-1 decoder must serve."""
    from wsl_models.decoder_training import DecoderTargets

    reseeded = DecoderTargets.reseeded
    monkeypatch.setattr(
        DecoderTargets, "reseeded", lambda self, maps: reseeded(self, [1 - m for m in maps])
    )
    ensemble, metrics = _train(disks, decoder_self_seed_rounds=3, decoder_probe_rounds=0)
    rnd = metrics["decoders"]["self_seed_round_1"]["0-tiny"]
    assert not rnd["kept"] and rnd["held_out_pxap"] < rnd["previous_held_out_pxap"] - 5
    # No member kept round 1: round 2 would seed from the same maps, so none runs.
    assert "self_seed_round_2" not in metrics["decoders"]
    rep = metrics["decoders"]["0-tiny"]
    assert rep["held_out_pxap"] == rnd["previous_held_out_pxap"] and "self_seed_rounds" not in rep
    # What serves is round 1's decoder: its held-out PxAP measured again after training.
    assert metrics["calibration"]["pxap"]["decoder"] > rnd["held_out_pxap"]


def test_a_member_that_loses_a_round_is_settled(disks, monkeypatch):
    """Member 0's round-1 decoder scores worse (forced), member 1's always better: rounds 2 and
    3 retrain member 1 only, and member 0 keeps and serves its first decoder."""
    import wsl_models.decoder_training as dt

    real, order, calls = dt.train_decoder, {}, [0, 0]

    def scored(member, *args, **kwargs):
        rep = real(member, *args, **kwargs)
        k = order.setdefault(id(member), len(order))
        calls[k] += 1
        if calls[k] > 1:  # a self-seed round (one recipe: one first-stage call)
            rep = {**rep, "held_out_pxap": -1.0 if k == 0 else 101.0}
        return rep

    monkeypatch.setattr(dt, "train_decoder", scored)
    cfg = EnsembleConfig(
        list(disks.classes), ["tiny", "tiny"], (SIZE, SIZE), mask_classes=["lesion"]
    )
    tcfg = TrainConfig(
        epochs=4, lr=3e-3, weights="none", progress=False, decoder_epochs=2,
        decoder_self_seed_rounds=3, decoder_probe_rounds=0,
    )  # fmt: skip
    _, metrics = train_ensemble(disks, cfg, tcfg)
    dec = metrics["decoders"]
    assert set(dec["self_seed_round_1"]) == {"0-tiny", "1-tiny"}
    assert not dec["self_seed_round_1"]["0-tiny"]["kept"]
    for r in (2, 3):
        assert set(dec[f"self_seed_round_{r}"]) == {"1-tiny"}
    assert calls == [2, 4]
    assert "self_seed_rounds" not in dec["0-tiny"] and dec["1-tiny"]["self_seed_rounds"] == 3


def test_self_seed_rounds_stay_off_the_path_with_human_masks(disks):
    # Masks of training images: the segmenter takes over the decoder, the rounds would only
    # lengthen a Label Studio job.
    ensemble, metrics = _train(
        disks, decoder_self_seed_rounds=1, train_masks=True, seg_min_steps=4, seg_max_steps=4
    )
    assert metrics["decoders"]["human_masks"] > 0
    assert not any(k.startswith("self_seed_round") for k in metrics["decoders"])


def test_without_held_out_masks_the_unjudged_cap_shortens_the_decoder(disks, tmp_path):
    ds, cfg = _without_masks(disks, tmp_path)
    values = dict(epochs=2, weights="none", progress=False, decoder_epochs=6)
    _, judged = train_ensemble(ds, cfg, TrainConfig(**values, decoder_unjudged_epochs=0))
    _, short = train_ensemble(ds, cfg, TrainConfig(**values, decoder_unjudged_epochs=1))
    assert judged["decoders"]["0-tiny"]["epochs"] == 6
    # One pass over each image, and it is the epoch kept.
    rep = short["decoders"]["0-tiny"]
    assert rep["epochs"] == 1 and rep["selected_epoch"] == 1 and rep["select"] == "last"


def test_probe_map_follows_the_features_where_the_soft_map_is_blurred():
    """Two kinds of cells (features) laid out as a square on a background; the soft map is
    that square blurred and shifted by 2 cells. The probe's probability follows the features:
    its mask matches the square far better than the soft map's own does."""
    from scipy import ndimage

    from wsl_models.probe import probe_map

    rng = np.random.default_rng(0)
    truth = np.zeros((16, 16), bool)
    truth[4:12, 4:12] = True
    feats = np.where(truth, 1.0, -1.0)[None] * np.array([1.0, 0.5])[:, None, None]
    feats = (feats + rng.normal(0, 0.3, (2, 16, 16))).astype(np.float32)
    soft = ndimage.gaussian_filter(np.roll(truth, 2, axis=1).astype(np.float32), 2.0)
    fitted = probe_map(feats, soft)
    assert fitted.shape == (16, 16) and fitted.dtype == np.float32
    iou = lambda m: (m & truth).sum() / (m | truth).sum()  # noqa: E731
    assert iou(fitted > 0.5) > 0.9 > iou(soft > 0.5) + 0.2
    # A map that says one side everywhere leaves nothing to tell apart: it comes back as is.
    assert np.array_equal(probe_map(feats, np.zeros((16, 16))), np.zeros((16, 16)))


def test_a_probe_round_reseeds_from_the_refined_maps_and_is_judged(disks, monkeypatch):
    """A probe round seeds from the decoders' consensus re-fitted by the probe and is kept only
    where the held-out masks score it at least as well."""
    import wsl_models.decoder_training as dt

    seen = []
    real = dt.probe_seed_maps

    def recorded(ensemble, images, plan, maps):
        out = real(ensemble, images, plan, maps)
        seen.append((maps, out, plan))
        return out

    monkeypatch.setattr(dt, "probe_seed_maps", recorded)
    ensemble, metrics = _train(disks, decoder_probe_rounds=1, decoder_self_seed_rounds=0)
    dec = metrics["decoders"]
    rnd = dec["probe_round_1"]["0-tiny"]
    assert rnd["kept"] == (rnd["held_out_pxap"] >= rnd["previous_held_out_pxap"])
    assert dec["0-tiny"].get("probe_rounds", 0) == (1 if rnd["kept"] else 0)
    ((before, refined, plan),) = seen
    seeded = [i for i, c in enumerate(plan.cams) if c is not None]
    assert seeded
    others = [i for i in range(len(plan.cams)) if i not in seeded]  # unchanged
    assert torch.equal(refined[0][others], before[0][others])
    assert not torch.equal(refined[0][seeded], before[0][seeded])
    assert 0 <= float(refined[0].min()) and float(refined[0].max()) <= 1
    assert "probe_gate" not in dec  # judged: no gate


def test_seed_cover_is_the_share_of_a_seeded_image_above_otsu_and_its_mass_the_mean():
    big, small = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    big[0, :, :4] = 1.0  # half the image
    small[0, :2, :2] = 1.0  # a sixteenth
    plan = DecoderTargets([big, None, small], [False, True, False], [None] * 3, [True] * 3)
    assert plan.seed_cover((16, 16)) == pytest.approx((0.5 + 1 / 16) / 2)
    assert DecoderTargets([None], [True], [None], [False]).seed_cover((8, 8)) is None
    # Soft: the maps' mean; the ramp's is a half.
    ramp = torch.linspace(0, 1, 8).repeat(8, 1)[None]
    plan = DecoderTargets([big, ramp, None], [False] * 3, [None] * 3, [True] * 3)
    assert plan.seed_mass((8, 8)) == pytest.approx((0.5 + 0.5) / 2)
    assert DecoderTargets([None], [True], [None], [False]).seed_mass((8, 8)) is None


def test_without_held_out_masks_probe_rounds_run_only_on_objects_the_probe_can_refit(
    disks, tmp_path, monkeypatch
):
    """No held-out masks judge a probe round, so the seed CAMs' cover gates the unjudged
    rounds: below ``decoder_probe_min_cover`` none runs, above it each runs and is kept. The
    decoder's threshold then matches the mass of the seed maps it last learned from (the seed
    CAMs'), or, past the gate, takes the plug-in Dice rule at the last probe maps' mass."""
    import wsl_models.decoder_training as dt

    refits = []
    real = dt.probe_seed_maps

    def recorded(ensemble, images, plan, maps):
        refits.append((real(ensemble, images, plan, maps), plan, images))
        return refits[-1][0]

    monkeypatch.setattr(dt, "probe_seed_maps", recorded)
    ds, cfg = _without_masks(disks, tmp_path)
    values = dict(epochs=2, weights="none", progress=False, decoder_epochs=2)
    values |= dict(decoder_self_seed_rounds=3, decoder_unjudged_probe_rounds=2)
    _, closed = train_ensemble(ds, cfg, TrainConfig(**values, decoder_probe_min_cover=1.0))
    gate = closed["decoders"]["probe_gate"]
    assert not gate["open"] and 0 < gate["seed_cover"] < 1 and gate["min_cover"] == 1.0
    assert not any("_round_" in k for k in closed["decoders"])  # self-seed rounds neither
    area = closed["decoders"]["seed_area"]
    assert area["cover"] == gate["seed_cover"] and area["seeds"] == "cam"
    assert 0 < area["mass"] < 1
    weak = closed["decoder_threshold"]
    assert weak["rule"] == "seed_area" and weak["target_area"] == area["mass"]
    assert weak["decoder_area"] <= weak["target_area"] or weak["threshold"] == 0.95
    _, opened = train_ensemble(ds, cfg, TrainConfig(**values, decoder_probe_min_cover=0.0))
    dec = opened["decoders"]
    assert dec["probe_gate"]["open"] and dec["probe_gate"]["seed_cover"] == gate["seed_cover"]
    assert [k for k in dec if "_round_" in k] == ["probe_round_1", "probe_round_2"]
    for r in (1, 2):  # unjudged: no score, always kept
        rnd = dec[f"probe_round_{r}"]["0-tiny"]
        assert rnd["kept"] and rnd["held_out_pxap"] is None
    assert dec["0-tiny"]["probe_rounds"] == 2 and dec["0-tiny"]["select"] == "last"
    refined, plan, images = refits[-1]  # the second round's seeds
    last, grid = plan.reseeded(refined), dt.cover_grid(images)
    cover, mass = round(last.seed_cover(grid), 4), round(last.seed_mass(grid), 4)
    assert dec["seed_area"] == {"cover": cover, "mass": mass, "seeds": "probe_round_2"}
    weak = opened["decoder_threshold"]  # large objects: the plug-in rule, at the same mass
    assert weak["rule"] == "plug_in" and weak["target_area"] == dec["seed_area"]["mass"]
    # The defaults open the gate only for objects above 0.15 of the image.
    assert TrainConfig().decoder_probe_min_cover == 0.15


def test_one_or_two_held_out_masks_choose_the_epoch_but_judge_no_round(disks):
    """Below three held-out masks a round's score is one image's: the rounds then run as
    without masks (gated probe rounds, all kept, no self-seed round)."""
    _, metrics = _train(
        disks,
        calibration_images=2,
        decoder_self_seed_rounds=3,
        decoder_unjudged_probe_rounds=1,
        decoder_probe_min_cover=0.0,
    )
    dec = metrics["decoders"]
    assert 1 <= len(dec["held_out_images"]) <= 2
    assert dec["probe_gate"]["open"]
    assert [k for k in dec if "_round_" in k] == ["probe_round_1"]
    rnd = dec["probe_round_1"]["0-tiny"]
    assert rnd["kept"] and rnd["held_out_pxap"] is None
    assert rnd["previous_held_out_pxap"] is not None  # the first stage was still chosen by them
