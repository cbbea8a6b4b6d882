"""Training settings, stored in every version's metrics, and the device/seed helpers."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .members import Weights

# TrainConfig.select: how each classifier's checkpoint is chosen (validated by the trainer,
# offered by `camlabel train --select`).
CHECKPOINT_RULES = ("auto", "loss", "localization", "last")


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
    # The trunk (every stage below the last, stride 16) frozen and run once per image view;
    # each epoch trains the last stage and the head on a cached view (feature_bank.py).
    # None: when pretrained (ImageNet, a file, or a previous version). False: the whole
    # backbone trains, every batch decoded and augmented afresh (the trainer before).
    freeze_trunk: bool | None = None
    # Where the frozen trunk ends: 8 also trains the stride-16 stages. On LGG (brain MRI, far
    # from ImageNet) a stride-16 trunk cost 7.2 points of test accuracy against the whole-
    # backbone trainer (75.7 vs 82.9, means of 2 seeds), a stride-8 trunk none (83.4), for
    # 1.3-1.5x the classifier time; on GlaS both reach 98.8 (bench/results/train_time).
    trunk_stride: int = 8
    feature_views: int = 4  # augmented views per image in the bank (1 without augmentation)
    feature_bank_mb: float = 2048  # per member; fewer views are cached beyond it
    # Pixel-labelled held-out images (of mask classes) that set the mask thresholds, choose
    # each decoder's epoch and whether the decoder or the CAM serves (the Survey's valpx).
    calibration_images: int = 12
    review_quantile: float = 0.9
    # Checkpoint selection: "loss" (validation loss), "localization" (PxAP of the member's
    # CAM on the pixel-labelled calibration images: the Survey's B-LOC rule), "last" (the final
    # epoch), or "auto": "last" when pixel targets are used (the classification loss says
    # nothing about the masks being learned), else "loss".
    select: str = "auto"  # one of CHECKPOINT_RULES
    device: str = "auto"
    progress: bool = True
    # Pixel supervision (supervision.py). Loss = CE + mask_weight * BCE(class map, human mask)
    # + pseudo_weight * BCE(class map, pseudo-mask). Pseudo-masks come from the previous
    # version's consensus map: >= pseudo_fg foreground, <= pseudo_bg background, between ignored.
    # train_masks: whether masks of *training* images supervise pixels (the Label Studio job:
    # yes, they are the annotators' masks). Off by default so a dataset's masks/ folder, there
    # for evaluation and calibration, never silently turns weak supervision into full.
    train_masks: bool = False
    mask_weight: float = 5.0  # 5 beat 1 on GlaS (Dice-AUC 59.2 vs 58.3; +pseudo 60.9 vs 59.3)
    pseudo_weight: float = 0.1  # 0: no pseudo-masks
    pseudo_fg: float = 0.7
    pseudo_bg: float = 0.3
    # The min-max entropy localizer (members get a localizer head; see supervision.py).
    minmax: bool = False
    minmax_weight: float = 1.0
    minmax_area: tuple[float, float] = (0.1, 0.9)
    augment: bool = True  # random flips, crops and colour jitter of training images
    # Mixed precision: "auto" (on for CUDA: bfloat16, or float16 with loss scaling where the
    # GPU has no bfloat16), "on" (CUDA only), "off". Nothing changes on CPU.
    amp: str = "auto"
    # The decoder (decoder_training.py), trained after the classifiers with them frozen, on
    # cached taps. Seeds (seeds.py), fresh every step, from seed CAMs computed on the image at
    # decoder_seed_scales x the input size (2: a 14x14 CAM where the model sees 7x7; several
    # scales are averaged) with decoder_seed_cam (None: the ensemble's CAM method). Grad-CAM++
    # seeds won on GlaS (train-mask map PxAP 63.0 vs 59.1, decoders +1.7 on test) and lost on
    # LGG (decoder PxAP 45.4 vs 52.0, two seeds): not the default (docs/weak-masks.md).
    # decoder_seeding "probability": decoder_seed_fg pixels drawn with probability ~ the
    # agreeing members' consensus (min), decoder_seed_bg ~ 1 - their max (NEGEV). "region":
    # uniformly where the consensus is above its Otsu threshold (eroded decoder_seed_erode
    # cells) / among the decoder_seed_bg_fraction lowest of their max.
    decoder_seeding: str = "probability"
    decoder_seed_scales: tuple[float, ...] = (2.0,)
    decoder_seed_cam: str | None = None
    # "localization": each decoder keeps the epoch with the best PxAP on the pixel-labelled
    # held-out images (the last epoch when there are none); "last": always the last epoch.
    decoder_select: str = "localization"
    # Other recipes each decoder also trains when there are pixel-labelled held-out images;
    # the one with the best held-out PxAP is kept and recorded. Each is "field=value;..." of
    # decoder_* fields, e.g. "decoder_affinity_weight=1;decoder_seed_scales=1,2".
    decoder_recipes: tuple[str, ...] = ()
    # Serve the decoder only where its consensus scores at least its CAM's on those images.
    choose_map_source: bool = True
    decoder_epochs: int = 60
    # Rounds in which every decoder is retrained from seeds drawn from the decoders' own
    # consensus map instead of the CAMs (decoder_training.self_seed_round), each kept per
    # member only where held-out masks score it higher; none without held-out masks or with
    # human masks. 3 chosen on GlaS's held-out train images: decoder PxAP 71.2 (0), 72.6,
    # 74.9, 76.0 (3), 76.0 (4: no member kept its 4th round); LGG kept none (docs/weak-masks.md).
    decoder_self_seed_rounds: int = 3
    # Rounds before those whose seeds are the decoders' consensus re-fitted per image by a
    # feature probe (refined_seeds.py), judged and run like them. 1 chosen on GlaS's held-out
    # train images (PxAP 78.2 against 76.1 after the 3 self-seed rounds; docs/weak-masks.md).
    decoder_probe_rounds: int = 1
    # Without held-out masks (a new project) nothing judges a round, so probe rounds run only
    # where the seed CAMs' consensus covers at least decoder_probe_min_cover of a seeded image
    # (DecoderTargets.seed_cover), and then every round is kept. The cover separates objects
    # the probe refines from findings it spreads: GlaS 0.36 (3 unjudged rounds: held-out PxAP
    # 70.7 -> 73.0), LGG 0.07 (65.8 -> 23.9); 0.15 lies between (docs/weak-masks.md).
    decoder_unjudged_probe_rounds: int = 3
    decoder_probe_min_cover: float = 0.15
    # A job with clicks and no masks fine-tuning a version whose decoder already learned from
    # masks or clicks: train that decoder on CAM seeds again first (True, as before) or hand it
    # straight to the segmentation stage (False; training.keeps_segmenter).
    decoder_retrain_segmenter: bool = False
    decoder_self_seed_steps: int = 0  # each round's step cap (0: decoder_steps)
    # At most this many optimizer steps per decoder (0: no cap; decoder_training.decoder_epochs).
    # 150: on GlaS's held-out training images the decoders' best PxAP was the same after 150
    # steps as after 300 (66.5 vs 66.8, the best epochs were 3 to 33), at half the time.
    decoder_steps: int = 150
    # The cap when no held-out masks choose the epoch and no human masks exist (a new Label
    # Studio project): the last epoch is kept, and a decoder past its first few epochs fits
    # its seeds' mistakes. 0: decoder_steps. 25 gained on GlaS (held-out PxAP 69.8 vs 64.8)
    # and lost on LGG (46.7 vs 66.3): off (docs/weak-masks.md).
    decoder_unjudged_steps: int = 0
    # The same decoder's cap in passes over each image (0: none): a decoder that sees each
    # image's seeds many times learns that image's CAM, mistakes included. 8 chosen on GlaS's
    # held-out train images, the last epoch kept: PxAP 69.8 / 70.3 / 69.0 / 64.8 after 5 / 8 /
    # 10 / 30 epochs; LGG, which lost below 8 (4 epochs: 61.1 vs 66.3), runs 8 anyway.
    decoder_unjudged_epochs: int = 8
    decoder_lr: float = 3e-3
    decoder_batch_size: int = 16
    decoder_seed_fg: int = 16
    decoder_seed_bg: int = 16
    decoder_seed_bg_fraction: float = 0.3
    decoder_seed_erode: int = 1
    decoder_seed_weight: float = 1.0
    # Pairwise colour affinity (a local CRF-like term): neighbours at these offsets whose
    # colours differ by ~sigma or less are pushed to the same label.
    decoder_affinity_weight: float = 1.0
    decoder_affinity_sigma: float = 0.1  # RGB distance, colours in [0, 1]
    decoder_affinity_dilations: tuple[int, ...] = (1, 2, 4)
    # Area prior on images of mask classes: the mean foreground probability inside this range.
    decoder_area: tuple[float, float] = (0.02, 0.95)
    decoder_area_weight: float = 1.0
    # Negative evidence: images of classes that get no mask are all background.
    decoder_negative_weight: float = 1.0
    # Human masks (full pixel loss) and, once there are any, pseudo-masks for the other images
    # from the decoder's own confident regions (>= pseudo_fg, <= pseudo_bg; the band ignored),
    # refreshed every epoch after decoder_pseudo_start of the epochs.
    decoder_mask_weight: float = 1.0
    decoder_pseudo_weight: float = 0.3
    decoder_pseudo_start: float = 0.5
    # Segmentation fine-tuning once there are human masks (mask_training.py): each member's
    # decoder trains on crops of the image at seg_scale x image_size (crops of image_size),
    # BCE + seg_dice_weight x soft Dice; seg_steps_per_mask steps per mask within
    # [seg_min_steps, seg_max_steps] (0: off). seg_encoder_lr_factor > 0 also fine-tunes the
    # backbone's top stage and head at seg_lr x that factor, + seg_class_weight x the
    # classification loss (0: the decoder alone). 0.1 chosen on GlaS's held-out *train* images
    # (Lite0, bench/learning_curve.py --score-on val): 0.3 gained about a Dice point with masks
    # on 9 images, but on 27-29 held-out images (two seeds, one round of 8) it misclassified 3
    # of 56 after masks and 10 of 56 after clicks, against 0 and 1 at 0.1, and the clicks' PxAP
    # fell (77.6 vs 79.7). 0 (the decoder alone): 75.6 / 76.5 vs 82.3 / 80.5 after 16 masks.
    seg_steps_per_mask: int = 20
    seg_min_steps: int = 80
    seg_max_steps: int = 400
    seg_scale: float = 2.0
    seg_scale_jitter: tuple[float, float] = (0.75, 1.33)
    seg_colour_jitter: float = 0.15
    seg_batch_size: int = 8
    seg_lr: float = 1e-3
    seg_encoder_lr_factor: float = 0.1
    seg_dice_weight: float = 1.0
    seg_class_weight: float = 1.0
    # Clicked images (sparse targets): the decoder's colour-affinity term on their crops
    # (decoder_affinity_sigma / _dilations), so a click's label spreads to similar neighbours.
    # 1 chosen on GlaS's held-out *train* images (Lite0, 2 rounds of 8 images x 10+10 clicks,
    # learning_curve_clicks_val_aff*): Dice fg / bg / PxAP 77.8 / 75.1 / 86.8 against 74.4 /
    # 70.8 / 82.4 with 0 and 79.8 / 73.6 / 85.1 with 3.
    seg_click_affinity_weight: float = 1.0
    # Self-training on clicked images: after seg_click_pseudo_at of the steps (0: off), each
    # clicked image's unclicked pixels get the decoder's own confident labels (p >=
    # seg_click_pseudo_confidence: object, <= 1 - it: background, the band ignored), weighted
    # seg_click_pseudo_weight against the clicks, so what the clicks taught reaches the edges.
    # 0.5 / 0.7 chosen on GlaS's held-out *train* images (2 rounds of 8 images x 10+10 clicks,
    # learning_curve_clicks_val_pseudo*): after 16 images Dice fg / bg / PxAP 79.9 / 74.8 /
    # 87.6 against 75.6 / 73.7 / 82.5 without; Dice-AUC 71.3 against 68.9.
    seg_click_pseudo_at: float = 0.5
    seg_click_pseudo_confidence: float = 0.7
    seg_click_pseudo_weight: float = 1.0
    seg_click_pseudo_refresh: int = 1  # times the labels are made, evenly over the steps left
    # Clicked images without a mask train on the mask the smart keypoints' probe spreads their
    # clicks into (on the ensemble's current mask; mask_training.probed_targets), as a mask
    # an annotator submitted would, instead of on the clicked pixels alone (the affinity and
    # self-training terms above then apply to none). Chosen on GlaS's held-out *train* images
    # (Lite0, 2 rounds of 8 images x 10+10 interactive clicks, learning_curve_clicks_val_probed):
    # after 16 images Dice fg / bg / PxAP 83.6 / 79.3 / 91.7 against 82.4 / 77.0 / 90.8.
    seg_click_masks: bool = True
    # A folder where each clicked image's spread mask is kept (named by a hash of the image and
    # its clicks): made once, by the version the image was first clicked on, as a mask the
    # annotator submitted would be, and read back by later jobs. None: made anew each job.
    # Label Studio jobs keep them in the project's folder: on GlaS's held-out *train* images
    # (4 rounds of 8 clicked images, learning_curve_clicks_val_probed_kept4) Dice fg / bg /
    # PxAP after 32 images 86.5 / 80.1 / 93.9 against 84.5 / 76.8 / 92.9 made anew.
    seg_click_mask_dir: str | None = None
    seg_eval_every: int = 20


def recipe(cfg: TrainConfig, text: str, prefix: str = "decoder_") -> TrainConfig:
    """``cfg`` with overrides "field=value;field=value" of fields starting with ``prefix``
    (a decoder recipe: decoder_* fields only; "" for any field); tuple fields take
    comma-separated values, booleans 1/0, true/false, yes/no."""
    values: dict[str, object] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith(prefix) or not hasattr(cfg, key):
            what = f"{prefix}* fields" if prefix else "TrainConfig fields"
            raise ValueError(f"a recipe sets {what} as field=value, not {item!r}")
        current = getattr(cfg, key)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else float
            values[key] = tuple(kind(v) for v in raw.split(",") if v.strip())
        elif current is None or isinstance(current, str):
            values[key] = raw.strip() or None
        elif isinstance(current, bool):
            values[key] = raw.strip().lower() in ("1", "true", "yes")
        else:
            values[key] = type(current)(raw)
    return dataclasses.replace(cfg, **values)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available. Under torchrun with CUDA: this process's GPU, LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    if name == "cuda" and distributed.is_distributed():
        return torch.device("cuda", distributed.local_rank())
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
