"""The ensemble: one forward pass per member -> class, MC-Dropout uncertainty, CAMs, consensus mask."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .cam import AnalyticCAM, cam_method, normalize_maps, resize_maps
from .distributed import amp_settings, autocast
from .images import scaled_size
from .masks import Threshold, binarize, intersect, remove_small_components
from .members import Member, member_spec
from .tiling import STRIDE, TILE_MARGIN, tiled_map
from .uncertainty import MEASURES, mc_dropout_probs, member_disagreement

MAP_SOURCES = ("cam", "localizer", "decoder")
# Flip test-time augmentation by name: (tta_flip, tta_vflip) of EnsembleConfig.
TTA_VIEWS = {"none": (False, False), "mirror": (True, False), "four": (True, True)}


@dataclass
class EnsembleConfig:
    """Everything needed to rebuild and run an ensemble; stored in each model version."""

    classes: list[str]
    members: list[str]
    image_size: tuple[int, int] = (224, 224)  # (H, W); CAMs are 1/stride of this
    dropout: float = 0.5
    output_stride: int = 32  # 16: last stage dilated, CAMs twice as fine (about 1.5-2x compute)
    mc_samples: int = 30
    cam_method: str = "xgradcam"
    mask_classes: list[str] | None = None  # None: every class gets a mask
    # Per-member thresholds, and one for the intersection (applied to every agreeing member)
    # and one for the mean map. Numbers in [0, 1] or "otsu".
    member_thresholds: dict[str, Threshold] = field(default_factory=dict)
    intersection_threshold: Threshold | None = None  # None: each member's own threshold
    mean_threshold: Threshold = "otsu"
    review_measure: str = "entropy"
    review_threshold: float | None = None  # flag above this; None: only disagreement flags
    min_agree: int = 2
    min_area_fraction: float = 0.0005
    # "class": the map of the ensemble's class. "max": the pixel-wise max over every class's
    # normalised map, for datasets whose foreground is the same kind of object in every class
    # (GlaS: glands in benign and malignant images alike).
    map_mode: str = "class"
    # Average every map (CAM, localizer, decoder) with the mirrored image's (2x backbone);
    # with tta_vflip too, also with the upside-down and both-ways flipped images' (4x).
    tta_flip: bool = False
    tta_vflip: bool = False  # only with tta_flip: set both by name with ``set_tta``
    # Members carry a min-max entropy localizer head (trained with TrainConfig.minmax) and/or a
    # full-resolution decoder (decoder.py, trained from CAM seeds and masks), and where the
    # pre-annotation comes from: "cam" (the CAM method), "localizer" or "decoder" (those heads;
    # class-agnostic: the same map for every class); None: "decoder" with a decoder, else
    # "cam". Versions saved before the decoder existed load with decoder=False (``from_dict``).
    localizer: bool = False
    decoder: bool = True
    map_source: str | None = None
    # The decoder map is a probability (not min-max normalised): one threshold for every
    # agreeing member, calibrated on pixel-labelled held-out images where there are some.
    decoder_threshold: Threshold = 0.5
    # The decoder runs on the image at this multiple of image_size (mask_training.py sets it
    # once human masks trained it at that scale); the classifier always at image_size.
    decoder_scale: float = 1.0
    # Whether human masks or clicks trained the decoder (mask_training.py sets it). Versions
    # saved before the flag are told by their decoder_scale > 1 (``segmented``).
    decoder_segmenter: bool = False
    # Past this many pixels a side, the decoder runs on overlapping tiles (tiling.py) instead
    # of one forward of the whole scaled image, which bounds its memory.
    decoder_tile: int = 1024

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        if not 1.0 <= float(self.decoder_scale) <= 4.0:
            raise ValueError(f"decoder_scale must be in [1, 4], got {self.decoder_scale}")
        if self.decoder_tile < 4 * TILE_MARGIN or self.decoder_tile % STRIDE:
            raise ValueError(
                f"decoder_tile must be a multiple of {STRIDE} and at least {4 * TILE_MARGIN}, "
                f"got {self.decoder_tile}"
            )
        if self.map_source is None:
            self.map_source = "decoder" if self.decoder else "cam"
        if self.tta_vflip and not self.tta_flip:
            raise ValueError("tta_vflip needs tta_flip (the four views include the mirrored one)")
        if self.map_mode not in ("class", "max"):
            raise ValueError(f"map_mode must be 'class' or 'max', not {self.map_mode!r}")
        if self.map_source not in MAP_SOURCES:
            raise ValueError(
                f"map_source must be one of {', '.join(MAP_SOURCES)}, not {self.map_source!r}"
            )
        if self.map_source == "localizer" and not self.localizer:
            raise ValueError("map_source 'localizer' needs members with a localizer head")
        if self.map_source == "decoder" and not self.decoder:
            raise ValueError("map_source 'decoder' needs members with a decoder (decoder=True)")
        if self.review_measure not in MEASURES:
            raise ValueError(f"unknown review measure {self.review_measure!r}")
        unknown = set(self.mask_classes or []) - set(self.classes)
        if unknown:
            raise ValueError(f"mask classes {sorted(unknown)} are not model classes {self.classes}")
        cam_method(self.cam_method)  # validates the name
        for name in self.members:
            member_spec(name)
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        if len(self.classes) < 2:
            raise ValueError("a classifier needs at least two classes")

    def set_tta(self, name: str) -> None:
        """Flip test-time augmentation by its ``TTA_VIEWS`` name: none, mirror or four."""
        if name not in TTA_VIEWS:
            raise ValueError(f"unknown TTA {name!r}: use one of {', '.join(TTA_VIEWS)}")
        self.tta_flip, self.tta_vflip = TTA_VIEWS[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnsembleConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("decoder", False)  # saved before decoders: CAM or localizer maps
        values.setdefault("map_source", "cam")
        return cls(**values)

    @property
    def sources(self) -> list[str]:
        """The map sources this ensemble's members can produce."""
        return [
            "cam",
            *(["localizer"] if self.localizer else []),
            *(["decoder"] if self.decoder else []),
        ]

    def mean_threshold_for(self, source: str) -> Threshold:
        """The mean map's threshold: the decoder's probability threshold, or the CAMs' own."""
        return self.decoder_threshold if source == "decoder" else self.mean_threshold

    def threshold_for(self, member: str, source: str | None = None) -> Threshold:
        if (source or self.map_source) == "decoder":
            return self.decoder_threshold
        if self.intersection_threshold is not None:
            return self.intersection_threshold
        return self.member_thresholds.get(member, "otsu")

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images ``Ensemble.predict`` takes: image_size, times decoder_scale
        (rounded up to 32) for a decoder trained at a larger scale."""
        if not self.decoder or self.decoder_scale == 1.0:
            return self.image_size
        return scaled_size(self.image_size, self.decoder_scale)

    @property
    def member_keys(self) -> list[str]:
        """Unique member keys ("0-resnet50", ...): the same architecture may appear twice."""
        return [f"{k}-{n}" for k, n in enumerate(self.members)]


@dataclass
class EnsembleOutput:
    """Batch results. M members, T MC samples, B images, C classes."""

    member_keys: list[str]
    mc_probs: torch.Tensor  # (M, T, B, C)
    cams: list[torch.Tensor]  # per member (B, C, h, w), each map normalised to [0, 1]
    probs: torch.Tensor  # (B, C) mean over members and samples
    label: torch.Tensor  # (B,)
    agree: torch.Tensor  # (M, B) bool: member's class == ensemble class
    uncertainty: dict[str, torch.Tensor]  # name -> (B,)
    flagged: torch.Tensor  # (B,) bool
    # (B, D) each member's pooled features, L2-normalised, concatenated: what batch diversity
    # compares (two images the ensemble "sees" alike get a cosine similarity near 1).
    embeddings: torch.Tensor | None = None
    # Per member (B, 1, h, w), class-agnostic: the localizer's map (normalised) at 1/32 and the
    # decoder's foreground probability at 1/4 of the input. Empty when members have none.
    localizer_maps: list[torch.Tensor] = field(default_factory=list)
    decoder_maps: list[torch.Tensor] = field(default_factory=list)

    @property
    def member_probs(self) -> torch.Tensor:
        return self.mc_probs.mean(dim=1)

    def select(self, images: slice) -> EnsembleOutput:
        """The results of some of the batch's images (a batch made of several requests)."""
        maps = [[m[images] for m in group] for group in (self.cams, self.localizer_maps,
                                                          self.decoder_maps)]  # fmt: skip
        return EnsembleOutput(
            self.member_keys,
            self.mc_probs[:, :, images],
            maps[0],
            self.probs[images],
            self.label[images],
            self.agree[:, images],
            {k: v[images] for k, v in self.uncertainty.items()},
            self.flagged[images],
            None if self.embeddings is None else self.embeddings[images],
            maps[1],
            maps[2],
        )

    @property
    def confidence(self) -> torch.Tensor:
        return self.probs.gather(1, self.label[:, None]).squeeze(1)


def disagreement_floor(members: int) -> int:
    """Fewer members than this agreeing with the ensemble's class flags an image."""
    return min(2, members)


@dataclass
class ImageMasks:
    """Maps and masks of one image at its original size for the ensemble's class."""

    label: int
    agreeing: list[str]
    member_maps: dict[str, np.ndarray]  # every member's map for ``label``, (H, W) in [0, 1]
    intersection_map: np.ndarray  # min over agreeing members: the soft consensus
    mean_map: np.ndarray
    member_masks: dict[str, np.ndarray]  # empty where the class gets no masks
    mask: np.ndarray | None  # the pre-annotation; None when no mask is due
    wanted: bool  # whether the class is one of the mask classes


class Ensemble:
    def __init__(self, members: list[Member], config: EnsembleConfig) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if [m.name for m in members] != list(config.members):
            raise ValueError("members do not match the config")
        if config.decoder and any(m.decoder is None for m in members):
            raise ValueError("the config says decoder=True but a member has no decoder")
        self.members = members
        self.config = config
        self.cam = self.cam_for(config)
        self.amp = "auto"  # predict's default: autocast the backbones on CUDA (auto | on | off)

    @staticmethod
    def cam_for(config: EnsembleConfig) -> Any:
        return cam_method(config.cam_method)

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    def to(self, device: str | torch.device) -> Ensemble:
        for m in self.members:
            m.to(device)
        return self

    def predict(
        self,
        images: torch.Tensor,
        seed: int | None = None,
        amp: str | None = None,
        samples: int | None = None,
    ) -> EnsembleOutput:
        """images: (B, 3, H, W) float in [0, 1] at the config's ``input_size``.

        Larger than ``image_size`` (a decoder trained at ``decoder_scale``): the classifier,
        its CAMs and MC samples see the images resized to ``image_size``, the decoder its own
        forward at the given size. At ``image_size`` one forward serves both.

        ``amp`` (default ``self.amp``): auto | on | off. With autocast on (CUDA only) the
        backbones run in bfloat16 (float16 where unsupported); the head, the MC-Dropout samples
        and the CAMs are computed from their float32 feature maps. Nothing changes on CPU.
        ``samples`` (default the config's ``mc_samples``): MC Dropout samples; 0 = the
        deterministic head only (interactive prompts need maps, not uncertainty).
        """
        cfg = self.config
        images = images.to(self.device)
        enabled, dtype = amp_settings(self.amp if amp is None else amp, images.device)

        def forward(member: Member, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            with autocast(x.device, enabled, dtype):
                features, taps = member.features_and_taps(x)
            return features.float(), [t.float() for t in taps]

        def decoded(member: Member, x: torch.Tensor) -> torch.Tensor:
            """The decoder's own forward on the larger image, tile by tile past decoder_tile."""
            return tiled_map(
                lambda t: torch.sigmoid(member.decode(forward(member, t)[1])),
                x,
                cfg.decoder_tile,
                TILE_MARGIN,
            )

        def heads(member: Member, features: torch.Tensor, taps: list[torch.Tensor], x_large):
            """(CAMs of every class, localizer map, decoder probability) of one forward (and
            of the decoder's own forward on ``x_large`` when it runs at a larger scale)."""
            cam = (
                normalize_maps(self.cam.from_features(features, member.head.weight))
                if isinstance(self.cam, AnalyticCAM)
                else None
            )
            loc = member.localize(features) if member.localizer is not None else None
            if member.decoder is None:
                dec = None
            elif x_large is not None:
                dec = decoded(member, x_large)
            else:
                dec = torch.sigmoid(member.decode(taps))
            return cam, loc, dec

        def added(
            a: torch.Tensor | None, b: torch.Tensor | None, dims: tuple[int, ...]
        ) -> torch.Tensor | None:
            return None if a is None else a + b.flip(dims)

        views = [(-1,), (-2,), (-2, -1)] if cfg.tta_vflip else [(-1,)]
        # The decoder's own input when it runs at a larger scale than the classifier.
        large = None
        if cfg.decoder_scale != 1.0 and tuple(images.shape[-2:]) != tuple(cfg.image_size):
            large = images
            images = torch.nn.functional.interpolate(
                large, size=cfg.image_size, mode="bilinear", align_corners=False, antialias=True
            )
        mc, cams, locs, decs, embeddings = [], [], [], [], []
        for i, member in enumerate(self.members):
            member.eval()
            with torch.no_grad():
                features, taps = forward(member, images)
                pooled = features.mean(dim=(2, 3))
                embeddings.append(torch.nn.functional.normalize(pooled.float(), dim=1).cpu())
                s = None if seed is None else seed + i
                t = cfg.mc_samples if samples is None else samples
                if t > 0:
                    mc.append(mc_dropout_probs(member, pooled, t, s).float().cpu())
                else:
                    mc.append(
                        torch.softmax(member.logits_from_pooled(pooled), dim=-1)[None].float().cpu()
                    )
                cam, loc, dec = heads(member, features, taps, large)
                if cfg.tta_flip:  # each map averaged with those of the flipped images
                    for dims in views:
                        f_m, t_m = forward(member, images.flip(dims))
                        flipped = None if large is None else large.flip(dims)
                        cam_m, loc_m, dec_m = heads(member, f_m, t_m, flipped)
                        cam, loc, dec = (
                            added(*m, dims) for m in ((cam, cam_m), (loc, loc_m), (dec, dec_m))
                        )
                    n = 1 + len(views)
                    cam = None if cam is None else normalize_maps(cam)
                    loc, dec = (None if m is None else m / n for m in (loc, dec))
            if cam is None:  # a pytorch-grad-cam method: its own forward and backward
                cam = normalize_maps(self.cam(member, images).float())
            cams.append(cam.float().cpu())
            if loc is not None:
                locs.append(normalize_maps(loc).float().cpu())
            if dec is not None:
                decs.append(dec.float().cpu())
        mc_probs = torch.stack(mc)  # (M, T, B, C)
        member_probs = mc_probs.mean(dim=1)
        probs = member_probs.mean(dim=0)
        label = probs.argmax(dim=-1)
        agree = member_probs.argmax(dim=-1) == label[None]
        pooled_samples = mc_probs.flatten(0, 1)  # members x samples, a bigger "ensemble"
        unc = {name: fn(pooled_samples) for name, fn in MEASURES.items()}
        unc["disagreement"] = member_disagreement(member_probs)
        flagged = agree.sum(dim=0) < disagreement_floor(len(self.members))
        if cfg.review_threshold is not None:
            flagged |= unc[cfg.review_measure] > cfg.review_threshold
        emb = torch.cat(embeddings, dim=1) / len(embeddings) ** 0.5
        return EnsembleOutput(
            cfg.member_keys, mc_probs, cams, probs, label, agree, unc, flagged, emb, locs, decs
        )

    def source_maps(self, out: EnsembleOutput, index: int, label: int, source: str) -> torch.Tensor:
        """(M, h, w) each member's map of image ``index`` for class ``label`` from ``source``,
        at the model's resolution for that source."""
        if source == "decoder":
            if not out.decoder_maps:
                raise ValueError(
                    "this ensemble has no decoder: map_source 'decoder' is not available"
                )
            return torch.stack([d[index, 0] for d in out.decoder_maps])
        if source == "localizer":
            if not out.localizer_maps:
                raise ValueError("this ensemble has no localizer head")
            return torch.stack([d[index, 0] for d in out.localizer_maps])
        if source != "cam":
            raise ValueError(f"unknown map source {source!r}; known: {', '.join(MAP_SOURCES)}")
        if self.config.map_mode == "max":
            return torch.stack([cam[index].amax(dim=0) for cam in out.cams])
        return torch.stack([cam[index, label] for cam in out.cams])

    def masks(
        self,
        out: EnsembleOutput,
        index: int,
        size: tuple[int, int],
        label: int | None = None,
        source: str | None = None,
    ) -> ImageMasks:
        """Consensus for image ``index`` at original ``size`` = (H, W).

        ``label`` defaults to the ensemble's class (what annotators see); ``source`` to the
        config's map source. CAM and localizer maps are min-max normalised per image; the
        decoder's is a probability and stays one (an image with no foreground stays dark).
        """
        cfg = self.config
        source = source or cfg.map_source
        c = int(out.label[index]) if label is None else label
        names = out.member_keys
        stack = resize_maps(self.source_maps(out, index, c, source), size)
        maps = (stack.clamp(0, 1) if source == "decoder" else normalize_maps(stack)).numpy()
        member_maps = dict(zip(names, maps, strict=True))
        agreeing = [n for n, a in zip(names, out.agree[:, index].tolist(), strict=True) if a]
        chosen = np.stack([member_maps[n] for n in agreeing]) if agreeing else maps
        wanted = cfg.mask_classes is None or cfg.classes[c] in cfg.mask_classes
        member_masks = {
            n: binarize(member_maps[n], cfg.threshold_for(n, source)) & wanted for n in names
        }
        mask = None
        need = min(cfg.min_agree, len(names))
        if wanted and len(agreeing) >= need:
            mask = intersect([member_masks[n] for n in agreeing])
            min_area = int(cfg.min_area_fraction * size[0] * size[1])
            mask = remove_small_components(mask, min_area)
        return ImageMasks(
            c,
            agreeing,
            member_maps,
            chosen.min(axis=0),
            chosen.mean(axis=0),
            member_masks,
            mask,
            wanted,
        )
