"""Training ensemble members on image-level labels, then calibrating thresholds.

Fine-tuning a pretrained backbone on ~100 images works only with frozen BatchNorm statistics
and a lower backbone learning rate (measured on GlaS: BatchNorm in train mode with batches of
16 left test accuracy near chance). Training from scratch keeps BatchNorm in train mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import calibrate, calibration_samples, seeds_recorded
from .cam import XGradCAM, normalize_maps, resize_maps
from .data import (
    Dataset,
    DatasetError,
    ImageDataset,
    Sample,
    class_balanced_weights,
    load_masks,
    stratified_holdout,
)
from .decoder_training import check_decoder_settings, train_decoders
from .ensemble import Ensemble, EnsembleConfig
from .feature_bank import FeatureBank
from .mask_training import segmented, train_segmentation
from .members import Member, Weights, build_member, channels_last
from .metrics import pxap
from .supervision import (
    HUMAN,
    NO_TARGET,
    PSEUDO,
    PixelDataset,
    class_map,
    default_cam,
    human_target,
    minmax_entropy_loss,
    pixel_loss,
    pseudo_target,
)
from .train_config import (
    CHECKPOINT_RULES,
    TrainConfig,
    resolve_device,
    seed_everything,
    weights_for,
)

log = logging.getLogger(__name__)


def _set_train_mode(member: Member, freeze_bn: bool) -> None:
    member.train()
    if freeze_bn:
        for m in member.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def _evaluate_loss(member: Member, ds: ImageDataset, device: torch.device, bs: int) -> tuple:
    member.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(ds), bs):
        xs, ys = zip(*(ds[j] for j in range(i, min(i + bs, len(ds)))), strict=True)
        x, y = torch.stack(xs).to(device), torch.tensor(ys, device=device)
        logits = member(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss / len(ds), correct / len(ds)


@torch.no_grad()
def _evaluate_bank(member: Member, bank: FeatureBank, bs: int, trunk_stride: int) -> tuple:
    """``_evaluate_loss`` on cached trunk outputs (view 0, unaugmented)."""
    member.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(bank), bs):
        h, y = bank.features[0, i : i + bs], bank.labels[i : i + bs]
        top = member.top_features(h, trunk_stride)
        logits = member.logits_from_pooled(top.mean(dim=(2, 3)))
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss / len(bank), correct / len(bank)


def _batch(batch: list | tuple, device: torch.device) -> tuple:
    """(x, y) from an ImageDataset, (x, y, target, kind) from a PixelDataset."""
    x, y = batch[0].to(device), torch.as_tensor(batch[1], device=device)
    if len(batch) == 2:
        return x, y, None, None
    return x, y, batch[2].to(device), torch.as_tensor(batch[3], device=device)


def _step_loss(
    member: Member,
    features: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    kind: torch.Tensor | None,
    cfg: TrainConfig,
    cam: Any,
    mask_class: torch.Tensor,
    share: tuple[float, float, float] = (1.0, 1.0, 1.0),
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint loss of one batch from its last feature maps; returns (loss, logits).

    ``share``: factors of the terms that are means over all, over the labelled, and over the
    min-max images of the batch (``_shares``; 1 single-process). Pixel losses run outside
    autocast: binary cross-entropy is unsafe in half precision. ``x``: the images, needed by
    the min-max objective only (it re-runs the member on masked images).
    """
    logits = member.logits_from_pooled(features.mean(dim=(2, 3)))
    labelled = y >= 0
    loss = (
        nn.functional.cross_entropy(logits[labelled], y[labelled]) * share[1]
        if labelled.any()
        else logits.sum() * 0.0
    )
    weights = {HUMAN: cfg.mask_weight, PSEUDO: cfg.pseudo_weight}
    if target is not None and bool((kind != NO_TARGET).any()):
        # Unlabelled images are supervised on the map of the class the model predicts.
        cls = torch.where(labelled, y, logits.argmax(1))
        with distributed.full_precision(features.device):
            maps = class_map(member, features.float(), cls, cam)
            loss = loss + pixel_loss(maps, target, kind, weights) * share[0]
    if cfg.minmax and member.localizer is not None:
        if x is None:
            raise ValueError("the min-max objective needs the images (the streaming trainer)")
        wanted = torch.where(labelled & mask_class[y.clamp_min(0)], y, torch.full_like(y, -1))
        mm, soft = minmax_entropy_loss(member, x, wanted, features, tuple(cfg.minmax_area))
        loss = loss + cfg.minmax_weight * mm * share[2]
        if target is not None:  # the localizer also learns from the human and pseudo masks
            with distributed.full_precision(features.device):
                loss = loss + pixel_loss(soft[:, 0].float(), target, kind, weights) * share[0]
    return loss, logits


def _shares(y: torch.Tensor, mask_class: torch.Tensor) -> tuple[float, float, float]:
    """Under torchrun, each rank's loss terms are means over its share of the global batch;
    scaled by world * local count / global count, their gradients averaged over ranks are those
    of the single-process means over the global batch (distributed.mean_shares)."""
    if not distributed.is_distributed():
        return (1.0, 1.0, 1.0)
    labelled = y >= 0
    wanted = labelled & mask_class[y.clamp_min(0)]
    counts = [len(y), int(labelled.sum()), int(wanted.sum())]
    a, b, c = distributed.mean_shares(counts, y.device)
    return (a, b, c)


def uses_feature_bank(member: Member, cfg: TrainConfig, pretrained: bool) -> bool:
    """Whether ``member`` trains its top on cached trunk outputs (``feature_bank.py``): a
    pretrained member with a trunk/top split, unless ``cfg.freeze_trunk`` says otherwise.
    The min-max objective (it re-runs masked images) and torchrun keep the whole-backbone
    trainer."""
    freeze = pretrained if cfg.freeze_trunk is None else cfg.freeze_trunk
    return (
        freeze and member.split is not None and not cfg.minmax and not distributed.is_distributed()
    )


class _StreamingBatches:
    """Every batch decoded, augmented and run through the whole backbone (the loader's draw)."""

    def __init__(self, member: Member, train_ds: ImageDataset, cfg: TrainConfig, device) -> None:
        self.member, self.device = member, device
        # Under torchrun: the same draw on every rank, each rank loading its share of a batch.
        self.loader = distributed.global_batch_loader(
            train_ds,
            class_balanced_weights(train_ds.labels),
            cfg.batch_size,
            drop_last=len(train_ds) > cfg.batch_size,
        )

    def epoch(self):
        for batch in self.loader:
            x, y, target, kind = _batch(batch, self.device)
            yield x, y, target, kind

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.member.feature_map(x)


class _BankedBatches:
    """Class-balanced batches of cached trunk outputs: a random view per image, and a random
    flip per batch in feature space (the target flipped with it)."""

    def __init__(self, member: Member, train_ds: ImageDataset, cfg: TrainConfig, device) -> None:
        self.member, self.cfg = member, cfg
        self.bank = FeatureBank.build(
            member, train_ds, cfg.feature_views, device, cfg.batch_size, cfg.feature_bank_mb,
            cfg.trunk_stride,
        )  # fmt: skip
        self.weights = class_balanced_weights(train_ds.labels)

    def epoch(self):
        n, bs = len(self.bank), self.cfg.batch_size
        draw = torch.multinomial(self.weights, n, replacement=True)
        views = torch.randint(self.bank.views, (n,))
        device = self.bank.features.device
        for start in range(0, n, bs):
            idx = draw[start : start + bs]
            if n > bs and len(idx) < bs:
                break  # drop_last, as the loader
            flip = ()
            if self.cfg.augment:
                flip = tuple(d for d in (-1, -2) if float(torch.rand(())) < 0.5)
            yield self.bank.batch(idx.to(device), views[start : start + bs].to(device), flip)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous(memory_format=torch.channels_last)
        return self.member.top_features(h, self.cfg.trunk_stride)


def train_member(
    member: Member,
    train_ds: ImageDataset,
    val_ds: ImageDataset | None,
    cfg: TrainConfig,
    pretrained: bool,
    calib: list[tuple[torch.Tensor, int, np.ndarray]] | None = None,
    cam: Any = None,
    mask_class: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train one member in place; keeps the weights of the selected epoch.

    ``train_ds`` may be a PixelDataset (pixel targets); ``mask_class[c]``: whether class c has
    a foreground to localise (the min-max objective skips the others). A pretrained member
    with a trunk/top split trains only its top, on cached trunk outputs (``uses_feature_bank``).
    """
    device = resolve_device(cfg.device)
    member.to(device)
    cam = default_cam(cam)
    select = cfg.select
    if select == "auto":
        pixels = isinstance(train_ds, PixelDataset) and any(k != NO_TARGET for k in train_ds.kinds)
        select = "last" if pixels or cfg.minmax else "loss"
    if mask_class is None:
        mask_class = torch.ones(max(train_ds.labels) + 1, dtype=torch.bool)
    mask_class = mask_class.to(device)
    freeze_bn = pretrained if cfg.freeze_bn is None else cfg.freeze_bn
    factor = cfg.backbone_lr_factor or (0.1 if pretrained else 1.0)
    banked = uses_feature_bank(member, cfg, pretrained)
    timer = time.perf_counter()
    if banked:
        source: _StreamingBatches | _BankedBatches = _BankedBatches(member, train_ds, cfg, device)
        val_bank = (
            FeatureBank.build(
                member, val_ds, 1, device, cfg.batch_size, trunk_stride=cfg.trunk_stride
            )
            if val_ds is not None and len(val_ds)
            else None
        )
    else:
        source = _StreamingBatches(member, train_ds, cfg, device)
    seconds = {"feature_bank": time.perf_counter() - timer, "epochs": 0.0, "validation": 0.0}
    opt = torch.optim.AdamW(
        [
            {
                "params": (
                    member.top_parameters(cfg.trunk_stride)
                    if banked
                    else member.backbone_parameters()
                ),
                "lr": cfg.lr * factor,
            },
            {"params": member.head_parameters(), "lr": cfg.lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    distributed.broadcast_module(member)  # every rank starts from rank 0's weights
    if distributed.is_distributed() and cfg.minmax and not freeze_bn:
        log.warning("min-max training under torchrun: BatchNorm statistics stay per-rank")
    unsync_bn = distributed.sync_batchnorm(member, enabled=not freeze_bn and not cfg.minmax)
    amp, amp_dtype = distributed.amp_settings(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    best = (math.inf, -1.0)
    best_state = copy.deepcopy(member.state_dict())
    history = []
    stale, best_epoch = 0, 0
    quiet = not cfg.progress or not distributed.is_main()
    bar = tqdm(range(cfg.epochs), desc=member.name, disable=quiet, leave=True)
    # Channels-last convolutions for the banked top (contiguous again on leaving: saved and
    # served weights keep the usual layout).
    with channels_last(member) if banked else contextlib.nullcontext():
        for epoch in bar:
            timer = time.perf_counter()
            _set_train_mode(member, freeze_bn)
            total, correct, seen, labelled = 0.0, 0, 0, 0
            for inputs, y, target, kind in source.epoch():
                share = _shares(y, mask_class)
                with distributed.autocast(device, amp, amp_dtype):
                    features = source.features(inputs)
                    loss, logits = _step_loss(
                        member, features, y, target, kind, cfg, cam, mask_class, share,
                        x=None if banked else inputs,
                    )  # fmt: skip
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_gradients(member.parameters())
                scaler.step(opt)
                scaler.update()
                total += float(loss.detach()) * len(y) / share[0]
                correct += int(((logits.argmax(1) == y) & (y >= 0)).sum())
                seen += len(y)
                labelled += int((y >= 0).sum())
            sched.step()
            total, correct, seen, labelled = distributed.all_reduce_sum(
                [total, correct, seen, labelled], device
            )
            distributed.broadcast_module(member)  # keeps ranks bit-identical (e.g. per-rank BN)
            seconds["epochs"] += time.perf_counter() - timer
            timer = time.perf_counter()
            row = {"epoch": epoch + 1, "loss": total / seen, "acc": correct / max(labelled, 1)}
            if distributed.is_main():  # one rank validates; all take its numbers and decisions
                if banked and val_bank is not None:
                    row["val_loss"], row["val_acc"] = _evaluate_bank(
                        member, val_bank, cfg.batch_size, cfg.trunk_stride
                    )
                elif val_ds is not None and len(val_ds):
                    row["val_loss"], row["val_acc"] = _evaluate_loss(
                        member, val_ds, device, cfg.batch_size
                    )
                if select == "localization" and calib:
                    row["val_pxap"] = _localization_score(member, calib, device)
            row = distributed.broadcast_object(row)
            seconds["validation"] += time.perf_counter() - timer
            if "val_loss" in row:
                key = (row["val_loss"], -row["val_acc"])
            else:
                key = (row["loss"], -row["acc"])
            if "val_pxap" in row:
                key = (-row["val_pxap"], *key)
            if select == "last":
                key = (-float(epoch),)
            history.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
            if key < best:
                best, stale, best_epoch = key, 0, epoch + 1
                best_state = copy.deepcopy(member.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("%s: early stop at epoch %d", member.name, epoch + 1)
                    break
    unsync_bn()
    member.load_state_dict(best_state)
    member.eval()
    return {
        "history": history,
        "best_epoch": best_epoch,
        "select": select,
        "trainer": "feature bank" if banked else "whole backbone",
        "feature_views": source.bank.views if banked else None,
        "trunk_stride": cfg.trunk_stride if banked else None,
        "seconds": seconds,
    }


@torch.no_grad()
def _localization_score(
    member: Member, calib: list[tuple[torch.Tensor, int, np.ndarray]], device: torch.device
) -> float:
    """PxAP of the member's XGrad-CAM for the true class on pixel-labelled images."""
    member.eval()
    maps, truths = [], []
    for x, y, truth in calib:
        raw = XGradCAM()(member, x[None].to(device))[0, y]
        maps.append(normalize_maps(resize_maps(normalize_maps(raw), truth.shape)).cpu().numpy())
        truths.append(truth)
    return pxap(maps, truths)


def load_previous(member: Member, previous: Member) -> None:
    """Start from a previous version's member; a version without a decoder leaves ours fresh."""
    missing, unexpected = member.load_state_dict(previous.state_dict(), strict=False)
    if any(not k.startswith("decoder.") for k in missing + unexpected):
        raise ValueError(f"{member.name}: previous weights do not fit ({missing + unexpected})")


def compatible(previous: Ensemble | None, ens_cfg: EnsembleConfig) -> bool:
    """Whether a previous version's weights can initialise this configuration (fine-tuning).

    A decoder is not required of the previous version: its classifiers still start ours."""
    if previous is None:
        return False
    p = previous.config
    return (p.members, p.classes, p.output_stride, p.localizer) == (
        list(ens_cfg.members),
        list(ens_cfg.classes),
        ens_cfg.output_stride,
        ens_cfg.localizer,
    )


def pseudo_targets(
    ensemble: Ensemble, samples: list[Sample], cfg: TrainConfig, batch_size: int = 16
) -> list[np.ndarray | None]:
    """Pseudo-masks from ``ensemble``'s CAM consensus (its intersection map) at its input size.

    The map of the image's label (or, unlabelled, of the predicted class); None for images
    of classes that get no masks (their class map is not a foreground).
    """
    conf = ensemble.config
    size = tuple(conf.image_size)
    ds = ImageDataset(samples, conf.classes, size)
    out: list[np.ndarray | None] = []
    for i in range(0, len(ds), batch_size):
        idx = range(i, min(i + batch_size, len(ds)))
        pred = ensemble.predict(torch.stack([ds[j][0] for j in idx]), seed=cfg.seed)
        for b, j in enumerate(idx):
            label = ds.labels[j] if ds.labels[j] >= 0 else int(pred.label[b])
            # The CAM consensus: these targets train the CAM itself (as measured in the
            # learning-curve bench); the decoder makes its own pseudo-masks.
            masks = ensemble.masks(pred, b, size, label=label, source="cam")
            out.append(pseudo_target(masks.intersection_map, cfg.pseudo_fg, cfg.pseudo_bg)
                       if masks.wanted else None)  # fmt: skip
    return out


def _pixel_labelled(s: Sample, ens_cfg: EnsembleConfig, cfg: TrainConfig) -> bool:
    """Whether a training image's own pixel labels (mask, clicks) train: ``cfg.train_masks``
    and an image of a mask class or unlabelled."""
    return cfg.train_masks and (not s.label or s.label in (ens_cfg.mask_classes or ens_cfg.classes))


def keeps_segmenter(
    from_segmenter: bool, has_mask: list[bool], has_points: list[bool], cfg: TrainConfig
) -> bool:
    """Whether a job skips the weak decoder stage: it fine-tunes a version whose decoder
    already learned from masks or clicks, and has clicks but no masks. Retrained on CAM seeds
    with no mask to hold it, the segmenter would first unlearn what the clicks taught it
    (GlaS, 4 rounds of 8 clicked images, held-out train images: after 32, Dice fg / bg /
    PxAP 81.0 / 78.0 / 89.6 skipping it against 78.3 / 77.3 / 87.8, rounds 30 % shorter).
    The backend's short fine-tuning schedule already skips the stage for any segmenter
    (``backend.jobs.fine_tune_schedule``); this is the full schedule's rule."""
    return (
        from_segmenter
        and not cfg.decoder_retrain_segmenter
        and not any(has_mask)
        and any(has_points)
    )


def human_targets(
    train_s: list[Sample], ens_cfg: EnsembleConfig, cfg: TrainConfig
) -> list[np.ndarray | None]:
    """The human masks of training images (``cfg.train_masks``) of mask classes or unlabelled."""
    size = tuple(ens_cfg.image_size)
    return [human_target(s, size) if _pixel_labelled(s, ens_cfg, cfg) else None for s in train_s]


def _pixel_train_set(
    train_s: list[Sample],
    ens_cfg: EnsembleConfig,
    cfg: TrainConfig,
    teacher: Ensemble | None,
    human: list[np.ndarray | None],
    augment: bool = True,
) -> tuple[ImageDataset, dict[str, int]]:
    """Human masks where they exist, pseudo-masks (from ``teacher``) elsewhere."""
    size = tuple(ens_cfg.image_size)
    targets = list(human)
    kinds = [HUMAN if t is not None else NO_TARGET for t in targets]
    rest = [i for i, t in enumerate(targets) if t is None]
    if teacher is not None and cfg.pseudo_weight > 0 and rest:
        for i, t in zip(
            rest, pseudo_targets(teacher, [train_s[i] for i in rest], cfg), strict=True
        ):
            if t is not None:
                targets[i], kinds[i] = t, PSEUDO
    counts = {"human_masks": kinds.count(HUMAN), "pseudo_masks": kinds.count(PSEUDO)}
    counts["unlabelled"] = sum(1 for s in train_s if not s.label)
    if not counts["human_masks"] and not counts["pseudo_masks"]:
        return ImageDataset(train_s, ens_cfg.classes, size, augment=augment), counts
    return PixelDataset(train_s, ens_cfg.classes, size, targets, kinds, augment=augment), counts


def train_ensemble(
    dataset: Dataset,
    ens_cfg: EnsembleConfig,
    cfg: TrainConfig,
    split: str = "train",
    init: Ensemble | None = None,
) -> tuple[Ensemble, dict[str, Any]]:
    """Train every member on ``split`` with a stratified hold-out; calibrate; return the ensemble.

    ``init``: a previous version to fine-tune from when it is compatible (same members,
    classes, output stride and localizer); otherwise members start from their ``weights``.
    It also makes the pseudo-masks (``cfg.pseudo_weight`` > 0), compatible or not.
    Images of ``split`` may carry a human mask, an image label, or neither (label "").
    """
    if cfg.minmax and not ens_cfg.localizer:
        raise ValueError("minmax training needs EnsembleConfig(localizer=True)")
    if cfg.select not in CHECKPOINT_RULES:
        raise ValueError(f"select must be one of {', '.join(CHECKPOINT_RULES)}, not {cfg.select!r}")
    distributed.amp_settings(cfg.amp, resolve_device(cfg.device))  # validates the mode
    distributed.check_batch_size(cfg.batch_size)
    if ens_cfg.decoder:
        check_decoder_settings(cfg)
    fine_tune = compatible(init, ens_cfg)
    samples = dataset.split(split)
    val_named = [s for s in dataset.samples if s.split in ("val", "valid", "validation")]
    if val_named:
        train_s, held = samples, [s for s in val_named if s.label]
    else:
        train_s, held = stratified_holdout(samples, cfg.val_fraction, cfg.seed)
    if not train_s:
        raise DatasetError("no training images left after the validation hold-out")
    if len({s.label for s in train_s if s.label}) < 2:
        raise DatasetError("training needs labelled images of at least two classes")
    size = tuple(ens_cfg.image_size)
    human = human_targets(train_s, ens_cfg, cfg)
    train_ds, pixel_counts = _pixel_train_set(train_s, ens_cfg, cfg, init, human, cfg.augment)
    val_ds = ImageDataset(held, ens_cfg.classes, size)
    calib = calibration_samples(held, cfg.calibration_images, ens_cfg.mask_classes)
    calib_set = None
    if cfg.select == "localization" and calib:
        cds = ImageDataset(calib, ens_cfg.classes, size)
        calib_set = [(*cds[i], m) for i, m in enumerate(load_masks(calib))]
    wanted = set(ens_cfg.mask_classes or ens_cfg.classes)
    mask_class = torch.tensor([c in wanted for c in ens_cfg.classes])
    cam = Ensemble.cam_for(ens_cfg)
    members, reports = [], {}
    for k, name in enumerate(ens_cfg.members):
        seed_everything(cfg.seed + k)
        w = Weights("none") if fine_tune else weights_for(name, cfg.weights)
        member = build_member(
            name,
            len(ens_cfg.classes),
            w,
            ens_cfg.dropout,
            ens_cfg.output_stride,
            ens_cfg.localizer,
            ens_cfg.decoder,
        )
        if fine_tune:
            load_previous(member, init.members[k])
        pretrained = fine_tune or w.source != "none"
        reports[f"{k}-{name}"] = train_member(
            member, train_ds, val_ds, cfg, pretrained, calib_set, cam, mask_class
        )
        members.append(member)
    ensemble = Ensemble(members, ens_cfg)
    decoders: dict[str, Any] = {}
    segmentation: dict[str, Any] = {}
    # Under torchrun only rank 0 trains the decoders and calibrates: the others' ensembles
    # are never saved.
    if ens_cfg.decoder and distributed.is_main():
        device = resolve_device(cfg.device)
        has_mask = [h is not None for h in human]
        has_points = [s.points is not None and _pixel_labelled(s, ens_cfg, cfg) for s in train_s]
        if keeps_segmenter(fine_tune and segmented(init), has_mask, has_points, cfg):
            decoders = {"skipped": "clicks fine-tune the previous version's segmenter directly"}
        else:
            decoders = train_decoders(ensemble, train_s, human, cfg, device, held_out=calib)
        segmentation = train_segmentation(
            ensemble, train_s, has_mask, cfg, device, calib, has_points
        )
    # A decoder that learned from CAM seeds alone, with no held-out masks to calibrate on,
    # gets its threshold from the area its last seeds covered on the training images (or, where
    # the probe gate found large objects, the Dice its maps expect of themselves).
    weak_only = ens_cfg.decoder and not segmented(ensemble) and all(h is None for h in human)
    measured = (
        calibrate(
            ensemble,
            val_ds,
            calib,
            cfg.seed,
            cfg.review_quantile,
            cfg.choose_map_source,
            weak_decoder_images=train_s if weak_only else None,
            seeds=seeds_recorded(decoders),
        )
        if distributed.is_main()
        else {}
    )
    metrics = {
        "fine_tuned": fine_tune,
        "world_size": distributed.world_size(),
        "train_images": len(train_s),
        "val_images": len(held),
        "held_out": [s.name for s in held],
        **pixel_counts,
        **measured,
        "members": reports,
        "decoders": decoders,
        "segmentation": segmentation,
        "train_config": asdict(cfg),
    }
    return ensemble, metrics
