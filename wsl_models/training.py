"""Training ensemble members on image-level labels, then calibrating thresholds.

Fine-tuning a pretrained backbone on ~100 images works only with frozen BatchNorm statistics
and a lower backbone learning rate (measured on GlaS: BatchNorm in train mode with batches of
16 left test accuracy near chance). Training from scratch keeps BatchNorm in train mode.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

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
from .ensemble import Ensemble, EnsembleConfig
from .masks import calibrate_threshold
from .members import Member, Weights, build_member
from .metrics import pxap

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_factor: float | None = None  # None: 0.1 when pretrained, 1.0 from scratch
    weight_decay: float = 1e-4
    patience: int = 6
    val_fraction: float = 0.15
    seed: int = 0
    weights: str = "imagenet"  # imagenet | none | PATH | "member=value,member=value"
    freeze_bn: bool | None = None  # None: frozen when pretrained
    calibration_images: int = 6
    review_quantile: float = 0.9
    # Checkpoint selection: "loss" (validation loss) or "localization" (PxAP of the member's
    # CAM on the pixel-labelled calibration images: the Survey's B-LOC rule).
    select: str = "loss"
    device: str = "auto"
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def weights_for(member: str, spec: str) -> Weights:
    """``imagenet`` for all, or ``resnet50=/path.pth,densenet121=none`` per member."""
    if "=" not in spec:
        w = Weights.parse(spec)
        # Members without ImageNet weights (the tiny test member) train from scratch.
        if w.source == "imagenet" and member == "tiny":
            return Weights("none")
        return w
    table = dict(item.split("=", 1) for item in spec.split(",") if item)
    return Weights.parse(table.get(member, "imagenet"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def train_member(
    member: Member,
    train_ds: ImageDataset,
    val_ds: ImageDataset | None,
    cfg: TrainConfig,
    pretrained: bool,
    calib: list[tuple[torch.Tensor, int, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Train one member in place; keeps the weights of the best validation epoch."""
    device = resolve_device(cfg.device)
    member.to(device)
    freeze_bn = pretrained if cfg.freeze_bn is None else cfg.freeze_bn
    factor = cfg.backbone_lr_factor or (0.1 if pretrained else 1.0)
    opt = torch.optim.AdamW(
        [
            {"params": member.backbone_parameters(), "lr": cfg.lr * factor},
            {"params": member.head_parameters(), "lr": cfg.lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    sampler = torch.utils.data.WeightedRandomSampler(
        class_balanced_weights(train_ds.labels), num_samples=len(train_ds), replacement=True
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=len(train_ds) > cfg.batch_size,
    )
    best = (math.inf, -1.0)
    best_state = copy.deepcopy(member.state_dict())
    history = []
    stale, best_epoch = 0, 0
    bar = tqdm(range(cfg.epochs), desc=member.name, disable=not cfg.progress, leave=True)
    for epoch in bar:
        _set_train_mode(member, freeze_bn)
        total, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = member(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        sched.step()
        row = {"epoch": epoch + 1, "loss": total / seen, "acc": correct / seen}
        if val_ds is not None and len(val_ds):
            row["val_loss"], row["val_acc"] = _evaluate_loss(member, val_ds, device, cfg.batch_size)
            key = (row["val_loss"], -row["val_acc"])
        else:
            key = (row["loss"], -row["acc"])
        if cfg.select == "localization" and calib:
            row["val_pxap"] = _localization_score(member, calib, device)
            key = (-row["val_pxap"], *key)
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
    member.load_state_dict(best_state)
    member.eval()
    return {"history": history, "best_epoch": best_epoch}


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


def _calibration_samples(
    held: list[Sample], n: int, mask_classes: list[str] | None
) -> list[Sample]:
    """Up to n pixel-labelled held-out images of mask classes, alternating classes (valpx)."""
    with_masks = [
        s for s in held if s.mask is not None and (mask_classes is None or s.label in mask_classes)
    ]
    by_class: dict[str, list[Sample]] = {}
    for s in with_masks:
        by_class.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    while len(out) < n and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(out) < n:
                out.append(by_class[label].pop(0))
    return out


def calibrate(
    ensemble: Ensemble, val_ds: ImageDataset, calib: list[Sample], cfg: TrainConfig
) -> dict[str, Any]:
    """Set review and mask thresholds from held-out data; returns what was measured."""
    conf = ensemble.config
    report: dict[str, Any] = {}
    if len(val_ds):
        x = torch.stack([val_ds[i][0] for i in range(len(val_ds))])
        outs = [ensemble.predict(x[i : i + 16], seed=cfg.seed) for i in range(0, len(x), 16)]
        labels = torch.tensor(val_ds.labels)
        pred = torch.cat([o.label for o in outs])
        unc = torch.cat([o.uncertainty[conf.review_measure] for o in outs])
        member_pred = torch.cat([o.member_probs.argmax(-1) for o in outs], dim=1)
        report["val_accuracy"] = {
            "ensemble": float((pred == labels).float().mean()),
            **{
                n: float((member_pred[k] == labels).float().mean())
                for k, n in enumerate(conf.member_keys)
            },
        }
        ok = unc[pred == labels]
        if len(ok) >= 3:
            conf.review_threshold = float(torch.quantile(ok, cfg.review_quantile))
        report["review_threshold"] = conf.review_threshold
    if calib:
        maps: dict[str, list[np.ndarray]] = {n: [] for n in [*conf.member_keys, "_min", "_mean"]}
        truths = []
        cds = ImageDataset(calib, conf.classes, conf.image_size)
        for i, s in enumerate(calib):
            truth = load_masks([s])[0]
            out = ensemble.predict(cds[i][0][None], seed=cfg.seed)
            stack = torch.stack([c[0, cds.labels[i]] for c in out.cams])
            m = normalize_maps(resize_maps(stack, truth.shape)).numpy()
            for k, n in enumerate(conf.member_keys):
                maps[n].append(m[k])
            maps["_min"].append(m.min(0))
            maps["_mean"].append(m.mean(0))
            truths.append(truth)
        found = {n: calibrate_threshold(v, truths) for n, v in maps.items()}
        conf.member_thresholds = {n: found[n][0] for n in conf.member_keys}
        conf.intersection_threshold = found["_min"][0]
        conf.mean_threshold = found["_mean"][0]
        report["calibration"] = {
            "images": [s.name for s in calib],
            "thresholds": {n: t for n, (t, _) in found.items()},
            "miou": {n: m for n, (_, m) in found.items()},
        }
    return report


def compatible(previous: Ensemble | None, ens_cfg: EnsembleConfig) -> bool:
    """Whether a previous version's weights can initialise this configuration (fine-tuning)."""
    if previous is None:
        return False
    p = previous.config
    return (p.members, p.classes, p.output_stride) == (
        list(ens_cfg.members),
        list(ens_cfg.classes),
        ens_cfg.output_stride,
    )


def train_ensemble(
    dataset: Dataset,
    ens_cfg: EnsembleConfig,
    cfg: TrainConfig,
    split: str = "train",
    init: Ensemble | None = None,
) -> tuple[Ensemble, dict[str, Any]]:
    """Train every member on ``split`` with a stratified hold-out; calibrate; return the ensemble.

    ``init``: a previous version to fine-tune from when it is compatible (same members, classes
    and output stride); otherwise members start from their ``weights``.
    """
    fine_tune = compatible(init, ens_cfg)
    samples = dataset.split(split)
    val_named = [s for s in dataset.samples if s.split in ("val", "valid", "validation")]
    if val_named:
        train_s, held = samples, val_named
    else:
        train_s, held = stratified_holdout(samples, cfg.val_fraction, cfg.seed)
    if not train_s:
        raise DatasetError("no training images left after the validation hold-out")
    if len({s.label for s in train_s}) < 2:
        raise DatasetError("training needs images of at least two classes")
    size = tuple(ens_cfg.image_size)
    train_ds = ImageDataset(train_s, ens_cfg.classes, size, augment=True)
    val_ds = ImageDataset(held, ens_cfg.classes, size)
    calib = _calibration_samples(held, cfg.calibration_images, ens_cfg.mask_classes)
    calib_set = None
    if cfg.select == "localization" and calib:
        cds = ImageDataset(calib, ens_cfg.classes, size)
        calib_set = [(*cds[i], m) for i, m in enumerate(load_masks(calib))]
    if cfg.select not in ("loss", "localization"):
        raise ValueError(f"select must be 'loss' or 'localization', not {cfg.select!r}")
    members, reports = [], {}
    for k, name in enumerate(ens_cfg.members):
        seed_everything(cfg.seed + k)
        w = Weights("none") if fine_tune else weights_for(name, cfg.weights)
        member = build_member(name, len(ens_cfg.classes), w, ens_cfg.dropout, ens_cfg.output_stride)
        if fine_tune:
            member.load_state_dict(init.members[k].state_dict())
        pretrained = fine_tune or w.source != "none"
        reports[f"{k}-{name}"] = train_member(member, train_ds, val_ds, cfg, pretrained, calib_set)
        members.append(member)
    ensemble = Ensemble(members, ens_cfg)
    measured = calibrate(ensemble, val_ds, calib, cfg)
    metrics = {
        "fine_tuned": fine_tune,
        "train_images": len(train_s),
        "val_images": len(held),
        **measured,
        "members": reports,
        "train_config": asdict(cfg),
    }
    return ensemble, metrics
