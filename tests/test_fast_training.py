"""The fast trainer: a frozen trunk run once per image view, only the top trained on the cache."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from wsl_models.data import ImageDataset, load_dataset
from wsl_models.ensemble import EnsembleConfig
from wsl_models.feature_bank import FeatureBank
from wsl_models.members import MEMBERS, build_member
from wsl_models.supervision import IGNORE, PixelDataset
from wsl_models.training import TrainConfig, train_ensemble, train_member, uses_feature_bank

SPLIT = [name for name, spec in MEMBERS.items() if spec.split is not None]


@pytest.mark.parametrize("output_stride", [32, 16])
@pytest.mark.parametrize("name", SPLIT)
def test_top_of_trunk_is_the_feature_map(name, output_stride):
    torch.manual_seed(0)
    member = build_member(name, 2, "none", output_stride=output_stride, decoder=True)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        whole = member.feature_map(x)
        trunk = member.trunk_features(x)
        two_steps = member.top_features(trunk)
        fine = member.trunk_features(x, 8)
        fine_steps = member.top_features(fine, 8)
        _, taps = member.features_and_taps(x)
    assert torch.equal(whole, two_steps) and torch.equal(whole, fine_steps)
    assert fine.shape[-2:] == (12, 16)
    if output_stride == 32:  # the trunk ends at the stride-16 decoder tap
        assert trunk.shape[-2:] == (6, 8) and torch.equal(trunk, taps[-2])
    # A stride-8 trunk leaves the stride-16 stages to the top: strictly more to train.
    assert set(map(id, member.top_parameters())) < set(map(id, member.top_parameters(8)))
    with pytest.raises(ValueError, match="trunk_stride"):
        member.trunk_features(x, 4)
    # The split registers nothing: state dicts are those of an unsplit member.
    assert set(member.state_dict()) == set(
        dict(build_member(name, 2, "none", output_stride=output_stride, decoder=True).state_dict())
    )
    top = {id(p) for p in member.top_parameters()}
    assert 0 < len(top) < len(member.backbone_parameters())


def test_tiny_member_has_no_split_and_trains_whole():
    member = build_member("tiny", 2, "none")
    assert member.split is None
    assert not uses_feature_bank(member, TrainConfig(), pretrained=True)
    with pytest.raises(ValueError, match="no trunk/top split"):
        member.trunk_features(torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    from wsl_models.synthetic import make_dataset

    return load_dataset(
        make_dataset(
            tmp_path_factory.mktemp("disks"), {"train": 8, "test": 2}, (64, 64), 0, "disks"
        )
    )


def test_bank_of_unaugmented_images_is_the_trunk_output(disks):
    member = build_member("efficientnet_lite0", 2, "none")
    ds = ImageDataset(disks.split("train"), disks.classes, (64, 64))
    bank = FeatureBank.build(member, ds, views=4, device=torch.device("cpu"), batch_size=5)
    assert bank.views == 1  # nothing to vary without augmentation
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        assert torch.allclose(bank.features[0], member.trunk_features(x), rtol=1e-4, atol=1e-4)
    assert bank.labels.tolist() == ds.labels and bank.targets is None


def test_bank_views_follow_the_budget_and_targets_flip_with_features(disks):
    member = build_member("efficientnet_lite0", 2, "none")
    samples = disks.split("train")
    targets = [torch.randint(0, 2, (64, 64), dtype=torch.uint8).numpy() for _ in samples]
    ds = PixelDataset(samples, disks.classes, (64, 64), targets, [1] * len(samples), augment=True)
    bank = FeatureBank.build(member, ds, views=3, device=torch.device("cpu"))
    assert bank.views == 3 and bank.targets.shape == (3, len(samples), 64, 64)
    assert not torch.equal(bank.features[0], bank.features[1])  # each view drew its own
    per_view_mb = (bank.features[0].numel() * 4 + bank.targets[0].numel()) / 2**20
    small = FeatureBank.build(member, ds, 3, torch.device("cpu"), budget_mb=per_view_mb * 1.5)
    assert small.views == 1
    idx, view = torch.tensor([0, 2]), torch.tensor([1, 0])
    h, y, t, k = bank.batch(idx, view, flip=(-1,))
    assert torch.equal(h, bank.features[view, idx].flip(-1))
    assert torch.equal(t, bank.targets[view, idx].flip(-1))
    assert y.tolist() == [ds.labels[0], ds.labels[2]] and k.tolist() == [1, 1]
    assert bool(((t == 0) | (t == 1) | (t == IGNORE)).all())


def _lite_config(ds):
    return EnsembleConfig(
        classes=list(ds.classes), members=["efficientnet_lite0"], image_size=(64, 64)
    )


@pytest.mark.parametrize("trunk_stride", [16, 8])
def test_banked_member_trains_only_its_top(disks, trunk_stride):
    torch.manual_seed(0)
    member = build_member("efficientnet_lite0", 2, "imagenet", 0.5)
    before = {k: v.clone() for k, v in member.state_dict().items()}
    train = ImageDataset(disks.split("train"), disks.classes, (64, 64), augment=True)
    cfg = TrainConfig(epochs=2, progress=False, feature_views=2, trunk_stride=trunk_stride)
    report = train_member(member, train, None, cfg, pretrained=True)
    assert report["trainer"] == "feature bank" and report["feature_views"] == 2
    assert report["trunk_stride"] == trunk_stride
    assert set(report["seconds"]) == {"feature_bank", "epochs", "validation"}
    after = member.state_dict()
    names = {id(p): n for n, p in member.named_parameters()}
    top_names = {names[id(p)] for p in member.top_parameters(trunk_stride)}
    moved = {n for n in after if not torch.equal(before[n], after[n])}
    assert moved, "nothing trained"
    # Every changed tensor belongs to the top or the head; the trunk and its BatchNorm
    # statistics are exactly the ImageNet ones.
    head = {names[id(p)] for p in member.head_parameters()}
    assert moved <= top_names | head, sorted(moved - top_names - head)[:5]
    assert "features.net._conv_stem.weight" not in moved
    # The stride-16 stages (between the two trunk ends) train only with the stride-8 trunk.
    middle = {names[id(p)] for p in member.top_parameters(8)} - {
        names[id(p)] for p in member.top_parameters(16)
    }
    assert bool(moved & middle) == (trunk_stride == 8)


def test_whole_backbone_trainer_stays_for_minmax_scratch_and_opt_out(disks):
    member = build_member("efficientnet_lite0", 2, "none")
    assert uses_feature_bank(member, TrainConfig(), pretrained=True)
    assert not uses_feature_bank(member, TrainConfig(), pretrained=False)
    assert not uses_feature_bank(member, TrainConfig(freeze_trunk=False), pretrained=True)
    assert not uses_feature_bank(member, TrainConfig(minmax=True), pretrained=True)
    train = ImageDataset(disks.split("train"), disks.classes, (64, 64), augment=True)
    cfg = TrainConfig(epochs=1, progress=False, freeze_trunk=False)
    report = train_member(member, train, None, cfg, pretrained=True)
    assert report["trainer"] == "whole backbone" and report["feature_views"] is None


def test_banked_ensemble_learns_disks_and_fine_tunes_with_masks(disks):
    """Labels only, then a fine-tuning run with masks: both banked, both valid versions."""
    cfg = TrainConfig(
        epochs=4,
        decoder_epochs=2,
        progress=False,
        lr=3e-3,
        decoder_self_seed_rounds=0,
        decoder_probe_rounds=0,
    )
    ens, metrics = train_ensemble(disks, _lite_config(disks), cfg)
    assert metrics["members"]["0-efficientnet_lite0"]["trainer"] == "feature bank"
    again, m2 = train_ensemble(
        disks, ens.config, dataclasses.replace(cfg, train_masks=True, epochs=2), init=ens
    )
    assert m2["fine_tuned"] and m2["human_masks"] > 0
    assert m2["members"]["0-efficientnet_lite0"]["select"] == "last"
    assert m2["train_config"]["freeze_trunk"] is None and m2["train_config"]["feature_views"] == 4


def test_decoder_schedule_caps_steps_not_small_sets():
    from wsl_models.decoder_training import decoder_epochs

    cfg = TrainConfig()  # 60 epochs, at most 150 steps of 16 images
    assert decoder_epochs(cfg, 40) == 50  # 3 batches: 150 steps
    assert decoder_epochs(cfg, 20) == 60  # 2 batches: the epochs come first
    assert decoder_epochs(cfg, 76) == 30  # GlaS's 76 training images: 5 batches
    assert decoder_epochs(cfg, 313) == 8  # LGG: 20 batches, the same 150 steps
    assert decoder_epochs(cfg, 10_000) == 1
    assert decoder_epochs(TrainConfig(decoder_steps=0), 313) == 60
    assert decoder_epochs(TrainConfig(decoder_epochs=8), 313) == 8
    # No held-out masks to choose the epoch: the shorter cap, where one is set.
    short = TrainConfig(decoder_unjudged_steps=25)
    assert decoder_epochs(short, 76) == 30  # judged: the usual 150 steps
    assert decoder_epochs(short, 76, unjudged=True) == 5  # 25 steps of 5 batches
    assert decoder_epochs(short, 313, unjudged=True) == 2  # at least the 25 steps
    assert decoder_epochs(TrainConfig(decoder_steps=0, decoder_unjudged_steps=25), 76, True) == 5
    assert decoder_epochs(TrainConfig(decoder_unjudged_epochs=0), 76, unjudged=True) == 30
    # ... and at most 8 passes over each image (the default), whatever the steps allow.
    assert decoder_epochs(TrainConfig(), 76) == 30
    assert decoder_epochs(TrainConfig(), 76, unjudged=True) == 8  # GlaS: 40 steps
    assert decoder_epochs(TrainConfig(), 313, unjudged=True) == 8  # LGG: 150 steps either way
    assert decoder_epochs(TrainConfig(), 1000, unjudged=True) == 3  # the steps bind first


def test_a_job_fine_tuning_the_serving_version_runs_the_short_schedule(monkeypatch):
    from backend.jobs import TrainingSettings, fine_tune_schedule

    cfg = TrainConfig(epochs=20, decoder_epochs=60)
    lite = TrainingSettings().members.split(",")
    short = fine_tune_schedule(cfg, TrainingSettings(), lite)
    assert (short.epochs, short.decoder_epochs) == (6, 20)
    # Members trained from scratch (no feature bank) keep the full schedule.
    tiny = fine_tune_schedule(cfg, TrainingSettings(), ["tiny", "tiny"])
    assert (tiny.epochs, tiny.decoder_epochs) == (20, 60)
    monkeypatch.setenv("TRAIN_FINE_TUNE_EPOCHS", "0")
    monkeypatch.setenv("TRAIN_FINE_TUNE_DECODER_EPOCHS", "40")
    full = fine_tune_schedule(cfg, TrainingSettings.from_env(), lite)
    assert (full.epochs, full.decoder_epochs) == (20, 40)
    # Never longer than the full schedule.
    few = fine_tune_schedule(TrainConfig(epochs=3, decoder_epochs=10), TrainingSettings(), lite)
    assert (few.epochs, few.decoder_epochs) == (3, 10)
    # A version whose decoder already learned from masks: a few segmentation steps from it,
    # no weak decoder stage; a version without that keeps the mask schedule.
    seg = fine_tune_schedule(cfg, TrainingSettings(), lite, previous_segmented=True)
    assert (seg.epochs, seg.decoder_epochs, seg.seg_min_steps, seg.seg_max_steps) == (6, 0, 40, 40)
    assert (short.seg_min_steps, short.seg_max_steps) == (cfg.seg_min_steps, cfg.seg_max_steps)
    monkeypatch.setenv("TRAIN_FINE_TUNE_SEG_STEPS", "0")
    kept = fine_tune_schedule(cfg, TrainingSettings.from_env(), lite, previous_segmented=True)
    assert (kept.decoder_epochs, kept.seg_max_steps) == (40, cfg.seg_max_steps)


def test_a_deployment_can_lift_the_cap_on_segmentation_steps(monkeypatch, tmp_path):
    """TRAIN_SEG_MAX_STEPS and TRAIN_SEG_ENCODER_LR_FACTOR reach the job's TrainConfig."""
    from backend.jobs import TrainingSettings, fine_tune_schedule, job_configs
    from backend.settings import Settings
    from wsl_models.mask_training import segmentation_steps

    settings = Settings(model_dir=str(tmp_path))
    _, default = job_configs(["a", "b"], None, TrainingSettings.from_env(), settings)
    assert segmentation_steps(default, 74) == 400  # the default cap
    assert default.seg_encoder_lr_factor == TrainConfig().seg_encoder_lr_factor
    monkeypatch.setenv("TRAIN_SEG_MAX_STEPS", "1200")
    monkeypatch.setenv("TRAIN_SEG_ENCODER_LR_FACTOR", "0.3")
    train = TrainingSettings.from_env()
    _, lifted = job_configs(["a", "b"], None, train, settings)
    assert lifted.seg_encoder_lr_factor == 0.3
    assert (segmentation_steps(lifted, 8), segmentation_steps(lifted, 32)) == (160, 640)
    assert segmentation_steps(lifted, 74) == 1200
    # A job fine-tuning a segmented version still runs its few steps.
    lite = train.members.split(",")
    short = fine_tune_schedule(lifted, train, lite, previous_segmented=True)
    assert segmentation_steps(short, 74) == train.fine_tune_seg_steps


def test_a_version_is_segmented_once_its_decoder_trained_on_masks():
    from backend.jobs import segmented

    conf = EnsembleConfig(classes=["a", "b"], members=["tiny"], decoder=True)
    assert not segmented(None) and not segmented(SimpleNamespace(config=conf))
    assert segmented(SimpleNamespace(config=dataclasses.replace(conf, decoder_scale=2.0)))
    # A decoder trained on masks at the model's own scale is one too.
    at_one = dataclasses.replace(conf, decoder_segmenter=True)
    assert segmented(SimpleNamespace(config=EnsembleConfig.from_dict(dataclasses.asdict(at_one))))
    no_decoder = dataclasses.replace(conf, decoder=False, map_source="cam", decoder_scale=2.0)
    assert not segmented(SimpleNamespace(config=no_decoder))
