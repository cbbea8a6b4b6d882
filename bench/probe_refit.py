"""Per training image: does the probe's re-fit of the decoders' consensus find the object
better than the consensus, and how much of the image do the seed CAMs cover?

    python bench/probe_refit.py --model /tmp/models/glas_unjudged --data ../shared/data/glas \
        --json bench/results/decoder/probe_refit_histology.json

Scores each seeded training image's AP (pixels, the train masks) of the consensus the probe
round starts from and of the probe's re-fit (``decoder_training.probe_seed_maps``), and
prints their means, the share of images the re-fit improved, the maps' mean values and the
seed cover that gates unjudged probe rounds (``DecoderTargets.seed_cover``). Train images
only: what the gate was chosen on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from weak_threshold import model_args, model_splits

from wsl_models.data import load_masks
from wsl_models.decoder_training import (
    cache_taps,
    cover_grid,
    decoder_probs,
    plan_targets,
    probe_seed_maps,
)
from wsl_models.masks import resize_mask
from wsl_models.train_config import TrainConfig
from wsl_models.versions import ModelStore


def main() -> None:
    args = model_args(__doc__)
    store = ModelStore(args.model)
    ensemble = store.load()
    train, _, _ = model_splits(store, ensemble, args.data)
    images, plan = plan_targets(ensemble, train, [None] * len(train), TrainConfig())
    cpu = torch.device("cpu")
    maps = [decoder_probs(m, cache_taps(m, images, cpu))[:, 0].cpu() for m in ensemble.members]
    refined = probe_seed_maps(ensemble, images, plan, maps)
    truths = load_masks(train)
    rows = []
    for i, cams in enumerate(plan.cams):
        if cams is None:
            continue
        agree = plan.agree[i]
        start = torch.stack([maps[k][i] for k in agree]).amin(0).numpy()
        refit = torch.stack([refined[k][i] for k in agree]).amin(0).numpy()
        y = resize_mask(truths[i], start.shape).ravel() > 0
        if not y.any():
            continue
        rows.append(
            {
                "image": train[i].name,
                "ap_consensus": average_precision_score(y, start.ravel()),
                "ap_refit": average_precision_score(y, refit.ravel()),
                "mean_consensus": float(start.mean()),
                "mean_refit": float(refit.mean()),
                "true_area": float(y.mean()),
            }
        )
    gain = np.array([r["ap_refit"] - r["ap_consensus"] for r in rows])
    summary = {
        "model": args.model,
        "images": len(rows),
        "seed_cover": plan.seed_cover(cover_grid(images)),
        "improved_share": float((gain > 0).mean()),
        **{
            k: round(float(np.mean([r[k] for r in rows])), 4)
            for k in ("ap_consensus", "ap_refit", "mean_consensus", "mean_refit", "true_area")
        },
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "per_image": rows}, indent=1))


if __name__ == "__main__":
    main()
