"""Flip test-time augmentation of a saved model's maps: none, the mirrored image
(``tta_flip``) and four views (``tta_vflip`` too: upside down and both ways), each with the
decoder threshold the version would get from those maps (held-out masks calibrate it where
the model's training had them, else ``weak_decoder_threshold`` with the recorded seeds):

    python bench/flip_tta.py --model /tmp/models/glas_np27 \
        --json bench/results/decoder/flip_tta_histology_new.json
    python bench/flip_tta.py --model /tmp/models/lgg_np26 --data ../shared/data/lgg \
        --json bench/results/decoder/flip_tta_mri_new.json

Held-out train images (mask classes) choose, test for information; decoder consensus PxAP
and Dice fg / bg at 224x224, and the seconds the test maps took (views cost backbone passes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from weak_threshold import consensus_maps, dice, model_args, model_splits, saved_model_seeds

from wsl_models.calibration import mask_thresholds, weak_decoder_threshold
from wsl_models.ensemble import TTA_VIEWS
from wsl_models.metrics import pxap
from wsl_models.versions import ModelStore


def main() -> None:
    args = model_args(__doc__)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = ModelStore(args.model)
    ensemble = store.load()
    metrics = store.manifest(store.current_id())["metrics"]
    train, held, test = model_splits(store, ensemble, args.data)
    calibrated = set((metrics.get("calibration") or {}).get("images") or ())
    calib = [s for s in held if s.name in calibrated]  # held-out images of mask classes
    rows = {}
    for name in TTA_VIEWS:
        ensemble.config.set_tta(name)
        if calib:  # as training calibrates with held-out masks
            mask_thresholds(ensemble, calib, 0)
            rule = "calibrated"
        else:
            rule = weak_decoder_threshold(ensemble, train, 0, *saved_model_seeds(store))["rule"]
        t = ensemble.config.decoder_threshold
        row = {"threshold": round(float(t), 3), "rule": rule}
        for split, samples in (("held_out", held), ("test", test)):
            start = time.perf_counter()
            maps, truths = consensus_maps(ensemble, samples)
            row[split] = {"pxap": round(pxap(maps, truths), 1), "dice_fg_bg": dice(maps, truths, t)}
            row[split]["seconds"] = round(time.perf_counter() - start, 1)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        result = {"model": args.model, "data": args.data, "views": rows}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
