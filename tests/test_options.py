"""Settings that change behaviour: output stride, flip TTA, checkpoint selection, config checks."""

import pytest
import torch

from wsl_models.cam import normalize_maps, resize_maps
from wsl_models.data import class_balanced_weights, load_dataset
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.evaluation import evaluate, format_table
from wsl_models.members import build_member
from wsl_models.training import TrainConfig, train_ensemble, weights_for


@pytest.mark.parametrize(
    "name", ["resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite1"]
)
def test_output_stride_16_doubles_map_resolution(name):
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        coarse = build_member(name, 2, "none").feature_map(x)
        fine = build_member(name, 2, "none", output_stride=16).feature_map(x)
    assert coarse.shape[-2:] == (4, 3)
    assert fine.shape[-2:] == (8, 6)
    assert fine.shape[1] == coarse.shape[1]


def test_output_stride_keeps_the_same_weights():
    a = build_member("resnet50", 2, "none")
    b = build_member("resnet50", 2, "none", output_stride=16)
    b.load_state_dict(a.state_dict())  # same parameter set: pretrained weights still fit
    with pytest.raises(ValueError):
        build_member("tiny", 2, output_stride=8)


def test_flip_tta_makes_maps_of_a_mirror_symmetric_image_symmetric():
    torch.manual_seed(0)
    half = torch.rand(1, 3, 64, 32)
    x = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric image
    member = build_member("tiny", 2, decoder=True)
    for m in member.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    cfg = EnsembleConfig(["a", "b"], ["tiny"], (64, 64), tta_flip=True)
    out = Ensemble([member], cfg).predict(x, seed=0)
    cams = out.cams[0]
    assert torch.allclose(cams, cams.flip(-1), atol=1e-5)
    decoded = out.decoder_maps[0]  # the decoder's map is averaged with its mirror too
    assert torch.allclose(decoded, decoded.flip(-1), atol=1e-5)
    plain = Ensemble([member], EnsembleConfig(["a", "b"], ["tiny"], (64, 64))).predict(x, seed=0)
    assert not torch.allclose(plain.cams[0], plain.cams[0].flip(-1), atol=1e-3)


def test_tta_is_set_by_name_and_four_views_need_the_mirror():
    cfg = EnsembleConfig(["a", "b"], ["tiny"], (64, 64))
    for name, flags in (
        ("four", (True, True)),
        ("mirror", (True, False)),
        ("none", (False, False)),
    ):
        cfg.set_tta(name)
        assert (cfg.tta_flip, cfg.tta_vflip) == flags
    with pytest.raises(ValueError, match="unknown TTA"):
        cfg.set_tta("eight")
    with pytest.raises(ValueError, match="tta_vflip needs tta_flip"):
        EnsembleConfig(["a", "b"], ["tiny"], (64, 64), tta_vflip=True)


def test_four_view_tta_averages_the_maps_of_the_flipped_images_flipped_back():
    """tta_vflip adds the image flipped upside down and both ways: each decoder map is the
    mean of the four views' maps, each flipped back; CAMs the normalised sum."""
    torch.manual_seed(0)
    member = build_member("tiny", 2, decoder=True)
    x = torch.rand(2, 3, 64, 48)
    size = (64, 48)
    views = [(), (-1,), (-2,), (-2, -1)]
    plain = Ensemble([member], EnsembleConfig(["a", "b"], ["tiny"], size))
    outs = [plain.predict(x.flip(d) if d else x, seed=0, samples=0) for d in views]
    back = [
        o.decoder_maps[0].flip(d) if d else o.decoder_maps[0]
        for o, d in zip(outs, views, strict=True)
    ]
    cfg = EnsembleConfig(["a", "b"], ["tiny"], size, tta_flip=True, tta_vflip=True)
    out = Ensemble([member], cfg).predict(x, seed=0, samples=0)
    assert torch.allclose(out.decoder_maps[0], torch.stack(back).mean(0), atol=1e-6)
    cam_sum = sum(o.cams[0].flip(d) if d else o.cams[0] for o, d in zip(outs, views, strict=True))
    assert not torch.allclose(out.cams[0], outs[0].cams[0], atol=1e-3)
    assert torch.allclose(out.cams[0], normalize_maps(cam_sum), atol=1e-5)
    # The classification is the plain image's: the views change maps only.
    assert torch.equal(out.probs, outs[0].probs)


def test_max_map_mode_takes_the_pixelwise_max_over_classes():
    torch.manual_seed(0)
    member = build_member("tiny", 3)
    x = torch.rand(1, 3, 64, 64)
    cams = {"decoder": False, "map_source": "cam"}
    by_class = Ensemble([member], EnsembleConfig(["a", "b", "c"], ["tiny"], (64, 64), **cams))
    by_max = Ensemble(
        [member], EnsembleConfig(["a", "b", "c"], ["tiny"], (64, 64), map_mode="max", **cams)
    )
    out = by_class.predict(x, seed=0)
    size = (64, 64)
    got = by_max.masks(out, 0, size).member_maps["0-tiny"]
    expected = torch.stack([out.cams[0][0, c] for c in range(3)]).amax(0)
    want = normalize_maps(resize_maps(expected[None], size))[0].numpy()
    assert abs(got - want).max() < 1e-5
    assert abs(got - by_class.masks(out, 0, size).member_maps["0-tiny"]).max() > 1e-3
    with pytest.raises(ValueError, match="map_mode"):
        EnsembleConfig(["a", "b"], ["tiny"], map_mode="min")


def test_config_validation():
    with pytest.raises(ValueError, match="not model classes"):
        EnsembleConfig(["a", "b"], ["tiny"], mask_classes=["c"])
    with pytest.raises(ValueError, match="unknown member"):
        EnsembleConfig(["a", "b"], ["vgg"])
    with pytest.raises(ValueError, match="two classes"):
        EnsembleConfig(["a"], ["tiny"])
    with pytest.raises(ValueError, match="CAM"):
        EnsembleConfig(["a", "b"], ["tiny"], cam_method="nope")
    cfg = EnsembleConfig(["a", "b"], ["tiny", "tiny"], image_size=[64, 48])
    assert cfg.image_size == (64, 48)
    assert cfg.member_keys == ["0-tiny", "1-tiny"]
    assert EnsembleConfig.from_dict(cfg.to_dict() | {"future_field": 1}) == cfg


def test_weights_spec_parsing():
    assert weights_for("resnet50", "imagenet").source == "imagenet"
    assert weights_for("tiny", "imagenet").source == "none"  # no ImageNet weights exist
    spec = "resnet50=/w/r50.pth,densenet121=none"
    assert weights_for("resnet50", spec).source == "/w/r50.pth"
    assert weights_for("densenet121", spec).source == "none"
    assert weights_for("efficientnet_lite0", spec).source == "imagenet"


def test_class_balanced_weights():
    w = class_balanced_weights([0, 0, 0, 1])
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_localization_checkpoint_selection(synth_dir):
    ds = load_dataset(synth_dir)
    cfg = EnsembleConfig(list(ds.classes), ["tiny"], (64, 64), mask_classes=["lesion"])
    tcfg = TrainConfig(
        epochs=3, weights="none", select="localization", progress=False,
        decoder_probe_rounds=0,
        decoder_self_seed_rounds=0,  # the classifier's checkpoint is under test
    )  # fmt: skip
    ensemble, metrics = train_ensemble(ds, cfg, tcfg)
    history = metrics["members"]["0-tiny"]["history"]
    assert all(0 <= row["val_pxap"] <= 100 for row in history)
    best = metrics["members"]["0-tiny"]["best_epoch"]
    assert history[best - 1]["val_pxap"] == max(r["val_pxap"] for r in history)
    result = evaluate(ensemble, ds, "test", progress=False)
    text = format_table(result)
    assert "intersection" in text and "baseline_all_ones" in text
    with pytest.raises(ValueError, match="select"):
        train_ensemble(ds, cfg, TrainConfig(epochs=1, weights="none", select="vibes"))


def test_fine_tuning_starts_from_a_compatible_previous_version(synth_dir):
    ds = load_dataset(synth_dir)
    cfg = EnsembleConfig(list(ds.classes), ["tiny"], (64, 64))
    first, _ = train_ensemble(ds, cfg, TrainConfig(epochs=1, weights="none", progress=False))
    # No step (classifier or decoder): weights must carry over.
    tcfg = TrainConfig(epochs=0, decoder_epochs=0, weights="none", progress=False)
    again, metrics = train_ensemble(ds, cfg, tcfg, init=first)
    assert metrics["fine_tuned"] is True
    a, b = first.members[0].state_dict(), again.members[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = EnsembleConfig(list(ds.classes), ["tiny", "tiny"], (64, 64))
    _, metrics = train_ensemble(ds, other, tcfg, init=first)
    assert metrics["fine_tuned"] is False
