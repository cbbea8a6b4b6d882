"""How long a Label Studio training job takes after 8 new annotations on top of a version.

    python bench/retrain_time.py --data ../shared/data/glas --out bench/results/train_time/retrain_now.json

The job's own configuration (``backend.jobs.job_configs`` with the default TRAIN_* settings)
on GlaS train images written as annotated tasks (``bench/job_time.py``'s layout): first
``--labelled`` images with their class, the first ``--masks`` of them with a brush mask, and
``--unlabelled`` unannotated ones; a first job trains a version on them (from the backbone
weights). Then ``--new`` more tasks get a label and a mask, and the timed job trains again on
top of that version, as ``backend.jobs.train_from_project`` does: fine-tuning it when it is
compatible (with the short schedule where the trainer has one, TRAIN_FINE_TUNE_EPOCHS), then
scoring the new and the current version on the hold-out for promotion. Re-ranking the
project's tasks afterwards needs a Label Studio and is not included.

Like ``bench/train_time.py`` it runs an older checkout first on PYTHONPATH; run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine  # noqa: E402
from job_time import write_tasks  # noqa: E402

from backend import jobs  # noqa: E402
from backend.jobs import TrainingSettings, job_configs  # noqa: E402
from backend.settings import Settings  # noqa: E402
from wsl_models import training  # noqa: E402
from wsl_models.data import load_dataset  # noqa: E402
from wsl_models.promotion import holdout_scores  # noqa: E402
from wsl_models.training import train_ensemble  # noqa: E402


def job(root: Path, previous, train: TrainingSettings, settings: Settings):
    """The training part of ``train_from_project``: configs, fine-tuning, promotion scores."""
    ds = load_dataset(root)
    ens_cfg, cfg = job_configs(ds.classes, None, train, settings)
    if previous is not None and training.compatible(previous, ens_cfg):
        if hasattr(jobs, "segmented"):  # the short segmentation schedule
            cfg = jobs.fine_tune_schedule(cfg, train, ens_cfg.members, jobs.segmented(previous))
        elif hasattr(jobs, "fine_tune_schedule"):
            cfg = jobs.fine_tune_schedule(cfg, train, ens_cfg.members)
        elif getattr(train, "fine_tune_epochs", 0) > 0:  # the first version of the change
            cfg = replace(cfg, epochs=min(cfg.epochs, train.fine_tune_epochs))
    t0 = time.perf_counter()
    ensemble, metrics = train_ensemble(ds, ens_cfg, cfg, init=previous)
    trained = time.perf_counter() - t0
    held = [s for s in ds.samples if s.name in set(metrics["held_out"])]
    new = holdout_scores(ensemble, held)
    old = holdout_scores(previous, held) if previous is not None else {}
    return ensemble, metrics, {"train": trained, "total": time.perf_counter() - t0}, new, old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/glas")
    p.add_argument("--labelled", type=int, default=40)
    p.add_argument("--masks", type=int, default=8)
    p.add_argument("--unlabelled", type=int, default=16)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--label", default="now")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    settings = Settings(device="auto")
    train = TrainingSettings.from_env()  # TRAIN_* as a Label Studio job reads them
    result = {"label": args.label, "trainer": training.__file__, "machine": machine(),
              "loadavg_before": loadavg(), "annotations": vars(args)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp) / "first", Path(tmp) / "second"
        masked = set(range(args.masks))
        write_tasks(Path(args.data), first, args.labelled, 0, args.unlabelled, masked)
        new = set(range(args.labelled, args.labelled + args.new))
        write_tasks(Path(args.data), second, args.labelled + args.new, 0, args.unlabelled,
                    masked | new)  # fmt: skip
        base, m1, t1, _, _ = job(first, None, train, settings)
        print("first job", json.dumps(t1), flush=True)
        _, m2, t2, new_scores, old_scores = job(second, base, train, settings)
        print("retraining job", json.dumps(t2), flush=True)
    result.update(
        {
            "first_job_seconds": t1,
            "first_job_segmentation_seconds": m1.get("segmentation", {}).get("seconds"),
            "retrain_job_seconds": t2,
            "retrain": {
                "fine_tuned": m2["fine_tuned"],
                "epochs": m2["train_config"]["epochs"],
                "decoder_epochs": m2["train_config"]["decoder_epochs"],
                "human_masks": m2["human_masks"],
                "decoder_seconds": m2.get("decoders", {}).get("seconds"),
                "segmentation_seconds": m2.get("segmentation", {}).get("seconds"),
                "seg_steps": [
                    m2["train_config"].get(k) for k in ("seg_min_steps", "seg_max_steps")
                ],
                "members": {
                    k: {"epochs_run": len(v["history"]), "seconds": v.get("seconds")}
                    for k, v in m2["members"].items()
                },
                "holdout_new": new_scores,
                "holdout_previous": old_scores,
            },
            "loadavg_after": loadavg(),
        }
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
