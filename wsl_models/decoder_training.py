"""Training each member's decoder with its classifier frozen: CAM seeds, colour affinity, masks.

The NEGEV / F-CAM recipe (``shared/notes/decoder-from-cam-seeds.md``), shaped for a CPU:

1. Classifiers frozen: one forward per member and image gives the CAMs (seeds) and the taps
   (decoder input), cached once; the decoder then trains on the cache, flipped at random.
2. Seeds, re-drawn every epoch: confident foreground where the consensus (min over the members
   that classify the image right) is above its Otsu threshold, eroded; confident background
   among the lowest values of their max. Partial binary cross-entropy on the seeds only.
3. A pairwise colour-affinity term (a local CRF relaxation: neighbours of similar colour get the
   same label) lets the few seeds spread along the image's own edges; an area prior keeps the
   foreground of a positive image neither empty nor everything.
4. Negative evidence: images of classes that get no mask are all background.
5. Human masks get the full pixel loss; once there are some, the other images of mask classes
   get pseudo-masks from the decoder's own confident regions (uncertain band ignored).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from .cam import resize_maps
from .data import ImageDataset, Sample
from .ensemble import Ensemble
from .masks import otsu_threshold
from .members import Member, channels_last
from .supervision import IGNORE, pseudo_target
from .train_config import TrainConfig

# ---------------------------------------------------------------- pure functions


def seed_regions(
    fg_map: np.ndarray, bg_map: np.ndarray, erode: int, bg_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Where seeds may be drawn: (confident foreground, confident background), disjoint.

    Foreground: ``fg_map`` above its Otsu threshold, eroded ``erode`` times (kept un-eroded
    when erosion would empty it). Background: the ``bg_fraction`` lowest pixels of ``bg_map``.
    A constant map gives no foreground.
    """
    t = otsu_threshold(fg_map)
    fg = fg_map > t
    if erode > 0 and fg.any():
        eroded = ndimage.binary_erosion(fg, iterations=erode)
        fg = eroded if eroded.any() else fg
    cut = np.quantile(bg_map, bg_fraction) if bg_fraction > 0 else -np.inf
    bg = (bg_map <= cut) & ~fg
    return fg, bg


def sample_seeds(
    fg: np.ndarray, bg: np.ndarray, n_fg: int, n_bg: int, rng: np.random.Generator
) -> np.ndarray:
    """A uint8 target: ``n_fg`` pixels of ``fg`` = 1, ``n_bg`` of ``bg`` = 0, the rest IGNORE."""
    out = np.full(fg.shape, IGNORE, np.uint8)
    for region, n, value in ((fg, n_fg, 1), (bg, n_bg, 0)):
        idx = np.flatnonzero(region)
        if len(idx) and n > 0:
            out.flat[rng.choice(idx, size=min(n, len(idx)), replace=False)] = value
    return out


def _pairs(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): every pixel and its neighbour at offset (dy >= 0, dx), both cropped to fit."""
    h, w = t.shape[-2:]
    a = t[..., : h - dy, max(0, -dx) : w - max(0, dx)]
    b = t[..., dy:, max(0, dx) : w + min(0, dx)]
    return a, b


Offsets = list[tuple[int, int, torch.Tensor]]


def pair_weights(image: torch.Tensor, sigma: float, dilations: Sequence[int]) -> Offsets:
    """For each offset (d, 0), (0, d), (d, d), (d, -d): exp(-|I_a - I_b|^2 / 2 sigma^2) of every
    pixel pair (B, 1, ...). They depend on the image only: computed once per training run."""
    out: Offsets = []
    for d in dilations:
        for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):
            if dy >= image.shape[-2] or abs(dx) >= image.shape[-1]:
                continue
            ia, ib = _pairs(image, dy, dx)
            out.append((dy, dx, torch.exp(-((ia - ib) ** 2).sum(1, keepdim=True) / (2 * sigma**2))))
    return out


def affinity_loss(probs: torch.Tensor, weights: Offsets) -> torch.Tensor:
    """Colour-weighted disagreement of neighbouring pixels (a local dense-CRF relaxation):
    the ``pair_weights``-weighted mean of the Potts relaxation p_a (1 - p_b) + p_b (1 - p_a).
    probs (B, 1, h, w) foreground probability, on the grid the weights were made on."""
    total = probs.new_zeros(())
    norm = probs.new_zeros(())
    for dy, dx, w in weights:
        pa, pb = _pairs(probs, dy, dx)
        total = total + (w * (pa * (1 - pb) + pb * (1 - pa))).sum()
        norm = norm + w.sum()
    return total / norm.clamp_min(1e-6)


def _select(weights: Offsets, idx: torch.Tensor) -> Offsets:
    return [(dy, dx, w[idx]) for dy, dx, w in weights]


def area_loss(probs: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Mean over images of how far the foreground fraction lies outside [low, high]."""
    fraction = probs.flatten(1).mean(1)
    return (F.relu(low - fraction) + F.relu(fraction - high)).mean()


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the pixels of ``target`` (uint8) that are not IGNORE."""
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid], (target[valid] == 1).float())


# ---------------------------------------------------------------- the per-image plan


@dataclass
class DecoderTargets:
    """What each image teaches, the same for every member's decoder."""

    cams: list[torch.Tensor | None]  # (A, h, w) the agreeing members' CAMs; None: no seeds
    negative: list[bool]  # a class without masks: all background
    human: list[torch.Tensor | None]  # (H, W) uint8 at the model's input size
    wanted: list[bool]  # a mask class (seeds, area prior, pseudo-masks apply)

    def seed_regions(
        self, grid: tuple[int, int], cfg: TrainConfig
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per image, where seeds may be drawn on a decoder grid: the min (foreground) and max
        (background) of the agreeing members' CAMs resized to it."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for cams in self.cams:
            if cams is None:
                out.append(None)
                continue
            up = resize_maps(cams, grid).clamp(0, 1).numpy()
            out.append(
                seed_regions(
                    up.min(0), up.max(0), cfg.decoder_seed_erode, cfg.decoder_seed_bg_fraction
                )
            )
        return out


def plan_targets(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    human: Sequence[np.ndarray | None],
    cfg: TrainConfig,
    batch_size: int = 16,
) -> tuple[torch.Tensor, DecoderTargets]:
    """Images at input size, and what each one teaches.

    Seeds come from the consensus of the members whose class agrees with the image's label
    (all members where none does), from the CAM source: the decoder learns from CAMs only.
    """
    conf = ensemble.config
    ds = ImageDataset(samples, conf.classes, conf.image_size)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    wanted_classes = set(conf.mask_classes or conf.classes)
    plan = DecoderTargets([], [], [], [])
    with contextlib.ExitStack() as layout:  # channels-last forwards, as in cache_taps
        for member in ensemble.members:
            layout.enter_context(channels_last(member))
        outs = [
            ensemble.predict(images[s : s + batch_size], seed=cfg.seed)
            for s in range(0, len(ds), batch_size)
        ]
    for start, out in zip(range(0, len(ds), batch_size), outs, strict=True):
        member_class = out.member_probs.argmax(-1)  # (M, B)
        for b in range(len(out.label)):
            i = start + b
            label = ds.labels[i] if ds.labels[i] >= 0 else int(out.label[b])
            wanted = conf.classes[label] in wanted_classes
            agree = (member_class[:, b] == label).nonzero().flatten().tolist() or list(
                range(len(ensemble.members))
            )
            seeded = wanted and human[i] is None
            plan.cams.append(ensemble.source_maps(out, b, label, "cam")[agree] if seeded else None)
            plan.negative.append(not wanted and ds.labels[i] >= 0)
            plan.wanted.append(wanted)
            plan.human.append(None if human[i] is None else torch.from_numpy(human[i]))
    return images, plan


# ---------------------------------------------------------------- training


@torch.no_grad()
def cache_taps(
    member: Member, images: torch.Tensor, device: torch.device, batch_size: int = 16
) -> list[torch.Tensor]:
    """The frozen backbone's taps of every image (one forward each), on ``device``."""
    member.eval()
    chunks: list[list[torch.Tensor]] = []
    # Channels-last backbone forwards (1.7x faster here); the decoder trains on contiguous
    # taps (channels-last taps made its backward slower).
    with channels_last(member):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            _, taps = member.features_and_taps(x.contiguous(memory_format=torch.channels_last))
            chunks.append([t.float().contiguous() for t in taps])
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


@torch.no_grad()
def decoder_probs(member: Member, taps: list[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """(N, 1, h, w) foreground probabilities of the cached images."""
    member.decoder.eval()
    out = [
        torch.sigmoid(member.decode([t[s : s + batch_size] for t in taps]))
        for s in range(0, len(taps[0]), batch_size)
    ]
    return torch.cat(out)


def decoder_epochs(cfg: TrainConfig, images: int) -> int:
    """``cfg.decoder_epochs``, fewer where ``cfg.decoder_steps`` optimizer steps come first.

    The default schedule (60 epochs) was set on GlaS's 72 training images: 5 batches, 300
    steps. A 300-image project gets the same 300 steps in 15 epochs instead of 1200 steps
    (the decoder stage would otherwise grow with the project, 4x on LGG's 313 images).
    """
    if cfg.decoder_steps <= 0:
        return cfg.decoder_epochs
    per_epoch = max(1, math.ceil(images / cfg.decoder_batch_size))
    return max(1, min(cfg.decoder_epochs, math.ceil(cfg.decoder_steps / per_epoch)))


def _flip(tensors: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    return [t.flip(dims) if dims else t for t in tensors]


def train_decoder(
    member: Member,
    taps: list[torch.Tensor],
    images: torch.Tensor,
    plan: DecoderTargets,
    regions: list[tuple[np.ndarray, np.ndarray] | None],
    cfg: TrainConfig,
    seed: int,
) -> dict[str, Any]:
    """Train ``member.decoder`` in place on cached taps; the classifier is never touched.
    ``regions``: ``plan.seed_regions`` on this decoder's grid (that of its finest tap)."""
    device = taps[0].device
    n = len(images)
    grid = tuple(taps[0].shape[-2:])
    small = F.interpolate(images, size=grid, mode="area").to(device)
    weights = pair_weights(small, cfg.decoder_affinity_sigma, cfg.decoder_affinity_dilations)
    decoder = member.decoder
    epochs = decoder_epochs(cfg, n)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.decoder_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    negative = torch.tensor(plan.negative, device=device)
    wanted = torch.tensor(plan.wanted, device=device)
    has_human = torch.tensor([h is not None for h in plan.human], device=device)
    blank = torch.full(images.shape[-2:], IGNORE, dtype=torch.uint8)
    human = torch.stack([blank if h is None else h for h in plan.human]).to(device)
    use_pseudo = bool(has_human.any()) and cfg.decoder_pseudo_weight > 0
    pseudo_from = int(cfg.decoder_pseudo_start * epochs)
    history = []
    for epoch in range(epochs):
        seeds = torch.from_numpy(
            np.stack(
                [
                    sample_seeds(*region, cfg.decoder_seed_fg, cfg.decoder_seed_bg, rng)
                    if region is not None
                    else np.full(grid, IGNORE, np.uint8)
                    for region in regions
                ]
            )
        ).to(device)
        pseudo = None
        if use_pseudo and epoch >= pseudo_from:
            probs = decoder_probs(member, taps)[:, 0].cpu().numpy()
            pseudo = torch.from_numpy(pseudo_target(probs, cfg.pseudo_fg, cfg.pseudo_bg)).to(device)
            pseudo[~(wanted & ~has_human)] = IGNORE
        decoder.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(cfg.decoder_batch_size):
            idx = idx.to(device)
            dims = [d for d, p in ((-1, 0.5), (-2, 0.5)) if torch.rand(1, generator=gen) < p]
            batch_taps = _flip([t[idx] for t in taps], dims)
            seed_t, hum = _flip([seeds[idx], human[idx]], dims)
            logits = decoder(batch_taps)
            probs = torch.sigmoid(logits)
            loss = cfg.decoder_seed_weight * masked_bce(logits[:, 0], seed_t)
            if cfg.decoder_affinity_weight > 0:  # on the unflipped grid its weights were made on
                (upright,) = _flip([probs], dims)
                loss = loss + cfg.decoder_affinity_weight * affinity_loss(
                    upright, _select(weights, idx)
                )
            pos = wanted[idx] & ~has_human[idx]
            if cfg.decoder_area_weight > 0 and pos.any():
                lo, hi = cfg.decoder_area
                loss = loss + cfg.decoder_area_weight * area_loss(probs[pos], lo, hi)
            neg = negative[idx]
            if cfg.decoder_negative_weight > 0 and neg.any():
                loss = loss + cfg.decoder_negative_weight * F.binary_cross_entropy_with_logits(
                    logits[neg], torch.zeros_like(logits[neg])
                )
            if has_human[idx].any():
                up = F.interpolate(logits, size=hum.shape[-2:], mode="bilinear")
                loss = loss + cfg.decoder_mask_weight * masked_bce(up[:, 0], hum)
            if pseudo is not None:
                (pseudo_t,) = _flip([pseudo[idx]], dims)
                loss = loss + cfg.decoder_pseudo_weight * masked_bce(logits[:, 0], pseudo_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        sched.step()
        history.append({"epoch": epoch + 1, "loss": total / max(steps, 1)})
    decoder.eval()
    return {"epochs": epochs, "final_loss": history[-1]["loss"] if history else None,
            "history": history}  # fmt: skip


def train_decoders(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    human: Sequence[np.ndarray | None],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Train every member's decoder after its classifier; ``human``: one target or None per
    sample (uint8 0/1/IGNORE at the input size, e.g. the annotators' masks)."""
    if cfg.decoder_epochs <= 0:
        return {"skipped": "decoder_epochs is 0"}
    start = time.perf_counter()
    images, plan = plan_targets(ensemble, samples, human, cfg)
    report: dict[str, Any] = {
        "images": len(samples),
        "seeded": sum(c is not None for c in plan.cams),
        "negative": sum(plan.negative),
        "human_masks": sum(h is not None for h in plan.human),
    }
    regions: dict[tuple[int, ...], list] = {}  # by decoder grid: members mostly share one
    for k, member in enumerate(ensemble.members):
        taps = cache_taps(member, images, device)
        grid = tuple(taps[0].shape[-2:])
        if grid not in regions:
            regions[grid] = plan.seed_regions(grid, cfg)
        report[ensemble.config.member_keys[k]] = train_decoder(
            member, taps, images, plan, regions[grid], cfg, cfg.seed + 1000 + k
        )
        del taps
    report["seconds"] = time.perf_counter() - start
    return report
