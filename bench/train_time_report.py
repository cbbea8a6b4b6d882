"""Markdown tables from bench/results/train_time/*.json (``python bench/train_time_report.py``)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from wsl_models.mask_training import segmentation_steps
from wsl_models.train_config import TrainConfig

STAGES = ("classifiers", "decoders", "calibration", "pixel_set", "save", "other")


def _mean(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({' / '.join(f'{v:.1f}' for v in values)})"


def train_rows(folder: Path) -> list[str]:
    rows = [
        "| data | trainer | seeds | wall min | classifiers | decoders | other stages "
        "| accuracy | CAM PxAP survey | decoder PxAP survey | decoder PxAP native "
        "| decoder Dice fg / bg survey |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if "runs" not in r or not r["runs"]:
            continue
        runs = r["runs"]
        data = Path(r["data"]).name
        wall = [x["wall_seconds"] / 60 for x in runs]
        share = {
            k: statistics.mean(x["stage_share"].get(k, 0.0) for x in runs) * 100 for k in STAGES
        }
        rest = sum(share[k] for k in STAGES[2:])
        s = [x["scores"]["survey"] for x in runs]
        n = [x["scores"]["native"] for x in runs]
        dice = " / ".join(
            f"{statistics.mean(x['decoder'][k] for x in s):.1f}" for k in ("dice_fg", "dice_bg")
        )
        rows.append(
            f"| {data} | {r['label']} | {','.join(str(x['seed']) for x in runs)} "
            f"| {_mean(wall)} | {share['classifiers']:.0f} % | {share['decoders']:.0f} % "
            f"| {rest:.0f} % | {_mean([x['accuracy'] for x in s])} "
            f"| {_mean([x['cam']['pxap'] for x in s])} | {_mean([x['decoder']['pxap'] for x in s])} "
            f"| {_mean([x['decoder']['pxap'] for x in n])} | {dice} |"
        )
    return rows


def anatomy_rows(folder: Path) -> list[str]:
    rows = [
        "| data | member | epoch s | augmentation | forward | backward + step | validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        for name, a in r.get("anatomy", {}).items():
            e = a["epoch_share"]
            rows.append(
                f"| {Path(r['data']).name} | {name} | {a['epoch_seconds']:.1f} | "
                + " | ".join(
                    f"{100 * e[k]:.0f} %"
                    for k in ("augment", "forward", "backward_step", "validation")
                )
                + " |"
            )
    return rows


def _steps(t: dict) -> str:
    """Segmentation steps per member of the retraining job, by the trainer's own rule."""
    if "seg_steps" not in t:
        return "–"
    low, high = t["seg_steps"]
    cfg = TrainConfig(seg_min_steps=low, seg_max_steps=high)
    return str(segmentation_steps(cfg, t["human_masks"]))


def _seconds(t: dict, key: str) -> str:
    return "–" if t.get(key) is None else f"{t[key]:.0f}"


def retrain_rows(folder: Path) -> list[str]:
    rows = [
        "| trainer | first job s | retraining job s | classifier epochs | decoder epochs "
        "| decoder s | segmentation steps | segmentation s "
        "| hold-out PxAP / Dice fg: previous -> new (1 mask) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if "retrain_job_seconds" not in r:
            continue
        t, old, new = r["retrain"], r["retrain"]["holdout_previous"], r["retrain"]["holdout_new"]
        rows.append(
            f"| {r['label']} | {r['first_job_seconds']['total']:.0f} "
            f"| {r['retrain_job_seconds']['total']:.0f} | {t['epochs']} | {t['decoder_epochs']} "
            f"| {t['decoder_seconds'] or 0:.0f} | {_steps(t)} | {_seconds(t, 'segmentation_seconds')} "
            f"| {old['pxap']:.1f} / {old['dice_fg']:.1f} -> "
            f"{new['pxap']:.1f} / {new['dice_fg']:.1f} |"
        )
    return rows


def main(folder: str = "bench/results/train_time") -> None:
    root = Path(folder)
    print("\n".join(train_rows(root)))
    print()
    print("\n".join(retrain_rows(root)))
    print()
    print("\n".join(anatomy_rows(root)))


if __name__ == "__main__":
    main(*sys.argv[1:])
