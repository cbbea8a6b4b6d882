"""Segmentation fine-tuning once annotators have drawn masks: the decoder as a real segmenter.

The weak path (``decoder_training``) trains the decoder on cached taps of the whole image at
the model's input size (224 px for a 775x522 GlaS image) with the classifier frozen. That is
right for seeds, which are coarse anyway; it wastes human masks, whose edges are lost at that
scale. With masks, each member's decoder (and, with ``seg_encoder_lr_factor`` > 0, the top
stage of its backbone at that lower learning rate) trains on random crops of the image at
``seg_scale`` x the model's input (crops of the model's input size, so a step costs what a
whole-image step costs today):

- loss: BCE + soft Dice on the human masks (images of classes without masks: all background),
  plus, when the top stage moves, the classification loss on the whole images, so the class
  head and MC Dropout ranking stay valid;
- augmentation a segmentation model expects: flips, 90-degree rotations, scale jitter,
  colour / stain jitter;
- steps scale with the number of masks (``seg_steps_per_mask``), within [min, max]: a job with
  8 masks stays quick;
- with pixel-labelled held-out images, the checkpoint with the best held-out PxAP is kept.

Clicked images without a mask train on the mask the smart keypoints' feature probe spreads
their clicks into (``probed_targets``; ``seg_click_masks``), or on the clicked pixels alone
with the colour-affinity and self-training terms.

The version then records ``decoder_scale``: serving runs the decoder on the image at that
scale (``Ensemble.predict``), the classifier still at the model's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import v2

from . import probe
from .clicks import clicks_in, load_points
from .data import ImageDataset, Sample
from .decoder_losses import affinity_loss, pair_weights
from .ensemble import Ensemble, EnsembleConfig
from .held_out import BestCheckpoint, HeldOut
from .images import ImageError, open_image, open_mask, scaled_size, to_tensor
from .masks import resize_mask
from .members import Member, channels_last
from .supervision import IGNORE, human_target
from .train_config import TrainConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- pure functions


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) (B, H, W) against uint8 targets, IGNORE pixels out.

    Per image, then averaged; an image with no foreground in its target and none predicted
    scores a perfect 1 (the +1 smoothing), so all-background crops are not punished for
    being right."""
    valid = (target != IGNORE).float()
    probs = torch.sigmoid(logits) * valid
    truth = (target == 1).float() * valid
    inter = (probs * truth).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + truth.flatten(1).sum(1)
    return (1 - (2 * inter + 1) / (total + 1)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE over the non-IGNORE pixels + ``dice_weight`` x soft Dice over the ``dense`` images
    (full masks; default all). Sparse targets (clicks) get the BCE only: a Dice over a few
    clicked disks says nothing about the object's extent."""
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logits[valid], (target[valid] == 1).float())
    if dense is None:
        dense = torch.ones(len(target), dtype=torch.bool, device=target.device)
    if dice_weight <= 0 or not dense.any():
        return bce
    return bce + dice_weight * soft_dice_loss(logits[dense], target[dense])


PSEUDO_BG, PSEUDO_FG = 2, 3  # target values of self-training labels on clicked images


def confident_targets(probs: torch.Tensor, clicks: torch.Tensor, confidence: float) -> torch.Tensor:
    """Clicked images' targets for self-training: the clicks (0 / 1) where clicked; elsewhere
    PSEUDO_FG where ``probs`` >= ``confidence``, PSEUDO_BG where <= 1 - it, IGNORE in between.
    ``probs`` (N, H, W) float, ``clicks`` (N, H, W) uint8 at the same size."""
    out = torch.full_like(clicks, IGNORE)
    out[probs >= confidence] = PSEUDO_FG
    out[probs <= 1 - confidence] = PSEUDO_BG
    clicked = clicks != IGNORE
    out[clicked] = clicks[clicked]
    return out


def pseudo_steps(cfg: TrainConfig, steps: int) -> set[int]:
    """The steps at which clicked images get fresh self-training labels: from
    ``seg_click_pseudo_at`` of ``steps`` on, ``seg_click_pseudo_refresh`` times, evenly."""
    start = round(cfg.seg_click_pseudo_at * steps)
    if cfg.seg_click_pseudo_at <= 0 or not 0 < start < steps:
        return set()
    times = max(1, cfg.seg_click_pseudo_refresh)
    return {start + (steps - start) * i // times for i in range(times)}


def pseudo_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over the self-training pixels (PSEUDO_BG / PSEUDO_FG) of ``target``; 0 without."""
    pseudo = (target == PSEUDO_BG) | (target == PSEUDO_FG)
    if not pseudo.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[pseudo], (target[pseudo] == PSEUDO_FG).float())


def click_affinity(logits: torch.Tensor, images: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The weak path's colour-affinity term on clicked crops: spreads each click's label to
    neighbours of similar colour, on the decoder's grid (``logits`` (B, 1, h, w), ``images``
    (B, 3, H, W) in [0, 1], shrunk to it)."""
    small = F.interpolate(images, size=logits.shape[-2:], mode="area")
    weights = pair_weights(small, cfg.decoder_affinity_sigma, cfg.decoder_affinity_dilations)
    return affinity_loss(torch.sigmoid(logits), weights)


def segmented(version: Ensemble | None) -> bool:
    """Whether a version's decoder trained on the annotators' masks or clicks:
    ``train_segmentation`` sets ``decoder_segmenter``; versions saved before that flag are told
    by the scale it recorded (``seg_scale``, 2 by default, as ``decoder_scale``)."""
    if version is None or not version.config.decoder:
        return False
    return version.config.decoder_segmenter or version.config.decoder_scale > 1.0


def segmentation_steps(cfg: TrainConfig, masks: int) -> int:
    """Optimizer steps for ``masks`` human masks: per mask, within [min, max]; 0 without."""
    if masks <= 0 or cfg.seg_steps_per_mask <= 0:
        return 0
    return int(min(cfg.seg_max_steps, max(cfg.seg_min_steps, cfg.seg_steps_per_mask * masks)))


def random_crops(
    images: torch.Tensor,
    targets: torch.Tensor,
    idx: torch.Tensor,
    crop: tuple[int, int],
    scale_jitter: tuple[float, float],
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of ``crop`` size from images ``idx`` (uint8 (N,3,H,W), targets (N,H,W)): a window
    of crop x s (s drawn in ``scale_jitter``, clipped to the image) resized to ``crop``
    (bilinear image, nearest target), flipped and rotated by 90 degrees at random."""
    xs, ts = [], []
    height, width = images.shape[-2:]
    for i in idx.tolist():
        s = float(torch.empty(1).uniform_(*scale_jitter, generator=gen))
        h, w = min(height, round(crop[0] * s)), min(width, round(crop[1] * s))
        top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
        x = images[i, :, top : top + h, left : left + w].float()[None] / 255.0
        t = targets[i, top : top + h, left : left + w][None, None].float()
        x = F.interpolate(x, size=crop, mode="bilinear", align_corners=False, antialias=True)
        t = F.interpolate(t, size=crop, mode="nearest")
        dims = [d for d in (-1, -2) if torch.rand(1, generator=gen) < 0.5]
        if dims:
            x, t = x.flip(dims), t.flip(dims)
        if crop[0] == crop[1]:
            k = int(torch.randint(0, 4, (1,), generator=gen))
            x, t = torch.rot90(x, k, (-2, -1)), torch.rot90(t, k, (-2, -1))
        xs.append(x[0])
        ts.append(t[0, 0].to(torch.uint8))
    return torch.stack(xs), torch.stack(ts)


# ---------------------------------------------------------------- the training set


def points_at(samples: Sequence[Sample], size: tuple[int, int]) -> list[np.ndarray]:
    """Each sample's points file (clicks) as uint8 0/1/IGNORE at ``size``."""
    return [load_points(s.points, size) for s in samples]


@torch.no_grad()
def probed_targets(
    ensemble: Ensemble, samples: Sequence[Sample], size: tuple[int, int], keep: Path | None = None
) -> list[np.ndarray]:
    """Each clicked image's clicks spread into a whole mask at ``size``, as the smart keypoints
    spread them for the annotator (``probe.probe_clicks``): a probe on the first member's
    features, fitted on the ensemble's current mask and the clicks; the clicked pixels keep
    their side. What an annotator who clicked but did not submit the mask would have seen.

    ``keep``: a folder where each mask stays, named by a hash of the image and its clicks, so
    that it is made once, by the version the image was first clicked on, as a submitted mask
    would be; later jobs read it back (new clicks make a new one). A kept file that no longer
    decodes is logged and made again: it is a cache, never a reason for a job to fail."""
    conf = ensemble.config
    out = []
    for s in samples:
        points = load_points(s.points, size)
        clicked = points != IGNORE  # the clicked pixels themselves, exactly as stored
        data = Path(s.image).read_bytes()  # read once: hashed, then decoded
        kept = None
        if keep is not None:
            digest = hashlib.sha256(data + Path(s.points).read_bytes())
            kept = keep / f"{digest.hexdigest()[:32]}.png"
            spread = _read_kept(kept, size)
            if spread is not None:
                spread[clicked] = points[clicked]
                out.append(spread)
                continue
        image = open_image(data)
        pred = ensemble.predict(to_tensor(image, conf.input_size)[None], seed=0, samples=0)
        label = conf.classes.index(s.label) if s.label in conf.classes else None
        shown = ensemble.masks(pred, 0, size, label=label).mask
        shown = np.zeros(size, bool) if shown is None else shown
        features = probe.image_features(ensemble.members[0], image, conf.input_size)
        spread = probe.probe_clicks(features, shown, clicks_in(points)).astype(np.uint8)
        spread[clicked] = points[clicked]
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = kept.with_suffix(".tmp")
            Image.fromarray(spread * 255).save(partial, format="PNG")
            os.replace(partial, kept)  # whole or absent, should a job die while writing
        out.append(spread)
    return out


def _read_kept(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """A kept spread mask at ``size``, or None when there is none or it does not decode."""
    if not path.is_file():
        return None
    try:
        return resize_mask(open_mask(path), size).astype(np.uint8)
    except ImageError as exc:
        log.warning("kept click mask %s is unreadable, making it again: %s", path.name, exc)
        return None


class SegmentationSet:
    """Images at the decoder's scale (uint8, kept once per job) and their pixel targets."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        size: tuple[int, int],
        targets: Sequence[np.ndarray],
    ) -> None:
        ds = ImageDataset(samples, classes, size)
        self.images = torch.stack([ds.image(i) for i in range(len(ds))])
        self.targets = torch.stack([torch.from_numpy(t) for t in targets])
        self.labels = torch.tensor(ds.labels)


def _colour_jitter(strength: float) -> v2.ColorJitter:
    """Brightness / contrast / saturation and a little hue: stain and exposure variation."""
    return v2.ColorJitter(strength, strength, strength, min(0.05, strength / 4))


# ---------------------------------------------------------------- training


class ClassLoss:
    """The classification loss on whole labelled images while the top stage fine-tunes.

    Below the top stage the backbone is frozen (and BatchNorm with it), so each image's trunk
    output never changes during the job: it is computed once here and every step runs only
    the top stage and the head. That is the same loss as ``member(image)``, cheaper: the
    32-mask job's segmentation stage took 487 s with it, 908 s before (docs/masks-and-clicks.md).
    A member without a trunk/top split runs the whole backbone each step."""

    def __init__(
        self,
        member: Member,
        images: torch.Tensor,
        labels: torch.Tensor,
        size: tuple[int, int],
        device: torch.device,
    ) -> None:
        self.member, self.labels, self.size, self.device = member, labels, size, device
        self.trunk: torch.Tensor | None = None
        if member.split is not None and len(images):
            member.eval()
            with torch.no_grad():
                self.trunk = torch.cat([
                    member.trunk_features(self._whole(images[i : i + 16]))
                    for i in range(0, len(images), 16)
                ]).cpu()  # fmt: skip
        # The images themselves only where every step needs them (no cached trunk).
        self.images = images if self.trunk is None else None

    def _whole(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images at the decoder's scale -> float at the model's input size."""
        x = images.float() / 255.0
        return F.interpolate(x, size=self.size, mode="bilinear", antialias=True).to(self.device)

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        y = self.labels[idx].to(self.device)
        if self.trunk is None:
            return F.cross_entropy(self.member(self._whole(self.images[idx])), y)
        h = self.trunk[idx].to(self.device).contiguous(memory_format=torch.channels_last)
        pooled = self.member.top_features(h).mean(dim=(2, 3))
        return F.cross_entropy(self.member.logits_from_pooled(pooled), y)


def _decoder_probs(member: Member, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, 1, h, w) decoder probabilities, one image per forward (images at any size)."""
    member.eval()
    with torch.no_grad():
        return torch.cat([
            torch.sigmoid(member.decode(member.features_and_taps(images[i : i + 1].to(device))[1]))
            for i in range(len(images))
        ]).cpu()  # fmt: skip


def train_member_segmentation(
    member: Member,
    data: SegmentationSet,
    masked: np.ndarray,
    negatives: np.ndarray,
    dense: torch.Tensor,
    model_size: tuple[int, int],
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    held: HeldOut | None = None,
) -> dict[str, Any]:
    """Fine-tune ``member``'s decoder (and top stage) in place on crops of ``data``.

    ``masked``: indices with human masks or clicks; ``negatives``: indices of images whose
    class gets no mask (all-background targets), a quarter of the crops when there are any;
    ``dense``: per image, whether its target is a full mask (else clicks: no Dice term).
    BatchNorm stays frozen (the member in eval mode), and so does everything but the decoder
    unless ``cfg.seg_encoder_lr_factor`` > 0."""
    steps = segmentation_steps(cfg, len(masked))
    gen = torch.Generator().manual_seed(seed)
    jitter = _colour_jitter(cfg.seg_colour_jitter)
    # The top stage and head move only with a positive factor (0: the decoder alone).
    encoder = cfg.seg_encoder_lr_factor > 0
    top = member.top_parameters() if encoder else []
    head = member.head_parameters() if encoder else []
    trainable = {id(p) for p in [*top, *head, *member.decoder_parameters()]}
    frozen = [p for p in member.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    lr = cfg.seg_lr
    groups = [{"params": member.decoder_parameters(), "lr": lr}]
    if encoder:
        slow = lr * cfg.seg_encoder_lr_factor
        groups += [{"params": top, "lr": slow}, {"params": head, "lr": slow}]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, [g["lr"] for g in opt.param_groups], total_steps=max(steps, 1), pct_start=0.1
    )
    labelled = np.flatnonzero(data.labels.numpy() >= 0)
    crop = tuple(model_size)
    targets = data.targets  # replaced by a copy (this member's own) when self-training starts
    clicked = masked[~dense[torch.from_numpy(masked)].numpy()]
    relabel = pseudo_steps(cfg, steps) if len(clicked) else set()
    best = BestCheckpoint()
    history: list[dict[str, float]] = []
    every = max(1, cfg.seg_eval_every)
    start = time.perf_counter()
    member.to(device)
    classify = None
    if encoder and cfg.seg_class_weight > 0 and len(labelled):
        classify = ClassLoss(member, data.images[labelled], data.labels[labelled], crop, device)
        labelled = np.arange(len(labelled))  # indices into the cached images from here on
    # Channels-last convolutions while training (as the classifier's trainer; the saved
    # weights keep the usual layout): the 32-mask job's stage 487 s -> 403 s on this CPU.
    layout = contextlib.ExitStack()
    layout.enter_context(channels_last(member))
    try:
        for step in range(steps):
            member.eval()  # frozen BatchNorm statistics and no dropout: only weights move
            n_neg = 0 if not len(negatives) else cfg.seg_batch_size // 4
            pick = np.concatenate([
                masked[torch.randint(0, len(masked), (cfg.seg_batch_size - n_neg,), generator=gen).numpy()],
                negatives[torch.randint(0, len(negatives), (n_neg,), generator=gen).numpy()]
                if n_neg else np.zeros(0, int),
            ])  # fmt: skip
            if step in relabel:
                targets = data.targets.clone()
                probs = _decoder_probs(member, data.images[clicked].float() / 255.0, device)
                probs = F.interpolate(probs, size=targets.shape[-2:], mode="bilinear")[:, 0]
                targets[clicked] = confident_targets(
                    probs, data.targets[clicked], cfg.seg_click_pseudo_confidence
                )
            x, t = random_crops(
                data.images, targets, torch.from_numpy(pick), crop, cfg.seg_scale_jitter, gen
            )
            if cfg.seg_colour_jitter > 0:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                    x = torch.stack([jitter(im) for im in x])
            x, t = x.to(device).contiguous(memory_format=torch.channels_last), t.to(device)
            with torch.set_grad_enabled(encoder):  # a frozen backbone: no graph through it
                _, taps = member.features_and_taps(x)
            logits = member.decode(taps)
            up = F.interpolate(logits, size=t.shape[-2:], mode="bilinear", align_corners=False)
            batch_dense = dense[torch.from_numpy(pick)].to(device)
            loss = 0.0
            if targets is not data.targets:  # self-training labels: their own BCE, then out
                loss = cfg.seg_click_pseudo_weight * pseudo_loss(up[:, 0], t)
                t = torch.where(t > 1, torch.full_like(t, IGNORE), t)
            loss = loss + segmentation_loss(up[:, 0], t, cfg.seg_dice_weight, batch_dense)
            if cfg.seg_click_affinity_weight > 0 and not batch_dense.all():
                loss = loss + cfg.seg_click_affinity_weight * click_affinity(
                    logits[~batch_dense], x[~batch_dense], cfg
                )
            if classify is not None:
                cls = labelled[
                    torch.randint(0, len(labelled), (cfg.seg_batch_size,), generator=gen).numpy()
                ]
                loss = loss + cfg.seg_class_weight * classify(cls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done = step + 1
            if done % every == 0 or done == steps:
                row = {"step": done, "loss": float(loss.detach())}
                if held is not None:
                    row["held_out_pxap"] = held.score(_decoder_probs(member, held.images, device))
                    best.offer(row["held_out_pxap"], done, member)
                history.append(row)
    finally:
        layout.close()
        for p in frozen:
            p.requires_grad_(True)
    best.restore(member)
    member.eval()
    return {
        "steps": steps,
        "selected_step": best.at or steps,
        "self_training_steps": sorted(relabel),
        "held_out_pxap": best.score,
        "seconds": time.perf_counter() - start,
        "history": history,
    }


def train_segmentation(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    has_mask: Sequence[bool],
    cfg: TrainConfig,
    device: torch.device,
    held_out: Sequence[Sample] = (),
    has_points: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Fine-tune every member as a segmenter on the human masks of ``samples`` (where
    ``has_mask``) and the clicks of the others (where ``has_points``) at ``cfg.seg_scale``;
    set the ensemble's ``decoder_scale`` to it.

    Images of classes that get no masks train as all background. Does nothing without masks,
    clicks or decoders."""
    conf = ensemble.config
    has_points = has_points or [False] * len(samples)
    mask_s = [s for s, m in zip(samples, has_mask, strict=True) if m]
    click_s = [s for s, m, p in zip(samples, has_mask, has_points, strict=True) if p and not m]
    masked_s = mask_s + click_s
    steps = segmentation_steps(cfg, len(masked_s))
    if not conf.decoder or steps == 0:
        return {"skipped": "no human masks or clicks" if conf.decoder else "no decoder"}
    start = time.perf_counter()
    size = scaled_size(conf.image_size, cfg.seg_scale)
    wanted = set(conf.mask_classes or conf.classes)
    negative_s = [s for s in samples if s.label and s.label not in wanted]
    if len(negative_s) > 4 * len(masked_s):  # enough to teach the background, cheap to decode
        rng = np.random.default_rng(cfg.seed)
        negative_s = [negative_s[i] for i in sorted(rng.choice(len(negative_s), 4 * len(masked_s), replace=False))]  # fmt: skip
    # With seg_click_masks the clicks train as the whole mask the probe spreads them into.
    keep = Path(cfg.seg_click_mask_dir) if cfg.seg_click_mask_dir else None
    clicked = probed_targets(ensemble, click_s, size, keep) if cfg.seg_click_masks else None
    targets = [
        *(human_target(s, size) for s in mask_s),
        *(clicked if clicked is not None else points_at(click_s, size)),
        *(np.zeros(size, np.uint8) for _ in negative_s),
    ]
    data = SegmentationSet([*masked_s, *negative_s], conf.classes, size, targets)
    masked = np.arange(len(masked_s))
    negatives = np.arange(len(masked_s), len(masked_s) + len(negative_s))
    dense = torch.ones(len(targets), dtype=torch.bool)
    dense[len(mask_s) : len(masked_s)] = clicked is not None
    held = HeldOut.of(ensemble, held_out, size)
    report: dict[str, Any] = {
        "masks": len(mask_s),
        "clicked": len(click_s),
        "clicks_as": "probed masks" if clicked is not None else "points",
        "negatives": len(negative_s),
        "decoder_scale": cfg.seg_scale,
        "input_size": list(size),
        "held_out_images": [s.name for s in held_out],
    }
    for k, member in enumerate(ensemble.members):
        report[conf.member_keys[k]] = train_member_segmentation(
            member, data, masked, negatives, dense, tuple(conf.image_size), cfg, device,
            cfg.seed + 3000 + k, held,
        )  # fmt: skip
    # A copy: the config object may be shared with the version this one fine-tunes from. The
    # decoder now predicts the annotators' masks: the probability threshold's default again
    # (a weak decoder's CAM-area threshold no longer applies; held-out masks may still set it).
    ensemble.config = dataclasses.replace(
        conf,
        decoder_scale=cfg.seg_scale,
        decoder_threshold=EnsembleConfig.decoder_threshold,
        decoder_segmenter=True,
    )
    report["seconds"] = time.perf_counter() - start
    return report


__all__ = [
    "ClassLoss",
    "SegmentationSet",
    "random_crops",
    "segmentation_loss",
    "segmentation_steps",
    "segmented",
    "soft_dice_loss",
    "train_segmentation",
]
