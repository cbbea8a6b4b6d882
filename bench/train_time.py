"""Wall time of a default `camlabel train`, stage by stage, and the quality it reaches.

    python bench/train_time.py --data ../shared/data/glas --seeds 0,1 \\
        --out bench/results/train_time/histology_now.json
    python bench/train_time.py --data ../shared/data/lgg --seeds 0,1 --mask-classes tumour \\
        --out bench/results/train_time/mri_now.json

Each seed runs the `camlabel train` command's own code path (its argument defaults, then
``wsl_models.cli._train``) into a temporary model directory, with timers wrapped around the
trainer's stages (classifier members, pseudo/pixel set, decoders, calibration, saving), then
evaluates the saved version on the test split under both protocols (survey: 224x224 masks, the
true class's map; native: each image at its own size).

It only wraps module-level functions that the trainer had before and after the fast-training
change, so the same script measures an older checkout: put that checkout first on PYTHONPATH
(``PYTHONPATH=/tmp/base python bench/train_time.py ...``); ``--label`` names the run.
``--anatomy`` also times one epoch of each member the old way (decode, augmentation, forward,
backward, validation), which is where the old trainer's time went.
Run it alone on the machine: two torch processes on two cores slow each other several times.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine  # noqa: E402

from wsl_models import cli, decoder_training, training  # noqa: E402
from wsl_models.data import (  # noqa: E402
    ImageDataset,
    class_balanced_weights,
    load_dataset,
    stratified_holdout,  # noqa: E402
)
from wsl_models.evaluation import evaluate  # noqa: E402
from wsl_models.members import build_member  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

STAGES = {
    "classifiers": "train_member",
    "pixel_set": "_pixel_train_set",
    "decoders": "train_decoders",
    "calibration": "calibrate",
}
# Inside the decoder stage (reported apart: they are part of "decoders"): the seed plan (class
# agreement and seed CAMs), the tap caches, the training loops (held-out scoring included) and
# the held-out scoring alone.
DECODER_STAGES = {
    "plan": "plan_targets",
    "taps": "cache_taps",
    "training": "train_decoder",
}


def _timed(times: dict[str, float], name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[name] += time.perf_counter() - t0

    return wrapper


@contextlib.contextmanager
def timers(times: dict[str, float], inner: dict[str, float]):
    """Wrap the trainer's stages in timers, and put every original back on the way out.

    One list of (owner, attribute, bucket, stage): owners are modules or classes, and an
    attribute the measured trainer lacks (an older checkout) is skipped."""
    targets = [(training, name, times, stage) for stage, name in STAGES.items()]
    targets += [(decoder_training, name, inner, stage) for stage, name in DECODER_STAGES.items()]
    targets += [
        (getattr(decoder_training, "HeldOut", None), "score", inner, "held_out_scoring"),
        (ModelStore, "save", times, "save"),
    ]
    patched = []
    try:
        for owner, name, bucket, stage in targets:
            if owner is not None and hasattr(owner, name):
                original = owner.__dict__.get(name, getattr(owner, name))
                patched.append((owner, name, original))
                setattr(owner, name, _timed(bucket, stage, getattr(owner, name)))
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def train_once(data: str, seed: int, extra: list[str], keep: Path | None) -> dict:
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or Path(tmp) / "model"
        args = parser.parse_args(
            ["train", "--data", data, "--out", str(out), "--seed", str(seed), *extra]
        )
        times: dict[str, float] = defaultdict(float)
        inner: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        with timers(times, inner):
            try:
                cli._train(args)
            finally:
                wall = time.perf_counter() - t0
        store = ModelStore(out)
        ensemble = store.load(None, device=torch.device("cpu"))
        manifest = json.loads((out / "versions" / store.current_id() / "manifest.json").read_text())
        dataset = load_dataset(data)
        scores = {}
        for protocol in ("survey", "native"):
            r = evaluate(ensemble, dataset, "test", progress=False, protocol=protocol)
            scores[protocol] = {
                "accuracy": r["accuracy"]["ensemble"],
                **{
                    src: {k: rows["intersection"].get(k) for k in ("pxap", "dice_fg", "dice_bg")}
                    for src, rows in r["by_source"].items()
                    if src != "baselines"
                },
                "baselines": {
                    k: {m: v.get(m) for m in ("pxap", "dice_fg", "dice_bg")}
                    for k, v in r["by_source"]["baselines"].items()
                },
            }
    metrics = manifest.get("metrics", {})
    members = {
        k: {
            "best_epoch": v.get("best_epoch"),
            "epochs_run": len(v.get("history", [])),
            "seconds": v.get("seconds"),
        }
        for k, v in metrics.get("members", {}).items()
    }
    stages = dict(times)
    stages["other"] = wall - sum(times.values()) - 0.0
    return {
        "seed": seed,
        "wall_seconds": wall,
        "stages_seconds": stages,
        "stage_share": {k: v / wall for k, v in stages.items()},
        "decoder_stages_seconds": dict(inner),
        "members": members,
        "decoder_seconds": metrics.get("decoders", {}).get("seconds"),
        "val_accuracy": metrics.get("val_accuracy"),
        "scores": scores,
        "loadavg_after": loadavg(),
    }


def anatomy(data: str, members: list[str], size: int, batch: int = 16) -> dict:
    """One epoch per member the streaming way: where a full-backbone epoch spends its time."""
    ds = load_dataset(data)
    train_s, held = stratified_holdout(ds.split("train"), 0.15, 0)
    out = {}
    for name in members:
        member = build_member(name, len(ds.classes), "imagenet", 0.5)
        tr = ImageDataset(train_s, ds.classes, (size, size), augment=True)
        t0 = time.perf_counter()
        for i in range(len(tr)):
            tr.image(i)
        decode = time.perf_counter() - t0
        weights = class_balanced_weights(tr.labels)
        order = torch.multinomial(weights, len(tr), replacement=True).tolist()
        opt = torch.optim.AdamW(member.parameters(), lr=1e-4)
        member.train()
        for m in member.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        t = defaultdict(float)
        for s in range(0, len(order) - batch + 1, batch):
            t0 = time.perf_counter()
            xs, ys = zip(*(tr[j] for j in order[s : s + batch]), strict=True)
            x, y = torch.stack(xs), torch.tensor(ys)
            t1 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(member(x), y)
            t2 = time.perf_counter()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t3 = time.perf_counter()
            t["augment"] += t1 - t0
            t["forward"] += t2 - t1
            t["backward_step"] += t3 - t2
        val = ImageDataset(held, ds.classes, (size, size))
        t0 = time.perf_counter()
        with torch.no_grad():
            member.eval()
            for s in range(0, len(val), batch):
                member(torch.stack([val[j][0] for j in range(s, min(s + batch, len(val)))]))
        t["validation"] = time.perf_counter() - t0
        epoch = sum(t.values())
        out[name] = {
            "decode_once_seconds": decode,
            "epoch_seconds": epoch,
            "epoch_share": {k: v / epoch for k, v in t.items()},
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--seeds", default="0,1", help="empty: --anatomy only")
    p.add_argument("--mask-classes", default="")
    p.add_argument("--label", default="now")
    p.add_argument("--anatomy", action="store_true")
    p.add_argument("--keep", default=None, help="keep the model of the first seed here")
    p.add_argument("--out", required=True)
    p.add_argument("train_args", nargs="*", help="more `camlabel train` arguments, after --")
    args = p.parse_args()
    extra = list(args.train_args)
    if args.mask_classes:
        extra += ["--mask-classes", args.mask_classes]
    result = {
        "label": args.label,
        "trainer": training.__file__,
        "data": args.data,
        "train_args": extra,
        "machine": machine(),
        "loadavg_before": loadavg(),
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.anatomy:
        result["anatomy"] = anatomy(args.data, ["efficientnet_lite0", "efficientnet_lite1",
                                                "efficientnet_lite2"], 224)  # fmt: skip
        out.write_text(json.dumps(result, indent=2))
    for i, seed in enumerate(int(s) for s in args.seeds.split(",") if s.strip()):
        keep = Path(args.keep) if args.keep and i == 0 else None
        run = train_once(args.data, seed, extra, keep)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
