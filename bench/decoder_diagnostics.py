"""Why the decoder does what it does on GlaS: seed precision, and decoder-only retraining.

    # which seed map localizes best on the train masks (1x and 2x the input):
    python bench/decoder_diagnostics.py seedmaps --model MODEL_DIR \
        --cams xgradcam,gradcam++,layercam,layercam@16,layercam@8 --json OUT.json
    # how often the CAM seeds are right, on the training images (not the test split):
    python bench/decoder_diagnostics.py seeds --model MODEL_DIR --cams xgradcam,gradcam++,cam
    # retrain only the decoders of a saved model with other TrainConfig values:
    python bench/decoder_diagnostics.py retrain --model MODEL_DIR decoder_affinity_weight=0
    # the ceilings: seeds from the true train masks, or as imprecise as the CAM's at random
    # positions (57 % / 61 % right):
    python bench/decoder_diagnostics.py retrain --model MODEL_DIR --ceiling truth
    python bench/decoder_diagnostics.py retrain --model MODEL_DIR --ceiling 0.57,0.61
    # what a project without held-out masks gets (they score, never choose or calibrate):
    python bench/decoder_diagnostics.py retrain --model MODEL_DIR --unjudged
    # a project with only K held-out masks (they choose and calibrate, the rest score), each
    # model saved, then all scored on the same held-out images (those after the first 3):
    python bench/decoder_diagnostics.py retrain --model MODEL_DIR --judges K --save OUT_K
    python bench/decoder_diagnostics.py score --model OUT_0,OUT_1,OUT_2,OUT_3 --scored-from 3

MODEL_DIR: a model trained on GlaS with a decoder (``bench/train_time.py --keep DIR``).
``retrain`` prints two scores: PxAP of the decoders' consensus on the pixel-labelled held-out
train images (the ones that choose the epoch: what defaults are chosen on) and survey PxAP on
the test split (a diagnostic, never a way to choose defaults). Append ``--json FILE`` to add a
row to a results file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from weak_threshold import consensus_maps, dice, saved_model_seeds

from wsl_models import decoder_training
from wsl_models.calibration import (
    MIN_DECODER_CALIBRATION,
    calibration_samples,
    choose_map_source,
    mask_thresholds,
    seeds_recorded,
    weak_decoder_threshold,
)
from wsl_models.cam import cam_method, normalize_maps, resize_maps
from wsl_models.data import ImageDataset, load_dataset, load_masks, stratified_holdout
from wsl_models.decoder import FPNDecoder
from wsl_models.decoder_training import plan_targets, train_decoders
from wsl_models.ensemble import EnsembleConfig
from wsl_models.evaluation import evaluate
from wsl_models.masks import resize_mask
from wsl_models.metrics import pxap
from wsl_models.supervision import IGNORE
from wsl_models.train_config import TrainConfig
from wsl_models.versions import ModelStore

GRID = (56, 56)  # the Lite decoders' grid at 224 px
THRESHOLDS = ("member_thresholds", "intersection_threshold", "mean_threshold", "decoder_threshold")


def seeds(args: argparse.Namespace) -> None:
    ens = ModelStore(args.model).load()
    ds = load_dataset(args.data)
    cfg = TrainConfig()
    train_s, _ = stratified_holdout(ds.split("train"), cfg.val_fraction, cfg.seed)
    truths = [resize_mask(t, GRID) for t in load_masks(train_s)]
    print(f"ground-truth foreground: {np.mean([t.mean() for t in truths]):.3f} of the pixels")
    _, plan = plan_targets(ens, train_s, [None] * len(train_s), cfg)
    hit_fg = all_fg = hit_bg = all_bg = 0
    for region, t in zip(plan.seed_regions(GRID, cfg), truths, strict=True):
        if region is None:
            continue
        fg, bg = region
        hit_fg, all_fg = hit_fg + (t & fg).sum(), all_fg + fg.sum()
        hit_bg, all_bg = hit_bg + (~t & bg).sum(), all_bg + bg.sum()
    print(
        f"seed regions (defaults): foreground {hit_fg / all_fg:.3f} on glands, "
        f"background {hit_bg / all_bg:.3f} off them"
    )
    ids = ImageDataset(train_s, ens.config.classes, ens.config.image_size)
    x = torch.stack([ids[i][0] for i in range(len(ids))])
    for method in args.cams.split(","):
        ens.cam = cam_method(method)
        for mode in ("class", "max"):
            ens.config.map_mode = mode
            mins, maxs = [], []
            for s in range(0, len(x), 16):
                out = ens.predict(x[s : s + 16], seed=0)
                for b in range(len(out.label)):
                    m = resize_maps(ens.source_maps(out, b, ids.labels[s + b], "cam"), GRID)
                    mins.append(m.numpy().min(0))
                    maxs.append(m.numpy().max(0))
            row = []
            for q in (0.05, 0.1, 0.2, 0.3):
                fg = np.mean(
                    [
                        t[m >= np.quantile(m, 1 - q)].mean()
                        for m, t in zip(mins, truths, strict=True)
                    ]
                )
                bg = np.mean(
                    [(~t)[m <= np.quantile(m, q)].mean() for m, t in zip(maxs, truths, strict=True)]
                )
                row.append(f"top/bottom {q:.0%}: fg {fg:.2f} bg {bg:.2f}")
            print(method, mode, " | ".join(row))


class TruthSeeds:
    """The ceiling drawer: 16 + 16 seeds from the true masks, each foreground seed on a gland
    with probability ``p_fg`` (else off one), each background seed off glands with ``p_bg``."""

    def __init__(self, truths: list[np.ndarray], cfg: TrainConfig, p_fg: float, p_bg: float, seed):
        self.truths, self.cfg, self.p = truths, cfg, (p_fg, p_bg)
        self.rng = np.random.default_rng(seed)

    def draw(self, idx: np.ndarray) -> np.ndarray:
        out = np.full((len(idx), *self.truths[0].shape), IGNORE, np.uint8)
        for row, i in enumerate(idx):
            t = self.truths[i]
            for value, n, p, inside in ((1, self.cfg.decoder_seed_fg, self.p[0], t),
                                        (0, self.cfg.decoder_seed_bg, self.p[1], ~t)):  # fmt: skip
                right = self.rng.binomial(n, p)
                for region, k in ((inside, right), (~inside, n - right)):
                    pix = np.flatnonzero(region)
                    if len(pix) and k:
                        out[row].flat[
                            self.rng.choice(pix, size=min(k, len(pix)), replace=False)
                        ] = value
        return out


def retrain(args: argparse.Namespace) -> None:
    ens = ModelStore(args.model).load()
    ds = load_dataset(args.data)
    base = TrainConfig()
    values = {}
    for item in args.settings:
        key, raw = item.split("=", 1)
        cur = getattr(base, key)
        values[key] = (
            tuple(float(v) for v in raw.split(","))
            if isinstance(cur, tuple)
            else (raw or None)
            if cur is None or isinstance(cur, str)
            else type(cur)(raw)
        )
    cfg = dataclasses.replace(base, **values)
    train_s, held = stratified_holdout(ds.split("train"), cfg.val_fraction, cfg.seed)
    calib = calibration_samples(held, cfg.calibration_images, ens.config.mask_classes)
    if args.ceiling:
        p_fg, p_bg = (1.0, 1.0) if args.ceiling == "truth" else map(float, args.ceiling.split(","))
        masks = load_masks(train_s)

        def drawer(plan, grid, rcfg, seed):
            return TruthSeeds([resize_mask(m, grid) for m in masks], rcfg, p_fg, p_bg, seed)

        decoder_training.SeedDrawer = drawer
        values["ceiling"] = args.ceiling
    torch.manual_seed(0)
    for m in ens.members:
        m.decoder = FPNDecoder([lateral.in_channels for lateral in m.decoder.lateral])
    t0 = time.perf_counter()
    judges = () if args.unjudged else calib
    if args.judges >= 0 and not args.unjudged:  # a project with only K held-out masks
        judges, calib = calib[: args.judges], calib[args.judges :]
    report = train_decoders(ens, train_s, [None] * len(train_s), cfg, torch.device("cpu"), judges)
    seconds = time.perf_counter() - t0
    conf = ens.config
    held_pxap = mask_thresholds(ens, calib, cfg.seed)["pxap"] if calib else {}
    if args.unjudged:  # a new project: no masks ever calibrated a threshold
        fresh = EnsembleConfig(classes=conf.classes, members=conf.members)
        for k in THRESHOLDS:  # mask_thresholds set them from the held-out masks, as had training
            setattr(conf, k, copy.deepcopy(getattr(fresh, k)))
        values["unjudged"] = weak_decoder_threshold(ens, train_s, cfg.seed, *seeds_recorded(report))
        values["held_out_dice_fg_bg"] = dice(*consensus_maps(ens, calib), conf.decoder_threshold)
    if args.judges >= 0 and not args.unjudged:
        # As training calibrates: thresholds and the map source from the K judges only; the
        # other held-out images score (mask_thresholds above set thresholds from them: redone).
        found = mask_thresholds(ens, list(judges), cfg.seed) if judges else {}
        if found:
            values["map_source"] = choose_map_source(ens, found["pxap"])
        if len(judges) < MIN_DECODER_CALIBRATION:  # too few to set the decoder's threshold
            values["weak"] = weak_decoder_threshold(ens, train_s, cfg.seed, *seeds_recorded(report))
        values["judges"] = [s.name for s in judges]
        values["held_out_dice_fg_bg"] = dice(*consensus_maps(ens, calib), conf.decoder_threshold)
    r = evaluate(ens, ds, "test", progress=False, protocol="survey", sources=["decoder", "cam"])
    row = {
        "settings": values,
        "decoder_seconds": round(seconds, 1),
        "held_out_pxap": {k: round(v, 1) for k, v in held_pxap.items()},
        "test_survey_pxap": {
            src: {k: round(v["pxap"], 1) for k, v in r["by_source"][src].items()}
            for src in ("decoder", "cam")
        },
        "dice_fg_bg": [
            round(r["by_source"]["decoder"]["intersection"][k], 1) for k in ("dice_fg", "dice_bg")
        ],  # fmt: skip
        "selected_epochs": {
            k: v.get("selected_epoch") for k, v in report.items() if k in ens.config.member_keys
        },
        "probe_gate": report.get("probe_gate"),
        "seed_area": report.get("seed_area"),
        "self_seed_kept": {
            k: {
                m: [r["previous_held_out_pxap"], r["held_out_pxap"], r["kept"]]
                for m, r in v.items()
            }
            for k, v in report.items()
            if "_round_" in k
        },
    }
    print(json.dumps(row), flush=True)
    if args.save:  # the retrained model, for bench/weak_threshold.py and the like
        ModelStore(args.save).save(ens, {"held_out": [s.name for s in held], "retrain": row})
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*rows, row], indent=2))


def score(args: argparse.Namespace) -> None:
    """Saved models (``retrain --save``), comma-separated, scored on the same held-out images:
    the calibration images from ``--scored-from`` on. Decoder consensus PxAP, and Dice fg / bg
    at each model's own threshold and at the weak one (``weak_decoder_threshold`` with the seed
    mass its retraining recorded, what a weak decoder gets with fewer than
    ``MIN_DECODER_CALIBRATION`` held-out masks), there and on the test split (survey size)."""
    ds = load_dataset(args.data)
    base = TrainConfig()
    train_s, held = stratified_holdout(ds.split("train"), base.val_fraction, base.seed)
    scored = calibration_samples(held, base.calibration_images, None)[args.scored_from :]
    test = [s for s in ds.samples if s.split.startswith("test")]
    rows = []
    for model in args.model.split(","):
        ens = ModelStore(model).load()
        t = ens.config.decoder_threshold
        seeds = saved_model_seeds(ModelStore(model))
        weak = weak_decoder_threshold(ens, train_s, base.seed, *seeds)["threshold"]  # sets it
        row = {"model": model, "threshold": t, "weak_threshold": weak}
        for name, samples in (("held_out", scored), ("test", test)):
            maps, truths = consensus_maps(ens, samples)
            row[name] = {
                "pxap": round(pxap(maps, truths), 1),
                "dice_fg_bg": dice(maps, truths, t),
                "dice_fg_bg_weak": dice(maps, truths, weak),
            }
        row["held_out"]["images"] = [s.name for s in scored]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def seed_maps(args: argparse.Namespace) -> None:
    """PxAP of candidate seed maps (the true class's, min over members) on every GlaS *train*
    image at 1x and 2x the input, scored at the input size: which map the seeds should come
    from, chosen on train masks. ``--cams`` names closed-form methods, or ``layercam@8`` /
    ``layercam@16``: pytorch-grad-cam's LayerCAM at the decoder's stride-8 / stride-16 tap."""
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from wsl_models.images import scaled_size

    ens = ModelStore(args.model).load()
    samples = load_dataset(args.data).split("train")
    size = tuple(ens.config.image_size)
    truths = [resize_mask(t, size).astype(bool) for t in load_masks(samples)]

    def map_of(name: str):
        """(member, image, class) -> that member's map of the class, for one method."""
        if "@" not in name:
            method = cam_method(name)
            return lambda member, x, c: method(member, x)[0, c]
        tap = {"8": -2, "16": -1}[name.split("@")[1]]
        layers = {id(m): dict(m.features.named_modules())[m.taps[tap]] for m in ens.members}

        def layer_cam(member, x: torch.Tensor, c: int) -> torch.Tensor:
            with LayerCAM(model=member, target_layers=[layers[id(member)]]) as cam:
                return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0])

        return layer_cam

    rows = []
    for scale in (1.0, 2.0):
        ids = ImageDataset(samples, ens.config.classes, scaled_size(size, scale))
        for name in args.cams.split(","):
            start, maps, member_map = time.perf_counter(), [], map_of(name)
            for i in range(len(ids)):
                x, c = ids[i][0][None], int(ids[i][1])
                per = [member_map(m, x, c) for m in ens.members]
                per = normalize_maps(resize_maps(torch.stack([m.float() for m in per]), size))
                maps.append(per.numpy().min(0))
            rows.append({"cam": name, "scale": scale, "train_pxap": round(pxap(maps, truths), 1),
                         "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["seeds", "retrain", "seedmaps", "score"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--cams", default="xgradcam,gradcam++,cam")
    p.add_argument("--ceiling", default="", help="retrain: 'truth' or 'P_FG,P_BG' seeds")
    p.add_argument("--json", default="", help="retrain: append the row to this JSON list")
    p.add_argument(
        "--unjudged",
        action="store_true",
        help="retrain as a new project would: no held-out masks choose or calibrate (they "
        "only score), the CAMs keep Otsu, the decoder's threshold matches its last seed maps' "
        "mass (weak_decoder_threshold)",
    )
    p.add_argument(
        "--judges",
        type=int,
        default=-1,
        help="retrain: only the first K held-out masks choose and calibrate; the others score",
    )
    p.add_argument("--save", default="", help="retrain: save the retrained model here")
    p.add_argument("--scored-from", type=int, default=0, help="score: skip the first N images")
    p.add_argument("settings", nargs="*", help="retrain: TrainConfig field=value ...")
    args = p.parse_intermixed_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"seeds": seeds, "retrain": retrain, "seedmaps": seed_maps, "score": score}[args.what](args)


if __name__ == "__main__":
    main()
