"""Learning curves with simulated annotators (GlaS; LGG with --mask-classes tumour).

Round 0: a model trained on image-level labels only. Each round a strategy picks ``k`` train
images whose ground-truth masks are then revealed; the model is fine-tuned from the previous
round (as the backend does) on labels + revealed masks (+ pseudo-masks for the rest, when on);
PxAP and foreground/background Dice are measured on the test split (GlaS: testA+testB).
Dice-AUC = mean over rounds. With --mask-classes, a picked image of another class (a normal
slice) gives its label only, as in a Label Studio project whose config masks only findings.

    python bench/learning_curve.py --data ../shared/data/glas \
        --settings random,entropy,bald,random+pseudo,entropy+pseudo,random+pseudo+minmax
    python bench/learning_curve.py --data ../shared/data/lgg --mask-classes tumour \
        --mask-weight 5 --settings random,random+clicks10+interactive

Writes bench/results/learning_curve/{results.json, curves.png, summary.md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from backend.jobs import TrainingSettings, fine_tune_schedule
from wsl_models import probe, refine
from wsl_models.acquisition import acquisition
from wsl_models.calibration import calibration_samples
from wsl_models.clicks import click_radius, click_target, save_points, simulated_clicks
from wsl_models.data import Dataset, ImageDataset, load_dataset, stratified_holdout
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.evaluation import evaluate
from wsl_models.images import open_image, open_mask, parse_size, to_tensor
from wsl_models.mask_training import segmented
from wsl_models.metrics import mean_scores, segmentation_scores
from wsl_models.train_config import recipe
from wsl_models.training import TrainConfig, train_ensemble

OUT = Path(__file__).parent / "results" / "learning_curve"
log = logging.getLogger("learning_curve")


def scores(ens: Ensemble, samples: list, strategy: str, seed: int) -> np.ndarray:
    """Acquisition value of every pool image (larger = asked first)."""
    ds = ImageDataset(samples, ens.config.classes, tuple(ens.config.image_size))
    gen = torch.Generator().manual_seed(seed)
    fn = acquisition(strategy)
    values = []
    for i in range(0, len(ds), 16):
        x = torch.stack([ds[j][0] for j in range(i, min(i + 16, len(ds)))])
        out = ens.predict(x, seed=seed)
        values.append(fn(out.mc_probs.flatten(0, 1), generator=gen))
    return torch.cat(values).numpy()


def reveal(
    ds: Dataset,
    revealed: set[str],
    clicked: dict[str, Path] | None = None,
    accepted: dict[str, Path] | None = None,
) -> Dataset:
    """The dataset as the annotators have it: train masks only where revealed; for the
    ``clicked`` images their clicks (a points file) instead of the mask, and where the
    annotator submitted the smart keypoints' mask with them (``accepted``), that mask."""
    clicked, accepted = clicked or {}, accepted or {}

    def seen(s):
        if s.split.startswith("test"):
            return s
        if s.name in clicked:
            return dataclasses.replace(s, mask=accepted.get(s.name), points=clicked[s.name])
        return s if s.name in revealed else dataclasses.replace(s, mask=None)

    return Dataset(ds.root, ds.classes, tuple(seen(s) for s in ds.samples))


def refiner(pixels: np.ndarray, prob: np.ndarray | None, features: np.ndarray | None = None):
    """The smart keypoints' re-segmentation after one click, as /predict runs it: with
    ``features`` the probe (KEYPOINTS=probe, the default), refitted on the first mask and
    every click so far; else GrabCut around the click (KEYPOINTS=grabcut)."""
    if features is None:
        return lambda mask, click: refine.apply_clicks(pixels, prob, mask, [click])
    first: list[np.ndarray] = []  # the mask before the first click: every answer refits from it
    clicks = []

    def segment(mask: np.ndarray, click) -> np.ndarray:
        if not first:
            first.append(mask)
        clicks.append(click)
        return probe.probe_clicks(features, first[0], clicks)

    return segment


def click(
    ens: Ensemble,
    samples: list,
    k: int,
    folder: Path,
    annotator: str = "piled",
    accept: bool = False,
    keypoints: str = "probe",
) -> tuple[dict[str, Path], int, dict[str, Path], list[float]]:
    """A simulated annotator's k positive + k negative clicks on each image, placed on the
    errors of ``ens``'s current mask (clicks.simulated_clicks); written as points files.
    ``annotator``: "piled" (the first simulator: clicks pile into the largest error region),
    "spread" (each click covers its inscribed disk of the error) or "interactive" (each
    click re-segments the mask through the smart keypoints, ``keypoints`` "probe" or
    "grabcut" (seeded by the served consensus map) as KEYPOINTS, and the next goes on what
    is still wrong). ``accept`` (with
    "interactive"): the annotator also submits the mask the smart keypoints made, as a
    Label Studio annotation holds both; returned with each such mask's Dice against the truth.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths, total, accepted, dices = {}, 0, {}, []
    for s in samples:
        image = open_image(s.image)
        truth = open_mask(s.mask, image.size)
        out = ens.predict(to_tensor(image, ens.config.input_size)[None], seed=0)
        res = ens.masks(out, 0, truth.shape, label=ens.config.classes.index(s.label))
        mask = res.mask if res.mask is not None else np.zeros_like(truth)
        radius = click_radius(truth.shape)
        update, last = None, {"mask": mask}
        if annotator == "interactive":
            features = None
            if keypoints == "probe":
                features = probe.image_features(ens.members[0], image, ens.config.input_size)
            segment = refiner(np.asarray(image.convert("RGB")), res.intersection_map, features)

            def update(m, c, segment=segment, last=last):
                last["mask"] = segment(m, c)
                return last["mask"]

        clicks = simulated_clicks(mask, truth, k, radius, annotator == "spread", update)
        save_points(click_target(clicks, truth.shape, radius), folder / s.name)
        paths[s.name], total = folder / s.name, total + len(clicks)
        if accept and annotator == "interactive":
            final = np.asarray(last["mask"], bool)
            path = folder / f"accepted-{s.name}"
            Image.fromarray(final.astype(np.uint8) * 255).save(path)
            accepted[s.name] = path
            dices.append(100.0 * segmentation_scores(final, truth)["dice_fg"])
    return paths, total, accepted, dices


def traced_pixels(samples: list) -> int:
    """Boundary pixels of the samples' masks: what tracing them by hand would follow."""
    total = 0
    for s in samples:
        m = open_mask(s.mask)
        total += int((m & ~ndimage.binary_erosion(m)).sum())
    return total


def held_out_train(ds: Dataset, seed: int, fraction: float | None = None) -> list:
    """The train images the hash hold-out keeps out of training (the trainer's fraction
    unless given)."""
    fraction = TrainConfig().val_fraction if fraction is None else fraction
    return stratified_holdout(ds.split("train"), fraction, seed)[1]


def judge_names(ds: Dataset, seed: int, k: int) -> list[str]:
    """The ``k`` held-out train images whose masks the annotators drew first, in the order
    training would take them as calibration images (classes alternating)."""
    return [s.name for s in calibration_samples(held_out_train(ds, seed), k, None)]


def scored_split(
    ds: Dataset, split: str, seed: int, judges: tuple[str, ...] = (), fraction: float | None = None
) -> Dataset:
    """The dataset whose ``test`` split is scored: GlaS test, or with ``split="val"`` the
    train images the hash hold-out keeps out of training (never revealed, never trained on),
    the split defaults are chosen on; ``fraction`` of them (the trainer's hold-out fraction
    unless given). ``judges`` stay held-out train images, never scored."""
    if split == "test":
        return ds
    names = {s.name for s in held_out_train(ds, seed, fraction)} - set(judges)
    return Dataset(ds.root, ds.classes, tuple(
        dataclasses.replace(s, split="test") if s.name in names else
        dataclasses.replace(s, split="scored-out") if s.split.startswith("test") else s
        for s in ds.samples
    ))  # fmt: skip


def measure_all(ens: Ensemble, ds: Dataset) -> dict[str, dict[str, float]]:
    """Accuracy, PxAP and Dice fg/bg of every map source the model has (cam, localizer,
    decoder): the consensus of the members, or the member's own map for a single member."""
    r = evaluate(ens, ds, "test", progress=False)
    key = "intersection" if len(ens.members) > 1 else ens.config.member_keys[0]
    return {
        src: {
            "accuracy": r["accuracy"]["ensemble"],
            "pxap": rows[key]["pxap"],
            "dice_fg": rows[key]["dice_fg"],
            "dice_bg": rows[key]["dice_bg"],
        }
        for src, rows in r["by_source"].items()
        if src != "baselines"
    }


SWEEP = (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


def threshold_sweep(ens: Ensemble, ds: Dataset) -> dict[str, dict[str, float]]:
    """Information only: the decoder consensus's mean Dice fg / bg on the scored split at
    each threshold of SWEEP (no small-component filter), to see whether a model's masks
    are cut at the wrong probability rather than ranked wrong."""
    rows: dict[float, list[dict[str, float]]] = {t: [] for t in SWEEP}
    for s in ds.split("test"):
        image = open_image(s.image)
        truth = open_mask(s.mask, image.size)
        out = ens.predict(to_tensor(image, ens.config.input_size)[None], seed=0)
        res = ens.masks(out, 0, truth.shape, source="decoder")
        for t in SWEEP:
            rows[t].append(segmentation_scores(res.intersection_map >= t, truth))
    return {
        str(t): {k: round(v, 1) for k, v in mean_scores(r).items() if k.startswith("dice")}
        for t, r in rows.items()
    }


def mask_classes(args: argparse.Namespace) -> list[str] | None:
    return [c for c in getattr(args, "mask_classes", "").split(",") if c] or None


def train_settings(args: argparse.Namespace, epochs: int, **options: object) -> TrainConfig:
    """Settings shared by the base model and every round: no validation masks are assumed
    (unless ``options`` set ``calibration_images``)."""
    fields = {"calibration_images": 0, **options}
    cfg = TrainConfig(epochs=epochs, lr=args.lr, weights="imagenet", progress=False,
                      seed=args.seed, **fields)  # fmt: skip
    return recipe(cfg, ";".join(args.set), prefix="")  # --set field=value overrides


def run_setting(setting: str, ds: Dataset, base: Ensemble, args: argparse.Namespace) -> dict:
    name, _, overrides = setting.partition("@")  # "full@seg_max_steps=1200;seg_lr=0.002"
    parts = name.split("+")
    strategy, pseudo = parts[0], "pseudo" in parts
    full = strategy == "full"
    k_clicks = next((int(p[len("clicks") :]) for p in parts if p.startswith("clicks")), 0)
    # the simulated annotator (click()): "piled" unless the setting names "spread" or "interactive"
    annotator = next((p for p in parts if p in ("spread", "interactive")), "piled")
    # "accept": the annotator submits the smart keypoints' mask beside the clicks (interactive)
    accept = "accept" in parts
    # the smart keypoints the interactive annotator uses: the probe (default) or "grabcut"
    keypoints = "grabcut" if "grabcut" in parts else "probe"
    # "judged": the first masks go to the --judges held-out images, which then choose the
    # segmenter's checkpoint and threshold; round 1 reveals that many fewer train images
    judges = tuple(getattr(args, "judges_names", ())) if "judged" in parts else ()
    if "judged" in parts and not judges:
        raise SystemExit(f"{setting}: 'judged' needs --judges K")
    if accept and annotator != "interactive":
        raise SystemExit(f"{setting}: 'accept' needs the interactive annotator")
    clicked: dict[str, Path] = {}
    accepted: dict[str, Path] = {}
    accepted_dice: list[float] = []
    effort = 0
    points_dir = Path(tempfile.mkdtemp(prefix="camlabel-clicks-"))
    if k_clicks:  # bench/click_recipes.py retrains on these clicks
        log.info("%s: clicks written to %s", setting, points_dir)
    tcfg = train_settings(
        args,
        args.round_epochs,
        train_masks=True,
        mask_weight=args.mask_weight,
        pseudo_weight=args.pseudo_weight if pseudo else 0.0,
        minmax="minmax" in parts,
        calibration_images=len(judges),
    )
    tcfg = recipe(tcfg, overrides, prefix="")  # this setting's own TrainConfig fields
    train, _held = stratified_holdout(ds.split("train"), tcfg.val_fraction, tcfg.seed)
    revealed: set[str] = set(judges)
    current = base
    rounds = [{"round": 0, "masks": 0, **measure_all(base, ds)}]
    log.info("%s round 0: %s", setting, rounds[-1])
    for r in range(1, (1 if full else args.rounds) + 1):
        t0 = time.perf_counter()
        left = [s for s in train if s.name not in revealed]
        if full:
            picked = [s.name for s in left]
        else:
            values = scores(current, left, "random" if strategy == "random" else strategy, r)
            k = args.k - (len(judges) if r == 1 else 0)
            picked = [left[i].name for i in np.argsort(-values, kind="stable")[:k]]
        revealed |= set(picked)
        chosen = [s for s in left if s.name in set(picked)]
        if k_clicks:
            # Points files are derived from the dataset's masks: kept out of the results folder.
            # An image of a class without objects (a normal slice) gets its label, no clicks.
            wanted = current.config.mask_classes or current.config.classes
            paths, n, masks, dices = click(
                current, [s for s in chosen if s.label in wanted], k_clicks,
                points_dir / f"round{r}", annotator, accept, keypoints,
            )  # fmt: skip
            clicked.update(paths)
            accepted.update(masks)
            accepted_dice.extend(dices)
            effort += n
        else:
            judged_now = [s for s in ds.samples if s.name in judges] if r == 1 else []
            effort += traced_pixels(chosen + judged_now)
        data = reveal(ds, revealed, clicked, accepted)
        rcfg = tcfg
        if args.job_schedule:  # what a Label Studio job fine-tuning ``current`` would run
            rcfg = fine_tune_schedule(
                tcfg, TrainingSettings.from_env(), current.config.members, segmented(current)
            )
        current, metrics = train_ensemble(data, current.config, rcfg, init=current)
        row = {
            "round": r,
            "masks": len(revealed),
            "picked": picked,
            # clicks placed so far, or for full masks the boundary pixels traced so far
            "effort": {"clicks" if k_clicks else "traced_pixels": effort},
            **(
                {"accepted_mask_dice_fg": round(float(np.mean(accepted_dice)), 1)}
                if accepted_dice
                else {}
            ),
            "pseudo_masks": metrics["pseudo_masks"],
            "seconds": round(time.perf_counter() - t0, 1),
            "segmentation_seconds": metrics.get("segmentation", {}).get("seconds"),
            "segmentation_steps": max(
                (
                    v.get("steps", 0)
                    for v in metrics.get("segmentation", {}).values()
                    if isinstance(v, dict)
                ),
                default=0,
            ),  # fmt: skip
            **measure_all(current, ds),
        }
        if args.threshold_sweep and current.config.decoder:
            row["decoder_threshold_sweep"] = threshold_sweep(current, ds)
        rounds.append(row)
        log.info("%s round %d: %s", setting, r, {k: v for k, v in row.items() if k != "picked"})
    dice = [row["cam"]["dice_fg"] for row in rounds]
    result = {"setting": setting, "rounds": rounds, "dice_auc": float(np.mean(dice))}
    if base.config.decoder:
        result["dice_auc_decoder"] = float(np.mean([row["decoder"]["dice_fg"] for row in rounds]))
        result["dice_bg_auc_decoder"] = float(
            np.mean([row["decoder"]["dice_bg"] for row in rounds])
        )
    if base.config.localizer:
        result["dice_auc_localizer"] = float(
            np.mean([row["localizer"]["dice_fg"] for row in rounds])
        )
    return result


def train_base(ds: Dataset, args: argparse.Namespace, minmax: bool) -> Ensemble:
    cfg = EnsembleConfig(
        classes=list(ds.classes),
        members=args.members.split(","),
        image_size=parse_size(args.size),
        localizer=minmax,
        decoder=args.decoder,
        mask_classes=mask_classes(args),
    )
    tcfg = train_settings(args, args.init_epochs, minmax=minmax)
    t0 = time.perf_counter()
    ens, _ = train_ensemble(reveal(ds, set()), cfg, tcfg)
    log.info("base (minmax=%s) trained in %.0f s", minmax, time.perf_counter() - t0)
    return ens


def state(ens: Ensemble) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(ens.members) for k, v in m.state_dict().items()}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        masks = [row["masks"] for row in res["rounds"]]
        for ax, key in zip(axes, ("dice_fg", "pxap"), strict=True):
            ax.plot(
                masks, [row["cam"][key] for row in res["rounds"]], marker="o", label=res["setting"]
            )
            for src, style in (("localizer", "--"), ("decoder", ":")):
                if src in res["rounds"][0]:
                    ax.plot(
                        masks,
                        [row[src][key] for row in res["rounds"]],
                        marker="x",
                        linestyle=style,
                        label=f"{res['setting']} ({src} map)",
                    )
    for ax, title in zip(axes, ("foreground Dice (test split)", "PxAP (test split)"), strict=True):
        ax.set_xlabel("human masks revealed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Learning curves, {Path(args.data).name} train -> "
        f"{'the held-out train images' if getattr(args, 'score_on', 'test') == 'val' else 'test'}, "
        f"members {args.members}, input {args.size}, "
        f"k={args.k} masks/round, {args.rounds} rounds, {args.init_epochs} base epochs, "
        f"{args.round_epochs} epochs/round, mask weight {args.mask_weight}, pseudo weight "
        f"{args.pseudo_weight}, seed {args.seed}"
        + (", the Label Studio job's schedule" if getattr(args, "job_schedule", False) else "")
        + (f", settings {' '.join(args.set)}." if args.set else "."),
        "",
        "| setting | map | Dice-AUC | round 0 Dice fg / bg / PxAP | last round Dice fg / bg / PxAP | masks |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        for src in res["rounds"][0]:
            if not isinstance(res["rounds"][0][src], dict):
                continue
            first, last = res["rounds"][0][src], res["rounds"][-1][src]
            auc = np.mean([row[src]["dice_fg"] for row in res["rounds"]])
            lines.append(
                f"| {res['setting']} | {src} | {auc:.1f} "
                f"| {first['dice_fg']:.1f} / {first['dice_bg']:.1f} / {first['pxap']:.1f} "
                f"| {last['dice_fg']:.1f} / {last['dice_bg']:.1f} / {last['pxap']:.1f} "
                f"| {res['rounds'][-1]['masks']} |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (bench/click_recipes.py takes its defaults from here too)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--members", default="efficientnet_lite0")
    p.add_argument("--size", default="224")
    p.add_argument("--mask-classes", default="",
                   help="comma-separated classes with objects (LGG: tumour); images of the "
                   "others are picked like any, but give only their label: no mask, no "
                   "clicks (default: every class)")  # fmt: skip
    p.add_argument(
        "--settings",
        default="random,entropy,bald,random+pseudo",
        help="comma-separated; SETTING@field=value;field=value overrides TrainConfig "
        "fields for that setting alone (e.g. full@seg_max_steps=1200)",
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--init-epochs", type=int, default=20)
    p.add_argument("--round-epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mask-weight", type=float, default=1.0)
    p.add_argument("--pseudo-weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-decoder", dest="decoder", action="store_false")
    p.add_argument("--set", action="append", default=[], help="TrainConfig field=value")
    p.add_argument("--job-schedule", action="store_true",
                   help="each round runs the schedule of a Label Studio job fine-tuning the "
                   "previous round (backend.jobs.fine_tune_schedule, TRAIN_* settings)")  # fmt: skip
    p.add_argument("--score-on", choices=["test", "val"], default="test",
                   help="val: score on the held-out train images (to choose defaults)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=None,
                   help="with --score-on val: score this fraction of the train images "
                   "(default: the trainer's hold-out)")  # fmt: skip
    p.add_argument("--judges", type=int, default=0,
                   help="K held-out train images, never scored, whose masks settings naming "
                   "'judged' reveal first (part of round 1's k) to choose checkpoints and "
                   "thresholds")  # fmt: skip
    p.add_argument("--threshold-sweep", action="store_true",
                   help="also record the decoder's Dice at several thresholds each round")  # fmt: skip
    p.add_argument("--out", default=str(OUT))
    return p


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data)
    if args.judges and args.val_fraction is not None:  # judges are the trainer's hold-out
        raise SystemExit("--judges needs the trainer's hold-out: leave --val-fraction out")
    args.judges_names = judge_names(data, args.seed, args.judges) if args.judges else []
    ds = scored_split(data, args.score_on, args.seed, tuple(args.judges_names), args.val_fraction)
    settings = [s for s in args.settings.split(",") if s]
    bases: dict[bool, Ensemble] = {}
    results = []
    for setting in settings:
        minmax = "minmax" in setting.partition("@")[0].split("+")
        if minmax not in bases:
            bases[minmax] = train_base(ds, args, minmax)
        base = bases[minmax]

        snapshot = {k: v.clone() for k, v in state(base).items()}
        results.append(run_setting(setting, ds, base, args))
        check = state(base)
        assert all(torch.equal(snapshot[k], check[k]) for k in snapshot), "base was modified"
        (out / "results.json").write_text(
            json.dumps({"args": vars(args), "results": results}, indent=1)
        )
        plot(results, out / "curves.png")
        (out / "summary.md").write_text(summary(results, args))
    print(summary(results, args))


if __name__ == "__main__":
    main()
