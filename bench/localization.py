"""GlaS benchmark: train on `train` (85), evaluate on testA + testB (80).

    python bench/localization.py --data ../shared/data/glas --out bench/results/localization \
        --configs lite:224,lite:448x320,paper:224

Each config is MEMBERS:SIZE[:OUTPUT_STRIDE] with MEMBERS one of `lite` (EfficientNet-Lite0/1/2, ImageNet weights
from PyPI wheels), `paper` (ResNet50, EfficientNet-B0, DenseNet121 from scratch: no ImageNet
weights can be downloaded here) or a comma-free single member name. Writes one JSON per config
and a Markdown summary (summary.md) in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from wsl_models.cam import ANALYTIC, cam_method
from wsl_models.data import load_dataset
from wsl_models.ensemble import EnsembleConfig
from wsl_models.evaluation import evaluate, format_table
from wsl_models.images import parse_size
from wsl_models.members import LITE_TRIO, PAPER_TRIO
from wsl_models.training import TrainConfig, train_ensemble
from wsl_models.versions import ModelStore

GROUPS = {"lite": (list(LITE_TRIO), "imagenet"), "paper": (list(PAPER_TRIO), "none")}


def run_config(spec: str, args: argparse.Namespace) -> dict:
    group, size, *rest = spec.split(":")
    output_stride = int(rest[0]) if rest else 32
    members, weights = GROUPS.get(group, ([group], "imagenet"))
    dataset = load_dataset(args.data)
    cfg = EnsembleConfig(
        classes=list(dataset.classes),
        members=members,
        image_size=parse_size(size),
        output_stride=output_stride,
        cam_method=args.cam,
        decoder=args.decoder,
    )
    tcfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        weights=weights,
        device=args.device,
        select=args.select,
        decoder_epochs=args.decoder_epochs,
    )
    t0 = time.perf_counter()
    ensemble, metrics = train_ensemble(dataset, cfg, tcfg)
    train_s = time.perf_counter() - t0
    name = spec.replace(":", "_")
    store = ModelStore(Path(args.models or Path(args.out) / "models") / name)
    vid = store.save(ensemble, metrics)
    result = evaluate(ensemble, dataset, "test", batch_size=8, seed=args.seed)
    survey = evaluate(ensemble, dataset, "test", batch_size=8, seed=args.seed, protocol="survey")
    print(format_table(survey), flush=True)
    result.update(
        survey=survey,
        decoder_seconds=metrics.get("decoders", {}).get("seconds"),
        config=spec,
        weights=weights,
        version=vid,
        train_seconds=train_s,
        val_accuracy=metrics.get("val_accuracy"),
        calibration=metrics.get("calibration"),
        best_epochs={k: v["best_epoch"] for k, v in metrics["members"].items()},
        device=str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu",
        host=platform.node(),
        torch=torch.__version__,
    )
    variants = {}
    for method in [m for m in args.cams.split(",") if m]:
        for tta in (False, True) if args.tta and method in ANALYTIC else (False,):
            for mode in args.map_modes.split(","):
                ensemble.config.cam_method, ensemble.config.tta_flip = method, tta
                ensemble.config.map_mode = mode
                ensemble.cam = cam_method(method)
                r = evaluate(
                    ensemble, dataset, "test", batch_size=8, seed=args.seed, progress=False
                )
                loc = r["localization"]
                key = method + ("+flip" if tta else "") + ("" if mode == "class" else f"+{mode}")
                variants[key] = {k: loc[k] for k in loc if not k.startswith("baseline")}
                variants[key]["seconds"] = r["seconds"]
                print(key, {k: round(v.get("pxap", 0), 1) for k, v in loc.items()}, flush=True)
    result["cam_variants"] = variants
    print(format_table(result), flush=True)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def summary(results: list[dict]) -> str:
    rows = [
        "| config | device | acc | protocol | map | PxAP | Dice fg | Dice bg | mIoU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for protocol, res in (("native", r), ("survey", r.get("survey"))):
            if res is None:
                continue
            for src, table in res.get("by_source", {"": res["localization"]}).items():
                for name, loc in table.items():
                    if name not in ("intersection", "mean_map") and src != "baselines":
                        continue
                    label = name if src in ("", "baselines") else f"{src} {name}"
                    rows.append(
                        f"| {r['config']} ({r['weights']}) | {r['device']} "
                        f"| {r['accuracy']['ensemble']:.1f} | {protocol} | {label} "
                        f"| {loc.get('pxap', float('nan')):.1f} | {loc['dice_fg']:.1f} "
                        f"| {loc['dice_bg']:.1f} | {loc['miou']:.1f} |"
                    )
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--out", default="bench/results/localization")
    p.add_argument("--configs", default="lite:224,lite:448x320,paper:224")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cam", default="xgradcam", help="CAM method of the trained ensemble")
    p.add_argument("--select", default="loss", choices=["loss", "localization"])
    p.add_argument("--cams", default="", help="extra CAM methods to evaluate on the same models")
    p.add_argument("--map-modes", default="class", help="class,max: which class maps to use")
    p.add_argument("--tta", action="store_true", help="also evaluate each CAM with flip TTA")
    p.add_argument("--models", default=None, help="where model versions go (default OUT/models)")
    p.add_argument("--no-decoder", dest="decoder", action="store_false")
    p.add_argument("--decoder-epochs", type=int, default=TrainConfig.decoder_epochs)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = [run_config(spec, args) for spec in args.configs.split(",")]
    (Path(args.out) / "summary.md").write_text(summary(results))
    print(summary(results))


if __name__ == "__main__":
    main()
