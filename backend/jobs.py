"""Background training from Label Studio annotations, on a persistent huey queue.

The queue is a SQLite file in MODEL_DIR (no extra server; it survives restarts). One consumer
with one worker runs jobs, so exactly one training runs at a time. A burst of webhooks makes
one job: a per-project "pending" key is set, in the same transaction as the job, when a job
is queued and cleared when it starts, so events that arrive while a job runs queue exactly one
more (which sees their annotations). Each project trains its own model line (lines.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huey import SqliteHuey

from wsl_models.data import load_dataset
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.images import parse_size
from wsl_models.mask_training import segmented
from wsl_models.members import LITE_TRIO, member_spec
from wsl_models.promotion import Tolerance, holdout_scores, promote
from wsl_models.training import TrainConfig, compatible, train_ensemble
from wsl_models.versions import VersionError

from .annotations import annotated_labels, collect_dataset
from .fetch import ImageFetcher
from .label_config import parse_label_config
from .lines import ModelLines
from .ls_api import LabelStudioAPI, TrainingError
from .ranking import RankingError, rank_project
from .settings import Settings

log = logging.getLogger(__name__)

CLICK_MASKS = "click_masks"  # a project's spread masks of clicked tasks (mask_training)


@dataclass(frozen=True)
class TrainingSettings:
    """TRAIN_* environment variables."""

    members: str = ",".join(LITE_TRIO)  # TRAIN_MEMBERS
    image_size: str = "224"  # TRAIN_IMAGE_SIZE
    epochs: int = 20  # TRAIN_EPOCHS
    weights: str = "imagenet"  # TRAIN_WEIGHTS
    lr: float = 1e-3  # TRAIN_LR
    mask_weight: float = 5.0  # TRAIN_MASK_WEIGHT: pixel loss on the annotators' masks
    pseudo_weight: float = 0.1  # TRAIN_PSEUDO_WEIGHT: pixel loss on pseudo-masks (0: off)
    pseudo_fg: float = 0.7  # TRAIN_PSEUDO_FG / TRAIN_PSEUDO_BG: consensus-map thresholds
    pseudo_bg: float = 0.3
    minmax: bool = False  # TRAIN_MINMAX=1: train the min-max entropy localizer as mask head
    decoder: bool = True  # TRAIN_DECODER=0: no full-resolution decoder (masks from CAMs)
    decoder_epochs: int = 60  # TRAIN_DECODER_EPOCHS
    # TRAIN_FINE_TUNE_EPOCHS / TRAIN_FINE_TUNE_DECODER_EPOCHS: classifier and decoder epochs of
    # a job that fine-tunes the serving version (same members, classes and options): it already
    # holds what the full schedule taught. 0: the full TRAIN_EPOCHS / TRAIN_DECODER_EPOCHS.
    fine_tune_epochs: int = 6
    fine_tune_decoder_epochs: int = 20
    # TRAIN_FINE_TUNE_SEG_STEPS: segmentation steps of such a job when the serving version's
    # decoder already learned from masks or clicks (it then skips the weak decoder stage, which
    # would only pull it back towards the CAM's seeds). 0: the full seg schedule.
    fine_tune_seg_steps: int = 40
    # TRAIN_SEG_MAX_STEPS: the cap on a job's segmentation steps (20 per mask up to it). 400
    # keeps a 32-mask job under 10 minutes on 2 CPU cores; a project that submits many masks
    # at once may lift it (GlaS, 74 masks: 1200 beat 400 on held-out train images).
    seg_max_steps: int = TrainConfig.seg_max_steps
    # TRAIN_SEG_ENCODER_LR_FACTOR: the backbone's top stage learns at this fraction of the
    # decoder's rate in the segmentation stage (0: the decoder alone). 0.3 is better with all 74
    # GlaS masks in 1200 steps, but costs classification accuracy after a job of few masks or
    # clicks (held-out train images; docs/masks-and-clicks.md).
    seg_encoder_lr_factor: float = TrainConfig.seg_encoder_lr_factor
    unlabelled: int = 50  # TRAIN_UNLABELLED: unannotated tasks used through pseudo-masks
    tolerance: float = 2.0  # PROMOTE_TOLERANCE: points a new version may lose and still win
    # PROMOTE_IMAGES: held-out images a new version may misclassify beyond the current (and the
    # line's first) version, when that is more than PROMOTE_TOLERANCE points (a small hold-out)
    tolerance_images: int = 1

    @classmethod
    def from_env(cls) -> TrainingSettings:
        e = os.environ.get
        return cls(
            members=e("TRAIN_MEMBERS", cls.members),
            image_size=e("TRAIN_IMAGE_SIZE", cls.image_size),
            epochs=int(e("TRAIN_EPOCHS", str(cls.epochs))),
            weights=e("TRAIN_WEIGHTS", cls.weights),
            lr=float(e("TRAIN_LR", str(cls.lr))),
            mask_weight=float(e("TRAIN_MASK_WEIGHT", str(cls.mask_weight))),
            pseudo_weight=float(e("TRAIN_PSEUDO_WEIGHT", str(cls.pseudo_weight))),
            pseudo_fg=float(e("TRAIN_PSEUDO_FG", str(cls.pseudo_fg))),
            pseudo_bg=float(e("TRAIN_PSEUDO_BG", str(cls.pseudo_bg))),
            minmax=e("TRAIN_MINMAX", "0").strip().lower() in ("1", "true", "yes", "on"),
            decoder=e("TRAIN_DECODER", "1").strip().lower() in ("1", "true", "yes", "on"),
            decoder_epochs=int(e("TRAIN_DECODER_EPOCHS", str(cls.decoder_epochs))),
            fine_tune_epochs=int(e("TRAIN_FINE_TUNE_EPOCHS", str(cls.fine_tune_epochs))),
            fine_tune_decoder_epochs=int(
                e("TRAIN_FINE_TUNE_DECODER_EPOCHS", str(cls.fine_tune_decoder_epochs))
            ),
            fine_tune_seg_steps=int(e("TRAIN_FINE_TUNE_SEG_STEPS", str(cls.fine_tune_seg_steps))),
            seg_max_steps=int(e("TRAIN_SEG_MAX_STEPS", str(cls.seg_max_steps))),
            seg_encoder_lr_factor=float(
                e("TRAIN_SEG_ENCODER_LR_FACTOR", str(cls.seg_encoder_lr_factor))
            ),
            unlabelled=int(e("TRAIN_UNLABELLED", str(cls.unlabelled))),
            tolerance=float(e("PROMOTE_TOLERANCE", str(cls.tolerance))),
            tolerance_images=int(e("PROMOTE_IMAGES", str(cls.tolerance_images))),
        )


def _unannotated(api: LabelStudioAPI, project_id: int, limit: int) -> list[dict]:
    """Up to ``limit`` tasks nobody has annotated yet (the first pages)."""
    found: list[dict] = []
    for tasks in api.task_pages(project_id):
        found += [t for t in tasks if not t.get("total_annotations") and not t.get("annotations")]
        if len(found) >= limit:
            break
    return found[:limit]


def job_configs(
    classes: Sequence[str],
    mask_classes: list[str] | None,
    train: TrainingSettings,
    settings: Settings,
) -> tuple[EnsembleConfig, TrainConfig]:
    """What a training job from annotations trains: the annotators' masks count (full pixel
    loss), the rest learn through pseudo-masks; a decoder unless TRAIN_DECODER=0."""
    ens_cfg = EnsembleConfig(
        classes=list(classes),
        members=[m for m in train.members.split(",") if m],
        image_size=parse_size(train.image_size),
        mask_classes=mask_classes,
        localizer=train.minmax,
        decoder=train.decoder,
    )
    cfg = TrainConfig(
        device=settings.device,  # DEVICE=cpu keeps training off a GPU too
        amp=settings.amp,
        epochs=train.epochs,
        lr=train.lr,
        weights=train.weights,
        progress=False,
        train_masks=True,
        mask_weight=train.mask_weight,
        pseudo_weight=train.pseudo_weight,
        pseudo_fg=train.pseudo_fg,
        pseudo_bg=train.pseudo_bg,
        minmax=train.minmax,
        decoder_epochs=train.decoder_epochs,
        seg_max_steps=train.seg_max_steps,
        seg_encoder_lr_factor=train.seg_encoder_lr_factor,
    )
    return ens_cfg, cfg


def fine_tune_schedule(
    cfg: TrainConfig,
    train: TrainingSettings,
    members: Sequence[str],
    previous_segmented: bool = False,
) -> TrainConfig:
    """The shorter schedule of a job that fine-tunes a compatible serving version.

    Only for members that train on the feature bank (pretrained backbones with a trunk/top
    split), where it was measured (bench/retrain_time.py). A member trained from scratch (the
    tiny test member) is far from converged after one job: it keeps the full schedule
    (measured in the end-to-end test: 6 + 20 epochs took the pre-annotation IoU from >= 0.5
    to 0.13). ``previous_segmented``: the serving version's decoder already trained on the
    annotators' masks or clicks; the job then runs a few segmentation steps from it and no
    weak decoder stage."""
    if any(member_spec(m).split is None for m in members):
        return cfg
    epochs, decoder = cfg.epochs, cfg.decoder_epochs
    seg_min, seg_max = cfg.seg_min_steps, cfg.seg_max_steps
    if train.fine_tune_epochs > 0:
        epochs = min(epochs, train.fine_tune_epochs)
    if train.fine_tune_decoder_epochs > 0:
        decoder = min(decoder, train.fine_tune_decoder_epochs)
    if previous_segmented and train.fine_tune_seg_steps > 0:
        decoder = 0
        seg_min = min(seg_min, train.fine_tune_seg_steps)
        seg_max = min(seg_max, train.fine_tune_seg_steps)
    return replace(
        cfg, epochs=epochs, decoder_epochs=decoder, seg_min_steps=seg_min, seg_max_steps=seg_max
    )


def first_served(lines: ModelLines, project_id: int) -> str | None:
    """The project line's first version that became current (versions saved before the gate
    recorded its verdict count as served); None while the line has none."""
    store = lines.project(project_id)
    for vid in store.version_ids():  # oldest first: ids start with their time
        try:
            promotion = store.manifest(vid).get("metrics", {}).get("promotion") or {}
        except VersionError:
            continue
        if promotion.get("accepted", True):
            return vid
    return None


def _load_first(
    lines: ModelLines, project_id: int, vid: str | None, classes: Sequence[str], current: str | None
) -> Ensemble | None:
    """The line's first served version to compare a new one with, when it is not the current
    one and has the same classes; None otherwise, or (logged) when it no longer loads."""
    if vid is None or vid == current:
        return None
    try:
        first = lines.project(project_id).load(vid)
    except VersionError as exc:
        log.warning("project %s: first version %s not compared: %s", project_id, vid, exc)
        return None
    return first if first.config.classes == list(classes) else None


def train_from_project(
    settings: Settings, project_id: int, train: TrainingSettings
) -> tuple[str, bool, str | None]:
    """Pull the project's tasks, train, save a new version in the project's line; make it
    current and re-rank the project only if it is not worse than the version serving the
    project now (its own, or the base model) on the same hold-out.

    Returns (version, promoted, ranking error). A refused version is kept, with its metrics
    and the reason. A ranking that fails leaves the previous predictions in place.
    """
    api = LabelStudioAPI(settings)
    project = api.project(project_id)
    lines = ModelLines(settings.model_dir, settings.base_model)
    key, current = lines.serving(project_id)
    previous = lines.store(key).load(current) if current else None
    work = lines.project_dir(project_id) / "jobs" / f"job-{int(time.time())}"
    try:
        tasks = api.annotated_tasks(project_id)
        classes = annotated_labels(tasks, project["label_config"], settings.review_label)
        if previous is not None and not classes <= set(previous.config.classes):
            log.info("project %s: labels %s are not all classes of the %s version %s: "
                     "trained from the backbone weights", project_id, sorted(classes), key,
                     current)  # fmt: skip
            previous = None
        # Unannotated tasks teach through the previous version's pseudo-masks.
        extra = (
            _unannotated(api, project_id, train.unlabelled)
            if previous and train.unlabelled > 0
            else []
        )
        counts = collect_dataset(
            tasks, project["label_config"], ImageFetcher(settings), work, extra,
            review_label=settings.review_label,
        )  # fmt: skip
        log.info("training project %s on %s", project_id, counts)
        if counts["labelled"] < 4:
            raise TrainingError(f"too few labelled images to train: {counts}")
        dataset = load_dataset(work)
        schema = parse_label_config(project["label_config"])
        masked = [c for c in dataset.classes if c in schema.brush_labels] or None
        ens_cfg, cfg = job_configs(dataset.classes, masked, train, settings)
        # A clicked task's spread mask is made once, by the version it was first clicked on.
        cfg = replace(cfg, seg_click_mask_dir=str(lines.project_dir(project_id) / CLICK_MASKS))
        if compatible(previous, ens_cfg):
            cfg = fine_tune_schedule(cfg, train, ens_cfg.members, segmented(previous))
        ensemble, metrics = train_ensemble(dataset, ens_cfg, cfg, init=previous)
        metrics["fine_tuned_from"] = current if metrics["fine_tuned"] else None
        metrics["source"] = {"project": project_id, **counts}
        held = [s for s in dataset.samples if s.name in set(metrics["held_out"])]
        new_scores = holdout_scores(ensemble, held)
        comparable = previous is not None and previous.config.classes == ens_cfg.classes
        old_scores = holdout_scores(previous, held) if comparable else {}
        first_id = first_served(lines, project_id) if comparable else None
        first = _load_first(lines, project_id, first_id, ens_cfg.classes, current)
        first_scores = holdout_scores(first, held) if first is not None else {}
        tolerance = Tolerance(*[train.tolerance] * 3, images=train.tolerance_images)
        accepted, reason = promote(new_scores, old_scores, tolerance, first_scores)
        metrics["promotion"] = {
            "accepted": accepted,
            "reason": reason,
            "compared_with": current if comparable else None,
            "new": new_scores,
            "current": old_scores,
            "first": {"version": first_id, **first_scores} if first is not None else None,
        }
        version = lines.project(project_id).save(ensemble, metrics, make_current=accepted)
        if not accepted:
            log.warning("project %s: version %s kept but not made current: %s",
                        project_id, version, reason)  # fmt: skip
            return version, False, None
        try:
            report = rank_project(settings, project_id, progress=False, api=api)
        except (RankingError, TrainingError) as exc:
            log.error("project %s: version %s is current, but ranking failed: %s",
                      project_id, version, exc)  # fmt: skip
            return version, True, str(exc)
        log.info("project %s: version %s, %d tasks ranked", project_id, version, report.ranked)
        return version, True, None
    finally:
        shutil.rmtree(work, ignore_errors=True)


class JobLog:
    """The last job of each project, as JSON in its line (MODEL_DIR/projects/<id>/job.json)."""

    def __init__(self, model_dir: str) -> None:
        self.lines = ModelLines(model_dir)

    def _path(self, project_id: int) -> Path:
        return self.lines.project_dir(project_id) / "job.json"

    def get(self, project_id: int) -> dict[str, Any]:
        try:
            return json.loads(self._path(project_id).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def read(self) -> dict[str, Any]:
        """{project id (str): last job state} for every project with a job."""
        jobs = {str(p): self.get(p) for p in self.lines.project_ids()}
        return {k: v for k, v in jobs.items() if v}

    def write(self, project_id: int, **state: Any) -> None:
        path = self._path(project_id)
        data = {**self.get(project_id), **state, "at": time.time()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".job.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrainingQueue:
    """Jobs survive the process that runs them: a job whose worker died (kill -9, out of memory)
    is found "running" with a dead pid when the next worker starts, and is queued again up to
    TRAIN_MAX_ATTEMPTS times in all, then marked failed. A job that raises is not retried (the
    same data would fail the same way); it is marked failed with the error."""

    def __init__(self, settings: Settings, immediate: bool = False) -> None:
        Path(settings.model_dir).mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.huey = SqliteHuey(
            "camlabel", filename=str(Path(settings.model_dir) / "queue.db"), immediate=immediate
        )
        self.log = JobLog(settings.model_dir)
        self.max_attempts = max(1, int(os.environ.get("TRAIN_MAX_ATTEMPTS", "2")))
        self.task = self.huey.task(retries=0)(self._run)

    def enqueue(self, project: dict[str, Any], attempt: int = 1) -> str:
        """Queue one training job for the project unless one is already waiting."""
        pid = int(project["id"])
        job = self.task.s(pid, attempt)
        if self.huey.immediate:  # tests: in-memory storage, the job runs right here
            if not self.huey.put_if_empty(f"pending-{pid}", "1"):
                return "already-queued"
            self.log.write(pid, state="queued", attempt=attempt)
            self.huey.enqueue(job)
            return "queued"
        if not self._put_pending_job(f"pending-{pid}", self.huey.serialize_task(job)):
            return "already-queued"
        self.log.write(pid, state="queued", attempt=attempt)
        return "queued"

    def _put_pending_job(self, key: str, job: bytes) -> bool:
        """Set the pending flag and write the job in ONE SQLite transaction: a failure
        between the two (disk full, a crash) leaves neither, never a flag without a job (which
        would answer every later webhook "already queued" with nothing queued)."""
        storage = self.huey.storage
        with storage.db(commit=True) as cursor:
            cursor.execute(
                "insert or ignore into kv (queue, key, value) values (?, ?, ?)",
                (storage.name, key, storage.to_blob(self.huey.serializer.serialize("1"))),
            )
            if cursor.rowcount != 1:
                return False
            self._write_job(cursor, job)
        return True

    def _write_job(self, cursor: Any, job: bytes) -> None:
        storage = self.huey.storage
        cursor.execute(
            "insert into task (queue, data, priority) values (?, ?, ?)",
            (storage.name, storage.to_blob(job), 0),
        )

    def _run(self, project_id: int, attempt: int = 1) -> str:
        try:
            self.huey.get(f"pending-{project_id}")  # from now on, new events queue a new job
            self.log.write(project_id, state="running", error=None, ranking=None, attempt=attempt,
                           worker_pid=os.getpid())  # fmt: skip
            version, promoted, ranking_error = train_from_project(
                self.settings, project_id, TrainingSettings.from_env()
            )
        except Exception as exc:
            log.exception("training project %s failed", project_id)
            self.log.write(project_id, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        ranking = "skipped: not promoted" if not promoted else "done"
        if ranking_error:
            ranking = f"failed, the previous predictions are kept: {ranking_error}"
        self.log.write(project_id, state="done", version=version, promoted=promoted,
                       ranking=ranking)  # fmt: skip
        return version

    def recover(self) -> dict[str, str]:
        """Requeue or fail the jobs whose worker died mid-run; returns {project: outcome}."""
        outcomes = {}
        for key, job in self.log.read().items():
            if job.get("state") != "running" or _alive(job.get("worker_pid")):
                continue
            attempt = int(job.get("attempt") or 1)
            if attempt >= self.max_attempts:
                error = (f"the training worker died during attempt {attempt} of "
                         f"{self.max_attempts} (killed or out of memory); not retried")  # fmt: skip
                self.log.write(int(key), state="failed", error=error)
                outcomes[key] = "failed"
            else:
                status = self.enqueue({"id": int(key)}, attempt + 1)
                if status == "already-queued":  # a newer event's job will train on everything
                    self.log.write(int(key), state="queued", attempt=attempt + 1)
                outcomes[key] = "requeued"
            log.warning("project %s: training worker died mid-job: %s", key, outcomes[key])
        return outcomes

    def run_consumer(self) -> None:
        """Recover jobs of a dead worker, then run jobs until killed; one worker: one training
        at a time."""
        self.recover()
        consumer = self.huey.create_consumer(workers=1, periodic=False)
        consumer.run()
