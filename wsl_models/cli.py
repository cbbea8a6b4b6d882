"""`camlabel train | evaluate | synth`: the ML library's commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from . import distributed
from .data import load_dataset
from .ensemble import MAP_SOURCES, TTA_VIEWS, EnsembleConfig
from .evaluation import PROTOCOLS, evaluate, format_table
from .images import parse_size
from .members import LITE_TRIO
from .synthetic import make_dataset
from .train_config import CHECKPOINT_RULES
from .training import TrainConfig, resolve_device, train_ensemble
from .versions import ModelStore

log = logging.getLogger("camlabel")


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train the ensemble on image-level labels",
        description="Under torchrun (WORLD_SIZE > 1) training is data-parallel: --batch-size is "
        "the global batch, split across the processes; only rank 0 writes --out. "
        "See docs/distributed.md.",
    )
    t.add_argument("--data", required=True, help="folder with images/, labels.csv, masks/")
    t.add_argument("--out", required=True, help="model directory (versions + CURRENT)")
    t.add_argument("--members", default=",".join(LITE_TRIO), help="comma-separated member names")
    t.add_argument("--weights", default="imagenet", help="imagenet | none | PATH | m=PATH,...")
    t.add_argument("--image-size", default="224", help="N or WxH, e.g. 448x320")
    t.add_argument("--split", default="train")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="global batch: under torchrun each process takes batch-size / WORLD_SIZE",
    )
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--dropout", type=float, default=0.5)
    t.add_argument("--mc-samples", type=int, default=30)
    t.add_argument("--cam", default="xgradcam", help="xgradcam | gradcam | cam | gradcam++ | ...")
    t.add_argument(
        "--tta",
        default="none",
        choices=list(TTA_VIEWS),
        help="maps averaged over flipped images: mirror (2 backbone passes) or four (mirrored, "
        "upside down, both; 4 passes); thresholds are set on the averaged maps",
    )
    t.add_argument("--mask-classes", default="", help="comma-separated; default: every class")
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--patience", type=int, default=6)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument(
        "--amp",
        default=os.environ.get("AMP", "auto"),
        choices=list(distributed.AMP_MODES),
        help="mixed precision: auto = on for CUDA (bfloat16, else float16), off on CPU "
        "(default: AMP or auto)",
    )
    t.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random flips, crops or colour jitter of training images",
    )
    t.add_argument(
        "--train-masks",
        action="store_true",
        help="use the masks of training images as pixel supervision (default: labels only)",
    )
    t.add_argument("--mask-weight", type=float, default=5.0)
    t.add_argument(
        "--seg-max-steps",
        type=int,
        default=TrainConfig.seg_max_steps,
        help="with --train-masks: cap on the segmentation steps (20 per mask up to it)",
    )
    t.add_argument(
        "--seg-encoder-lr-factor",
        type=float,
        default=TrainConfig.seg_encoder_lr_factor,
        help="with --train-masks: the top stage's learning rate as a fraction of the decoder's",
    )
    t.add_argument(
        "--minmax", action="store_true", help="also train the min-max entropy localizer head"
    )
    t.add_argument(
        "--no-decoder",
        dest="decoder",
        action="store_false",
        help="no full-resolution decoder: masks come from the CAMs (or --map-source localizer)",
    )
    t.add_argument(
        "--map-source",
        default=None,
        choices=list(MAP_SOURCES),
        help="where pre-annotations come from (default: decoder, else cam)",
    )
    t.add_argument("--decoder-epochs", type=int, default=TrainConfig.decoder_epochs)
    t.add_argument(
        "--decoder-steps",
        type=int,
        default=TrainConfig.decoder_steps,
        help="at most this many optimizer steps per decoder (0: no cap)",
    )
    t.add_argument(
        "--output-stride",
        type=int,
        default=32,
        choices=[32, 16, 8],
        help="members' output stride: 16 or 8 train the last stage(s) without their stride "
        "(finer CAMs, slower)",
    )
    t.add_argument(
        "--trunk-stride",
        type=int,
        default=TrainConfig.trunk_stride,
        choices=[8, 16],
        help="pretrained members train only the stages after this stride, on cached trunk "
        "outputs: 16 is faster, 8 kept the whole-backbone trainer's accuracy on brain MRI",
    )
    t.add_argument(
        "--seeding",
        default=TrainConfig.decoder_seeding,
        choices=["probability", "region"],
        help="how decoder seeds are drawn from the seed CAMs",
    )
    t.add_argument(
        "--seed-scales",
        default=",".join(f"{v:g}" for v in TrainConfig.decoder_seed_scales),
        help="seed CAMs from the image at these multiples of the input size, averaged",
    )
    t.add_argument(
        "--seed-cam",
        default=TrainConfig.decoder_seed_cam or "ensemble",
        help="closed-form CAM the decoder's seeds come from: 'ensemble' (the --cam method, "
        "default), gradcam++, layercam, xgradcam, gradcam, cam",
    )
    t.add_argument(
        "--self-seed-rounds",
        type=int,
        default=TrainConfig.decoder_self_seed_rounds,
        help="rounds in which the decoders are retrained from seeds drawn from their own "
        "consensus map instead of the CAMs (each kept where held-out masks agree)",
    )
    t.add_argument(
        "--probe-rounds",
        type=int,
        default=TrainConfig.decoder_probe_rounds,
        help="rounds before those whose seed maps are the decoders' consensus re-fitted per "
        "image by a probe on its features (each kept where held-out masks agree)",
    )
    t.add_argument(
        "--unjudged-probe-rounds",
        type=int,
        default=TrainConfig.decoder_unjudged_probe_rounds,
        help="probe rounds without held-out masks, all kept; they run only where the seed CAMs "
        "cover at least --probe-min-cover of an image (large objects, not small findings)",
    )
    t.add_argument(
        "--probe-min-cover",
        type=float,
        default=TrainConfig.decoder_probe_min_cover,
        help="the least share of a seeded image the seed CAMs' consensus must cover for "
        "unjudged probe rounds to run",
    )
    t.add_argument(
        "--select",
        default=TrainConfig.select,
        choices=CHECKPOINT_RULES,
        help="each classifier's checkpoint: validation loss, its CAM's PxAP on pixel-labelled "
        "held-out images, the last epoch, or auto (last with pixel targets, else loss)",
    )
    t.add_argument(
        "--decoder-select",
        default=TrainConfig.decoder_select,
        choices=["localization", "last"],
        help="decoder epoch: best PxAP on pixel-labelled held-out images, or the last",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, PxAP, Dice/IoU on a pixel-labelled split")
    e.add_argument("--data", required=True)
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument("--version", default=None, help="default: the current version")
    e.add_argument("--split", default="test", help="comma-separated; 'test' = testA + testB")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--overlays", default=None, help="folder for one PNG per image")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument(
        "--protocol",
        default="native",
        choices=list(PROTOCOLS),
        help="native: each image at its own size; survey: the published WSOL protocol "
        "(masks at 224x224, the ground-truth class's map, pooled PxAP)",
    )
    e.add_argument(
        "--sources",
        default="",
        help="comma-separated map sources to report (default: every one the model has: "
        "cam, localizer, decoder)",
    )
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("synth", help="write a small synthetic dataset (blobs = lesion)")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, default=24, help="images per class in train")
    s.add_argument("--test", type=int, default=8, help="images per class in test")
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kind", default="blobs", choices=["blobs", "disks"])
    s.set_defaults(func=cmd_synth)


def cmd_train(args: argparse.Namespace) -> int:
    """Single-process, or one rank of a torchrun job (only rank 0 saves and prints)."""
    distributed.init_from_env(args.device)
    try:
        return _train(args)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.data)
    ens_cfg = EnsembleConfig(
        classes=list(dataset.classes),
        members=[m.strip() for m in args.members.split(",") if m.strip()],
        image_size=parse_size(args.image_size),
        dropout=args.dropout,
        mc_samples=args.mc_samples,
        cam_method=args.cam,
        mask_classes=[c for c in args.mask_classes.split(",") if c] or None,
        localizer=args.minmax,
        decoder=args.decoder,
        map_source=args.map_source,
        output_stride=args.output_stride,
    )
    ens_cfg.set_tta(args.tta)
    cfg = TrainConfig(
        decoder_epochs=args.decoder_epochs,
        decoder_steps=args.decoder_steps,
        trunk_stride=args.trunk_stride,
        decoder_seeding=args.seeding,
        decoder_seed_scales=tuple(float(v) for v in args.seed_scales.split(",") if v),
        decoder_seed_cam=None if args.seed_cam == "ensemble" else args.seed_cam,
        select=args.select,
        decoder_select=args.decoder_select,
        decoder_self_seed_rounds=args.self_seed_rounds,
        decoder_probe_rounds=args.probe_rounds,
        decoder_unjudged_probe_rounds=args.unjudged_probe_rounds,
        decoder_probe_min_cover=args.probe_min_cover,
        train_masks=args.train_masks,
        mask_weight=args.mask_weight,
        seg_max_steps=args.seg_max_steps,
        seg_encoder_lr_factor=args.seg_encoder_lr_factor,
        minmax=args.minmax,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        patience=args.patience,
        seed=args.seed,
        weights=args.weights,
        device=args.device,
        amp=args.amp,
        augment=args.augment,
    )
    ensemble, metrics = train_ensemble(dataset, ens_cfg, cfg, split=args.split)
    if not distributed.is_main():
        return 0  # rank 0 holds the same weights and saves them
    vid = ModelStore(args.out).save(ensemble, metrics, data=str(Path(args.data).resolve()))
    acc = metrics.get("val_accuracy", {})
    print(f"new version {vid} in {args.out}; validation accuracy {json.dumps(acc)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    store = ModelStore(args.model)
    ensemble = store.load(args.version, device=resolve_device(args.device))
    result = evaluate(
        ensemble,
        load_dataset(args.data),
        args.split,
        args.batch_size,
        args.overlays,
        protocol=args.protocol,
        sources=[s for s in args.sources.split(",") if s] or None,
    )
    result["version"] = args.version or store.current_id()
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    out = make_dataset(
        args.out,
        {"train": args.train, "test": args.test},
        (args.size, args.size),
        args.seed,
        args.kind,
    )
    print(f"synthetic dataset written to {out}")
    return 0
