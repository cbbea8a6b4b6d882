"""The weak decoder's threshold without pixel-labelled held-out images, on a saved GlaS model.

    python bench/weak_threshold.py --model /tmp/models/glas_t8 \
        --json bench/results/decoder/weak_threshold.json

The model keeps the threshold its held-out masks calibrated; this asks what a project without
such masks would get: 0.5, or ``weak_decoder_threshold`` (the value whose consensus masks cover
as much of the training images as the mass of the seed maps the decoders last learned from,
where the model recorded it, else the CAMs' masks), and prints decoder Dice fg / bg (survey
protocol, 224x224 masks) at every grid value on the model's held-out train images (what
chooses) and the test split (information only), images of the mask classes only:

    python bench/weak_threshold.py --model /tmp/models/lgg --data ../shared/data/lgg \
        --json bench/results/decoder/weak_threshold_mri.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from wsl_models.calibration import AREA_GRID, seeds_recorded, weak_decoder_threshold
from wsl_models.data import ImageDataset, load_dataset, load_masks
from wsl_models.masks import resize_mask
from wsl_models.metrics import segmentation_scores
from wsl_models.versions import ModelStore

SURVEY = (224, 224)


def consensus_maps(ensemble, samples) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The decoders' soft consensus of the true class at 224x224, and the true masks."""
    cfg = ensemble.config
    ds = ImageDataset(samples, cfg.classes, cfg.input_size)
    maps = []
    for i in range(len(ds)):
        out = ensemble.predict(ds[i][0][None], seed=0, samples=0)
        maps.append(ensemble.masks(out, 0, SURVEY, ds.labels[i], "decoder").intersection_map)
    truths = [resize_mask(m, SURVEY) for m in load_masks(samples)]
    return maps, truths


def model_splits(store: ModelStore, ensemble, data: str) -> tuple[list, list, list]:
    """The model's training images (its held-out ones left out), and the held-out train and
    test images of mask classes (LGG: tumour; a normal slice's mask comes from its class)."""
    held = set(store.manifest(store.current_id())["metrics"]["held_out"])
    ds = load_dataset(data)
    wanted = set(ensemble.config.mask_classes or ensemble.config.classes)
    scored = [s for s in ds.samples if s.label in wanted]
    train = [s for s in ds.split("train") if s.name not in held]
    held_s = [s for s in scored if s.split == "train" and s.name in held]
    return train, held_s, [s for s in scored if s.split.startswith("test")]


def saved_model_seeds(store: ModelStore) -> tuple[float | None, bool]:
    """``seeds_recorded`` of a saved model's decoders, as its training (or
    ``decoder_diagnostics.py retrain --save``) recorded them: (None, False) for a model from
    before the seed mass was recorded."""
    metrics = store.manifest(store.current_id())["metrics"]
    for report in (metrics.get("retrain"), metrics.get("decoders")):
        seeds = seeds_recorded(report)
        if seeds[0] is not None:
            return seeds
    return None, False


def model_args(doc: str) -> argparse.Namespace:
    """The command line the scripts on a saved model share: --model, --data, --json."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--json", default=None)
    return p.parse_args()


def dice(maps: list[np.ndarray], truths: list[np.ndarray], t: float) -> list[float]:
    rows = [segmentation_scores(m > t, y) for m, y in zip(maps, truths, strict=True)]
    return [round(100 * float(np.mean([r[k] for r in rows])), 1) for k in ("dice_fg", "dice_bg")]


def main() -> None:
    args = model_args(__doc__)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = ModelStore(args.model)
    ensemble = store.load()
    calibrated = ensemble.config.decoder_threshold
    train, held_s, test = model_splits(store, ensemble, args.data)
    rule = weak_decoder_threshold(ensemble, train, 0, *saved_model_seeds(store))
    scored = {
        name: consensus_maps(ensemble, s) for name, s in (("held_out", held_s), ("test", test))
    }
    grid = sorted({*AREA_GRID, calibrated})
    rows = {
        str(t): {name: dice(maps, truths, t) for name, (maps, truths) in scored.items()}
        for t in grid
    }
    result = {"model": args.model, "calibrated": calibrated, "rule": rule, "dice_fg_bg": rows}
    for t in grid:
        tag = " (rule)" if t == rule["threshold"] else " (calibrated)" if t == calibrated else ""
        print(f"{t:.2f}{tag}: held-out {rows[str(t)]['held_out']}, test {rows[str(t)]['test']}")
    print(json.dumps(rule))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
