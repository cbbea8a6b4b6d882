"""Label-free rules for a weak decoder's threshold, side by side, on a saved model whose
decoders recorded the mass of their last seed maps (``seed_area``; e.g. one saved by
``decoder_diagnostics.py retrain --unjudged --save``):

    python bench/threshold_rules.py --model /tmp/models/glas_np_seedarea2 \
        --json bench/results/decoder/threshold_rules_histology.json
    python bench/threshold_rules.py --model /tmp/models/lgg_np_seedarea2 \
        --data ../shared/data/lgg --json bench/results/decoder/threshold_rules_mri.json

Each rule sees only the decoders' consensus maps of up to 48 training images of mask classes
(224x224) and the seeds' mass; decoder Dice fg / bg is scored as ``weak_threshold.py`` does
(held-out train images choose, test for information, mask-class images only). Rules:
``mass`` (the lowest grid value whose masks cover no more than the mass: the default where
the probe gate stays closed), ``otsu`` (Otsu of all the maps' pixels), ``plug_in``
(``masks.plug_in_threshold``: the maps' logits shifted so that their mean is the mass, then
the threshold that maximises the Dice they expect of themselves, mapped back; the default
where the gate opens) and ``plug_in_raw`` (the same without the shift).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from weak_threshold import consensus_maps, dice, model_args, model_splits, saved_model_seeds

from wsl_models.calibration import weak_decoder_maps, weak_threshold_rule
from wsl_models.masks import otsu_threshold, plug_in_threshold
from wsl_models.versions import ModelStore


def main() -> None:
    args = model_args(__doc__)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = ModelStore(args.model)
    ensemble = store.load()
    mass, large_objects = saved_model_seeds(store)
    if mass is None:
        raise SystemExit(f"{args.model} recorded no seed mass")
    train, held, test = model_splits(store, ensemble, args.data)
    wanted = set(ensemble.config.mask_classes or ensemble.config.classes)
    maps = np.stack(consensus_maps(ensemble, [s for s in train if s.label in wanted][:48])[0])
    library_maps, _ = weak_decoder_maps(ensemble, train, 0, cam_areas=False)  # training's
    rule, threshold = weak_threshold_rule(library_maps, mass, True, large_objects)
    rules = {
        f"default ({rule})": threshold,
        "mass": weak_threshold_rule(library_maps, mass, True, False)[1],
        "otsu": float(otsu_threshold(maps.reshape(-1, maps.shape[-1]))),
        "plug_in": plug_in_threshold(maps, mass),
        "plug_in_raw": plug_in_threshold(maps, None),
    }
    scored = {name: consensus_maps(ensemble, s) for name, s in (("held_out", held), ("test", test))}
    rows = {
        rule: {"threshold": round(t, 3)} | {name: dice(m, y, t) for name, (m, y) in scored.items()}
        for rule, t in rules.items()
    }
    for rule, row in rows.items():
        print(rule, json.dumps(row))
    if args.json:
        result = {
            "model": args.model,
            "seed_mass": mass,
            "probe_gate_open": large_objects,
            "images": len(maps),
            "rules": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
