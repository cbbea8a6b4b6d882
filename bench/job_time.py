"""How long a training job from Label Studio annotations takes, with and without the decoder.

    python bench/job_time.py --data ../shared/data/glas --out bench/results/job_time.json

The job's own configuration (``backend.jobs.job_configs`` with the default TRAIN_* settings:
Lite trio, 224 px, 20 epochs, masks count, pseudo-masks for the rest) on the same annotations
both times: GlaS train images as annotated tasks (``--labelled`` with their class,
``--masks`` of them with their brush mask) plus ``--unlabelled`` unannotated ones, written in
the layout ``collect_dataset`` writes (links, in a temporary folder). The two runs alternate
``--repeats`` times, so both see the same machine load; the ratio is the decoder's cost.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from backend.jobs import TrainingSettings, job_configs
from backend.settings import Settings
from wsl_models.data import load_dataset
from wsl_models.training import train_ensemble


def write_tasks(
    data: Path, out: Path, labelled: int, masks: int, unlabelled: int, masked=None
) -> None:
    """``masked``: indices of the labelled images that get a mask (default the first ``masks``)."""
    masked = set(range(masks)) if masked is None else set(masked)
    ds = load_dataset(data)
    train = ds.split("train")
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    rows = []
    for i, s in enumerate(train[: labelled + unlabelled]):
        (out / "images" / s.name).symlink_to(s.image.resolve())
        annotated = i < labelled
        if annotated and i in masked and s.mask is not None:
            (out / "masks" / s.name).symlink_to(s.mask.resolve())
        rows.append({"image": s.name, "label": s.label if annotated else "", "split": "train"})
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--labelled", type=int, default=40)
    p.add_argument("--masks", type=int, default=8)
    p.add_argument("--unlabelled", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench/results/job_time.json")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=INT",
        help="TrainConfig integer fields to change, e.g. decoder_unjudged_probe_rounds=0",
    )  # fmt: skip
    args = p.parse_args()
    changes = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    settings = Settings(device="auto")
    times: dict[str, list[float]] = {"without decoder": [], "with decoder": []}
    details = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tasks"
        write_tasks(Path(args.data), root, args.labelled, args.masks, args.unlabelled)
        ds = load_dataset(root)
        for _ in range(args.repeats):
            for name, decoder in (("without decoder", False), ("with decoder", True)):
                train = TrainingSettings(decoder=decoder)
                ens_cfg, cfg = job_configs(ds.classes, None, train, settings)
                cfg = dataclasses.replace(cfg, **changes)
                t0 = time.perf_counter()
                _, metrics = train_ensemble(ds, ens_cfg, cfg)
                times[name].append(time.perf_counter() - t0)
                details[name] = {
                    "human_masks": metrics["human_masks"],
                    "decoder_seconds": metrics.get("decoders", {}).get("seconds"),
                    "segmentation_seconds": metrics.get("segmentation", {}).get("seconds"),
                    "probe_gate": metrics.get("decoders", {}).get("probe_gate"),
                    "rounds": [k for k in metrics.get("decoders", {}) if "_round_" in k],
                }
                print(name, f"{times[name][-1]:.0f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
        },
        "changes": changes,
        "annotations": {
            "labelled": args.labelled,
            "masks": args.masks,
            "unlabelled": args.unlabelled,
        },
        "seconds": times,
        "median_seconds": med,
        "ratio": med["with decoder"] / med["without decoder"],
        "details": details,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
