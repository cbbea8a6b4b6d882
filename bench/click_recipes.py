"""Training recipes for clicks, compared on the same clicks: one fine-tuning job each.

A learning curve (bench/learning_curve.py) places each round's clicks on the errors of the
previous round's model, so two recipes are judged on different clicks, and one run carries the
noise of four rounds. Here the clicks are fixed: the points files a learning-curve run wrote
(its log names the folder, ``round1`` ... ``roundN``), every one of them used in a single job
that fine-tunes the same labels-only base model (trained once, kept in ``--base``). The
reference rows train on the full masks of the first N of those images instead (``--masks N``).

    python bench/learning_curve.py --data ../shared/data/glas --settings random+clicks10 \\
        --mask-weight 5 --score-on val --out /tmp/lc        # log: "clicks written to DIR"
    python bench/click_recipes.py --points DIR --name default
    python bench/click_recipes.py --points DIR --name masks16 --masks 16
    python bench/click_recipes.py --points DIR --name steps640 --set seg_max_steps=800

Scores the decoder (Lite0, 224 px) on GlaS's held-out train images, which choose, and on
testA + testB, for information; appends one JSON row per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_curve as lc  # noqa: E402

from wsl_models.data import load_dataset  # noqa: E402
from wsl_models.train_config import recipe  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--points", required=True, help="a learning-curve run's clicks folder")
    p.add_argument("--name", required=True)
    p.add_argument("--masks", type=int, default=0, help="train on the masks of the first N")
    p.add_argument("--set", default="", help="TrainConfig overrides field=value;field=value")
    p.add_argument("--base", default="/tmp/camlabel-click-recipes-base")
    p.add_argument("--out", default="bench/results/click_recipes.jsonl")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # The learning curve's settings (Lite0 at 224, 20 base epochs, 6 per job, seed 0) with the
    # mask weight its clicks runs use.
    args = lc.build_parser().parse_args(["--data", a.data, "--mask-weight", "5"])
    full = load_dataset(a.data)
    held = lc.scored_split(full, "val", args.seed)  # training never sees the scored images
    store = ModelStore(Path(a.base))
    if store.current_id() is None:
        store.save(lc.train_base(held, args, False), {})
    base = store.load()
    points = {f.name: f for f in sorted(Path(a.points).glob("round*/*.png"))}
    if not points:
        raise SystemExit(f"no round*/ points files in {a.points}")
    names = list(points)
    if a.masks:
        data = lc.reveal(held, set(names[: a.masks]))
    else:
        data = lc.reveal(held, set(names), points)
    # As a learning-curve round without the "pseudo" setting part: no CAM pseudo-masks.
    cfg = lc.train_settings(
        args, args.round_epochs, train_masks=True, mask_weight=args.mask_weight, pseudo_weight=0.0
    )
    cfg = recipe(cfg, a.set, prefix="")
    t0 = time.perf_counter()
    ens, _ = lc.train_ensemble(data, base.config, cfg, init=base)
    seconds = time.perf_counter() - t0

    def rounded(scores: dict) -> dict:
        return {k: round(v, 1) for k, v in scores["decoder"].items()}

    row = {
        "name": a.name,
        "trained_on": f"masks of {a.masks} images" if a.masks else f"clicks on {len(names)} images",
        "set": a.set,
        "seconds": round(seconds),
        "held_out_train": rounded(lc.measure_all(ens, held)),
        "test": rounded(lc.measure_all(ens, full)),
    }
    print(json.dumps(row))
    with open(a.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
