"""Training each member's decoder with its classifier frozen: CAM seeds, colour affinity, masks.

The NEGEV / F-CAM recipe (``shared/notes/decoder-from-cam-seeds.md``), shaped for a CPU:

1. Classifiers frozen: one forward per member and image gives the CAMs (seeds) and the taps
   (decoder input), cached once; the decoder then trains on the cache, flipped at random.
2. Seeds (``seeds.py``), fresh every step, from seed CAMs computed on the image at 2x the
   model's input (finer cells than the 7x7 CAM): foreground pixels drawn with probability
   proportional to the consensus (min over the members that classify the image right),
   background ones to 1 - their max (NEGEV's probability seeding; uniform sampling inside the
   Otsu region / the lowest pixels stays an option). Partial binary cross-entropy on the seeds.
3. A pairwise colour-affinity term (a local CRF relaxation: neighbours of similar colour get the
   same label) lets the few seeds spread along the image's own edges; an area prior keeps the
   foreground of a positive image neither empty nor everything.
4. Negative evidence: images of classes that get no mask are all background.
5. Human masks get the full pixel loss; once there are some, the other images of mask classes
   get pseudo-masks from the decoder's own confident regions (uncertain band ignored).
6. Selection (the Survey's B-LOC): with pixel-labelled held-out images, each decoder keeps the
   epoch with the best PxAP on them; without any, the last epoch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .calibration import MIN_DECODER_CALIBRATION
from .cam import ANALYTIC, AnalyticCAM, cam_method, normalize_maps, resize_maps
from .data import ImageDataset, Sample
from .decoder_losses import affinity_loss, area_loss, masked_bce, pair_weights, select_offsets
from .ensemble import Ensemble
from .held_out import BestCheckpoint, HeldOut
from .masks import otsu_threshold
from .members import Member, channels_last
from .refined_seeds import probe_refined
from .seeds import multiscale_cams, probability_seeds, sample_seeds, seed_regions
from .supervision import IGNORE, default_cam, pseudo_target
from .train_config import TrainConfig, recipe

# ---------------------------------------------------------------- the per-image plan


@dataclass
class DecoderTargets:
    """What each image teaches, the same for every member's decoder."""

    cams: list[torch.Tensor | None]  # (A, h, w) the agreeing members' seed CAMs; None: no seeds
    negative: list[bool]  # a class without masks: all background
    human: list[torch.Tensor | None]  # (H, W) uint8 at the model's input size
    wanted: list[bool]  # a mask class (seeds, area prior, pseudo-masks apply)
    agree: list[list[int]] = field(default_factory=list)  # the members behind each image's cams

    def reseeded(self, maps: Sequence[torch.Tensor]) -> DecoderTargets:
        """The same plan with each seeded image's cams replaced by the agreeing members'
        ``maps`` (one (N, h, w) tensor per member, e.g. their decoders' probabilities),
        min-max normalised per image as the seed CAMs are."""
        cams = [
            None if c is None else normalize_maps(torch.stack([maps[k][i] for k in self.agree[i]]))
            for i, c in enumerate(self.cams)
        ]
        return dataclasses.replace(self, cams=cams)

    def seed_maps(self, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fg, bg, seeded) on a decoder grid: per image the min (foreground) and max
        (background) of the agreeing members' seed CAMs, (N, h, w); and which images have any."""
        n = len(self.cams)
        fg = np.zeros((n, *grid), np.float32)
        bg = np.ones((n, *grid), np.float32)
        seeded = np.array([c is not None for c in self.cams], bool)
        for i, cams in enumerate(self.cams):
            if cams is not None:
                up = resize_maps(cams, grid).clamp(0, 1).numpy()
                fg[i], bg[i] = up.min(0), up.max(0)
        return fg, bg, seeded

    def seed_cover(self, grid: tuple[int, int]) -> float | None:
        """How much of a seeded image the seed CAMs' consensus (min) covers: the mean share of
        its grid above the map's Otsu threshold; None without seeded images. A label-free size
        of the object (GlaS's glands 0.36, LGG's tumours 0.07 at 56x56; docs/weak-masks.md)."""
        fg, _, seeded = self.seed_maps(grid)
        if not seeded.any():
            return None
        return float(np.mean([(m > otsu_threshold(m)).mean() for m in fg[seeded]]))

    def seed_mass(self, grid: tuple[int, int]) -> float | None:
        """The mean of the seeded images' consensus (min) maps: the area the foreground seeds'
        distribution covers, soft; None without seeded images."""
        fg, _, seeded = self.seed_maps(grid)
        return float(fg[seeded].mean()) if seeded.any() else None

    def seed_regions(
        self, grid: tuple[int, int], cfg: TrainConfig
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per image, where region seeds may be drawn on a decoder grid (``seeds.seed_regions``
        of the consensus min and max)."""
        fg, bg, seeded = self.seed_maps(grid)
        return [
            seed_regions(f, b, cfg.decoder_seed_erode, cfg.decoder_seed_bg_fraction) if s else None
            for f, b, s in zip(fg, bg, seeded, strict=True)
        ]


class SeedDrawer:
    """Fresh seeds for a batch of images on one decoder grid (``cfg.decoder_seeding``)."""

    def __init__(
        self, plan: DecoderTargets, grid: tuple[int, int], cfg: TrainConfig, seed: int
    ) -> None:
        if cfg.decoder_seeding not in ("probability", "region"):
            raise ValueError(
                f"decoder_seeding must be 'probability' or 'region', not {cfg.decoder_seeding!r}"
            )
        self.cfg, self.grid = cfg, grid
        self.rng = np.random.default_rng(seed)
        self.fg, self.bg, self.seeded = plan.seed_maps(grid)
        self.regions = plan.seed_regions(grid, cfg) if cfg.decoder_seeding == "region" else None

    def draw(self, idx: np.ndarray) -> np.ndarray:
        """(B, h, w) uint8 targets for images ``idx``; IGNORE everywhere on unseeded ones."""
        cfg = self.cfg
        if self.regions is not None:
            blank = np.full(self.grid, IGNORE, np.uint8)
            return np.stack([
                blank if self.regions[i] is None
                else sample_seeds(*self.regions[i], cfg.decoder_seed_fg, cfg.decoder_seed_bg, self.rng)
                for i in idx
            ])  # fmt: skip
        out = probability_seeds(
            self.fg[idx], self.bg[idx], cfg.decoder_seed_fg, cfg.decoder_seed_bg, self.rng
        )
        out[~self.seeded[idx]] = IGNORE
        return out


def seed_cam_method(ensemble: Ensemble, cfg: TrainConfig) -> AnalyticCAM:
    """The closed-form CAM the seeds come from: ``cfg.decoder_seed_cam`` or the ensemble's
    (XGrad-CAM when the ensemble's is a library method). A named library method is an error:
    the seed plan needs one forward per image for every class."""
    if not cfg.decoder_seed_cam:
        return default_cam(ensemble.cam)
    return _closed_form(cfg.decoder_seed_cam)


def _closed_form(name: str) -> AnalyticCAM:
    """The closed-form CAM ``name``; ValueError for a library method."""
    method = cam_method(name)
    if not isinstance(method, AnalyticCAM):
        known = ", ".join(sorted(ANALYTIC))
        raise ValueError(f"decoder_seed_cam must be a closed-form CAM ({known}), not {name!r}")
    return method


@torch.no_grad()
def member_probs(ensemble: Ensemble, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(M, N, C) each member's class probabilities from one eval-mode forward per image.

    The plan needs only which members agree on the class, not MC samples, flips or maps: a
    full ``ensemble.predict`` here cost a fifth of the decoder stage's seed plan."""
    out = []
    for member in ensemble.members:
        member.eval()
        device = next(member.parameters()).device
        out.append(
            torch.cat(
                [
                    torch.softmax(member(images[s : s + batch_size].to(device)), -1).float().cpu()
                    for s in range(0, len(images), batch_size)
                ]
            )
        )
    return torch.stack(out)


def plan_targets(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    human: Sequence[np.ndarray | None],
    cfg: TrainConfig,
    batch_size: int = 16,
) -> tuple[torch.Tensor, DecoderTargets]:
    """Images at input size, and what each one teaches.

    Seeds come from the consensus of the members whose class agrees with the image's label
    (all members where none does), from seed CAMs (``seeds.multiscale_cams`` at
    ``cfg.decoder_seed_scales``): the decoder learns from CAMs only.
    """
    conf = ensemble.config
    ds = ImageDataset(samples, conf.classes, conf.image_size)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    wanted_classes = set(conf.mask_classes or conf.classes)
    labels, agree = [], []
    with contextlib.ExitStack() as layout:  # channels-last forwards, as in cache_taps
        for member in ensemble.members:
            layout.enter_context(channels_last(member))
        probs = member_probs(ensemble, images, batch_size)  # (M, N, C)
        member_class, ensemble_class = probs.argmax(-1), probs.mean(0).argmax(-1)
        for i in range(len(ds)):
            label = ds.labels[i] if ds.labels[i] >= 0 else int(ensemble_class[i])
            labels.append(label)
            agree.append(
                (member_class[:, i] == label).nonzero().flatten().tolist()
                or list(range(len(ensemble.members)))
            )
        wanted = [conf.classes[c] in wanted_classes for c in labels]
        seeded = [i for i in range(len(ds)) if wanted[i] and human[i] is None]
        cam = seed_cam_method(ensemble, cfg)
        by_member = (
            [
                multiscale_cams(
                    member,
                    images[seeded],
                    None if conf.map_mode == "max" else [labels[i] for i in seeded],
                    cam,
                    cfg.decoder_seed_scales,
                )
                for member in ensemble.members
            ]
            if seeded
            else []
        )
    cams: list[torch.Tensor | None] = [None] * len(ds)
    for row, i in enumerate(seeded):
        cams[i] = torch.stack([by_member[k][row] for k in agree[i]])
    plan = DecoderTargets(
        cams,
        [not w and ds.labels[i] >= 0 for i, w in enumerate(wanted)],
        [None if h is None else torch.from_numpy(h) for h in human],
        wanted,
        agree,
    )
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


def decoder_epochs(cfg: TrainConfig, images: int, unjudged: bool = False) -> int:
    """``cfg.decoder_epochs``, fewer where ``cfg.decoder_steps`` optimizer steps come first.

    The decoder stage would otherwise grow with the project: the default 150 steps are 30
    epochs of GlaS's 76 training images (5 batches) and 8 of LGG's 313 (20 batches), instead
    of 60 epochs each (1200 steps on LGG). ``unjudged``: a decoder learning from CAM seeds
    alone with no held-out masks to choose its epoch, which then runs at most
    ``cfg.decoder_unjudged_epochs`` passes over each image (and ``cfg.decoder_unjudged_steps``
    steps, where > 0): it learns the seeds' shape in a few passes and then each image's CAM,
    mistakes included.
    """
    steps = cfg.decoder_steps
    if unjudged and cfg.decoder_unjudged_steps > 0:
        steps = cfg.decoder_unjudged_steps if steps <= 0 else min(steps, cfg.decoder_unjudged_steps)
    epochs = cfg.decoder_epochs
    if steps > 0:
        per_epoch = max(1, math.ceil(images / cfg.decoder_batch_size))
        epochs = max(1, min(epochs, math.ceil(steps / per_epoch)))
    if unjudged and cfg.decoder_unjudged_epochs > 0:
        epochs = min(epochs, cfg.decoder_unjudged_epochs)
    return epochs


def _flip(tensors: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    return [t.flip(dims) if dims else t for t in tensors]


def train_decoder(
    member: Member,
    taps: list[torch.Tensor],
    images: torch.Tensor,
    plan: DecoderTargets,
    seeds: SeedDrawer,
    cfg: TrainConfig,
    seed: int,
    held: tuple[HeldOut, list[torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Train ``member.decoder`` in place on cached taps; the classifier is never touched.
    ``seeds``: a drawer on this decoder's grid (that of its finest tap). ``held``: held-out
    images and their taps; the epoch with the best PxAP on them is kept (ties: the later)."""
    device = taps[0].device
    n = len(images)
    grid = tuple(taps[0].shape[-2:])
    small = F.interpolate(images, size=grid, mode="area").to(device)
    weights = pair_weights(small, cfg.decoder_affinity_sigma, cfg.decoder_affinity_dilations)
    decoder = member.decoder
    select = held is not None and cfg.decoder_select == "localization"
    weak_only = all(h is None for h in plan.human)
    epochs = decoder_epochs(cfg, n, unjudged=not select and weak_only)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.decoder_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    gen = torch.Generator().manual_seed(seed)
    negative = torch.tensor(plan.negative, device=device)
    wanted = torch.tensor(plan.wanted, device=device)
    has_human = torch.tensor([h is not None for h in plan.human], device=device)
    blank = torch.full(images.shape[-2:], IGNORE, dtype=torch.uint8)
    human = torch.stack([blank if h is None else h for h in plan.human]).to(device)
    use_pseudo = bool(has_human.any()) and cfg.decoder_pseudo_weight > 0
    pseudo_from = int(cfg.decoder_pseudo_start * epochs)
    best = BestCheckpoint()
    history = []
    for epoch in range(epochs):
        pseudo = None
        if use_pseudo and epoch >= pseudo_from:
            probs = decoder_probs(member, taps)[:, 0].cpu().numpy()
            pseudo = torch.from_numpy(pseudo_target(probs, cfg.pseudo_fg, cfg.pseudo_bg)).to(device)
            pseudo[~(wanted & ~has_human)] = IGNORE
        decoder.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(cfg.decoder_batch_size):
            seed_t = torch.from_numpy(seeds.draw(idx.numpy())).to(device)  # fresh every step
            idx = idx.to(device)
            dims = [d for d, p in ((-1, 0.5), (-2, 0.5)) if torch.rand(1, generator=gen) < p]
            batch_taps = _flip([t[idx] for t in taps], dims)
            seed_t, hum = _flip([seed_t, human[idx]], dims)
            logits = decoder(batch_taps)
            probs = torch.sigmoid(logits)
            loss = cfg.decoder_seed_weight * masked_bce(logits[:, 0], seed_t)
            if cfg.decoder_affinity_weight > 0:  # on the unflipped grid its weights were made on
                (upright,) = _flip([probs], dims)
                loss = loss + cfg.decoder_affinity_weight * affinity_loss(
                    upright, select_offsets(weights, idx)
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
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": total / max(steps, 1)}
        if select:
            row["held_out_pxap"] = held[0].score(decoder_probs(member, held[1]))
            best.offer(row["held_out_pxap"], epoch + 1, decoder)
        history.append(row)
    best.restore(decoder)
    decoder.eval()
    return {
        "epochs": epochs,
        "selected_epoch": best.at or epochs,
        "select": "localization" if best.at is not None else "last",
        "held_out_pxap": best.score,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }


def check_decoder_settings(cfg: TrainConfig) -> None:
    """Raise ValueError for decoder settings the decoder stage would reject, so a bad value
    fails before the classifiers train rather than after (the trainer calls it first)."""
    if cfg.decoder_select not in ("localization", "last"):
        raise ValueError(
            f"decoder_select must be 'localization' or 'last', not {cfg.decoder_select!r}"
        )
    if not cfg.decoder_seed_scales or min(cfg.decoder_seed_scales) <= 0:
        raise ValueError(f"decoder_seed_scales must be positive, got {cfg.decoder_seed_scales}")
    for rcfg in (cfg, *(recipe(cfg, text) for text in cfg.decoder_recipes)):
        if rcfg.decoder_seeding not in ("probability", "region"):
            raise ValueError(
                f"decoder_seeding must be 'probability' or 'region', not {rcfg.decoder_seeding!r}"
            )
        if rcfg.decoder_seed_cam:
            _closed_form(rcfg.decoder_seed_cam)


def train_decoders(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    human: Sequence[np.ndarray | None],
    cfg: TrainConfig,
    device: torch.device,
    held_out: Sequence[Sample] = (),
) -> dict[str, Any]:
    """Train every member's decoder after its classifier; ``human``: one target or None per
    sample (uint8 0/1/IGNORE at the input size, e.g. the annotators' masks). ``held_out``:
    pixel-labelled images that choose each decoder's epoch (``cfg.decoder_select``)."""
    if cfg.decoder_epochs <= 0:
        return {"skipped": "decoder_epochs is 0"}
    check_decoder_settings(cfg)
    start = time.perf_counter()
    held = HeldOut.of(ensemble, held_out) if cfg.decoder_select == "localization" else None
    # Other recipes only where held-out masks can tell them apart.
    others = {text: recipe(cfg, text) for text in cfg.decoder_recipes}  # validated either way
    recipes = {"default": cfg, **(others if held is not None else {})}
    plans: dict[tuple, tuple[torch.Tensor, DecoderTargets]] = {}  # by what the seeds depend on

    def plan_for(rcfg: TrainConfig) -> tuple[torch.Tensor, DecoderTargets]:
        key = (rcfg.decoder_seed_scales, rcfg.decoder_seed_cam)
        if key not in plans:
            plans[key] = plan_targets(ensemble, samples, human, rcfg)
        return plans[key]

    images, plan = plan_for(cfg)
    report: dict[str, Any] = {
        "images": len(samples),
        "seeded": sum(c is not None for c in plan.cams),
        "negative": sum(plan.negative),
        "human_masks": sum(h is not None for h in plan.human),
        "seeding": cfg.decoder_seeding,
        "seed_scales": list(cfg.decoder_seed_scales),
        "held_out_images": [s.name for s in held_out] if held is not None else [],
    }
    fresh_states: list[dict[str, torch.Tensor]] = []
    maps: list[torch.Tensor] = []  # each member's decoder probabilities of the images
    for k, member in enumerate(ensemble.members):
        taps = cache_taps(member, images, device)
        grid = tuple(taps[0].shape[-2:])
        held_taps = (held, cache_taps(member, held.images, device)) if held is not None else None
        fresh = copy.deepcopy(member.decoder.state_dict())
        best: tuple[float, str, dict[str, Any], dict[str, torch.Tensor]] | None = None
        scores: dict[str, float | None] = {}
        for name, rcfg in recipes.items():
            member.decoder.load_state_dict(fresh)
            _, rplan = plan_for(rcfg)
            seeds = SeedDrawer(rplan, grid, rcfg, cfg.seed + 2000 + k)
            rep = train_decoder(
                member, taps, images, rplan, seeds, rcfg, cfg.seed + 1000 + k, held_taps
            )
            score = rep["held_out_pxap"]
            scores[name] = score
            better = best is None or (score is not None and score > best[0])
            if better:
                state = copy.deepcopy(member.decoder.state_dict()) if len(recipes) > 1 else {}
                best = (score if score is not None else -math.inf, name, rep, state)
        if len(recipes) > 1:
            member.decoder.load_state_dict(best[3])
        report[ensemble.config.member_keys[k]] = {
            **best[2],
            "recipe": best[1],
            "recipe_held_out_pxap": scores,
        }
        fresh_states.append(fresh)
        maps.append(decoder_probs(member, taps)[:, 0].cpu())  # what a self-seed round seeds from
        del taps, held_taps
    keys = ensemble.config.member_keys
    active = list(range(len(ensemble.members)))
    # One or two held-out masks choose the epoch but judge no round: a round kept because it
    # scored higher on one image lost to the unjudged rounds on six others (GlaS PxAP 73.3 and
    # 73.8 with 1 and 2 such masks against 74.4 with none; docs/weak-masks.md).
    judge = held if held is not None and len(held.truths) >= MIN_DECODER_CALIBRATION else None
    # What the seeds the decoders last learned from cover: a weak decoder's masks are cut to
    # their mass when no held-out masks calibrate them (calibration.weak_decoder_threshold).
    at = cover_grid(images)
    cam_cover = plan.seed_cover(at)  # also what gates unjudged probe rounds
    report["seed_area"] = seed_area(plan, at, "cam", cam_cover)
    probes = probe_rounds(cam_cover, cfg, judge, report)
    for r in range(probes):
        refined = probe_seed_maps(ensemble, images, plan, maps)
        done = self_seed_round(
            ensemble, images, plan, refined, recipes, report, fresh_states, cfg, device, judge,
            r + 1, active, "probe",
        )  # fmt: skip
        report[f"probe_round_{r + 1}"] = done
        maps = [refined[k] if done[keys[k]]["kept"] else maps[k] for k in range(len(maps))]
        if any(d["kept"] for d in done.values()):
            # self_seed_round replaced each kept member's entry of ``refined`` by its new
            # decoder's probabilities: this is the size of the maps a next round would seed
            # from, the decoders' own after the round, not of the probe's re-fit they drew from.
            last = plan.reseeded(refined)
            report["seed_area"] = seed_area(last, at, f"probe_round_{r + 1}", last.seed_cover(at))
    # Self-seed rounds only on the weak path (with human masks the segmenter, mask_training.py,
    # takes over) and where three or more held-out masks judge each round: without them a
    # round is as likely to lose as to gain (GlaS held-out PxAP 64.5 / 64.7 after 1 / 2 rounds
    # against 64.8 without; 69.9 after 3 against 70.3 with decoder_unjudged_epochs' 8 passes).
    rounds = cfg.decoder_self_seed_rounds if report["human_masks"] == 0 and judge else 0
    for r in range(rounds):
        done = self_seed_round(
            ensemble, images, plan, maps, recipes, report, fresh_states, cfg, device, judge, r + 1,
            active,
        )  # fmt: skip
        report[f"self_seed_round_{r + 1}"] = done
        # A member whose new decoder lost is settled: retraining it on seeds that moved only
        # where the others' maps moved rarely wins (synthetic disks: 0 of 2 later rounds) and
        # costs a full decoder training each round.
        active = [k for k in active if done[keys[k]]["kept"]]
        if not active:
            break  # no map changed: the next round would draw from the same maps
    report["seconds"] = time.perf_counter() - start
    return report


def cover_grid(images: torch.Tensor) -> tuple[int, int]:
    """Where seed covers are measured: the Lite decoders' finest grid, a quarter of the input
    (the probe gate's 0.15 was set on it)."""
    return images.shape[-2] // 4, images.shape[-1] // 4


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def seed_area(
    plan: DecoderTargets, grid: tuple[int, int], seeds: str, cover: float | None
) -> dict[str, Any]:
    """What the seeds of ``plan`` cover, hard (``cover``: its ``seed_cover``) and soft, and
    where they came from."""
    return {
        "cover": _rounded(cover),
        "mass": _rounded(plan.seed_mass(grid)),
        "seeds": seeds,
    }


def probe_rounds(
    cover: float | None, cfg: TrainConfig, held: HeldOut | None, report: dict[str, Any]
) -> int:
    """How many probe rounds run: only on the weak path (no human masks). With held-out masks
    that judge (``held``) ``cfg.decoder_probe_rounds``, each judged by them. Without, every
    round is kept, so ``cfg.decoder_unjudged_probe_rounds`` run only where the objects are
    large enough for the probe (``cover``: the seed CAMs' ``seed_cover``): its two sides weigh
    half each, and on a finding of a few of its cells it spreads the finding (LGG, seed cover
    0.07: held-out PxAP 65.8 -> 23.9 after 3 unjudged rounds; GlaS, 0.36: 70.7 -> 73.0). The
    gate is recorded in ``report["probe_gate"]``."""
    if report["human_masks"] > 0:
        return 0
    if held is not None:
        return cfg.decoder_probe_rounds
    opened = cover is not None and cover >= cfg.decoder_probe_min_cover
    report["probe_gate"] = {
        "seed_cover": _rounded(cover),
        "min_cover": cfg.decoder_probe_min_cover,
        "open": opened,
    }
    return cfg.decoder_unjudged_probe_rounds if opened else 0


def probe_seed_maps(
    ensemble: Ensemble, images: torch.Tensor, plan: DecoderTargets, maps: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Each member's ``maps`` with every seeded image's replaced by the agreeing members'
    consensus (min) re-fitted per image by a probe on the first member's features."""
    consensus = [
        None if c is None else torch.stack([maps[k][i] for k in plan.agree[i]]).amin(0)
        for i, c in enumerate(plan.cams)
    ]
    refined = probe_refined(ensemble.members[0], images, consensus)
    out = [m.clone() for m in maps]
    for i, r in enumerate(refined):
        if r is not None:
            for m in out:
                m[i] = resize_maps(r[None], tuple(m.shape[-2:]))[0]
    return out


def self_seed_round(
    ensemble: Ensemble,
    images: torch.Tensor,
    plan: DecoderTargets,
    maps: list[torch.Tensor],
    recipes: dict[str, TrainConfig],
    report: dict[str, Any],
    fresh_states: Sequence[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    held: HeldOut | None,
    round_no: int,
    active: Sequence[int],
    kind: str = "self_seed",
) -> dict[str, Any]:
    """Retrain every decoder from scratch on seeds drawn from the decoders' own consensus
    (``maps``: each member's decoder probabilities of ``images``, updated in place; ``kind``
    "probe": those maps re-fitted by ``probe_seed_maps``).

    A decoder trained on CAM seeds localizes better than the CAM it learned from (on GlaS
    66 vs 57 PxAP) and on a 4x finer grid, so its map is a better seed map than the CAM.
    A member keeps the new decoder only where it scores at least the old one's PxAP on the
    held-out masks (``held`` None: always; only unjudged probe rounds run so). ``active``: the
    members to retrain; the others keep theirs and are left out of the round's report.
    """
    keys = ensemble.config.member_keys
    new_plan = plan.reseeded(maps)
    out: dict[str, Any] = {}
    for k, member in enumerate(ensemble.members):
        if k not in active:
            continue
        mine = report[keys[k]]
        rcfg = recipes[mine["recipe"]]
        if cfg.decoder_self_seed_steps > 0:
            rcfg = dataclasses.replace(rcfg, decoder_steps=cfg.decoder_self_seed_steps)
        old = copy.deepcopy(member.decoder.state_dict())
        member.decoder.load_state_dict(fresh_states[k])
        taps = cache_taps(member, images, device)
        held_taps = (held, cache_taps(member, held.images, device)) if held is not None else None
        grid = tuple(taps[0].shape[-2:])
        base = cfg.seed + (3000 if kind == "self_seed" else 5000) + k * 7 + round_no
        seeds = SeedDrawer(new_plan, grid, rcfg, base)
        step_seed = base + 1000
        rep = train_decoder(member, taps, images, new_plan, seeds, rcfg, step_seed, held_taps)
        before, after = mine["held_out_pxap"], rep["held_out_pxap"]
        kept = before is None or after is None or after >= before
        if kept:
            report[keys[k]] = {**mine, **rep, f"{kind}_rounds": round_no}
            maps[k] = decoder_probs(member, taps)[:, 0].cpu()
        else:
            member.decoder.load_state_dict(old)
        out[keys[k]] = {
            "held_out_pxap": after,
            "previous_held_out_pxap": before,
            "epochs": rep["epochs"],
            "selected_epoch": rep["selected_epoch"],
            "kept": kept,
        }
        del taps, held_taps
    return out
