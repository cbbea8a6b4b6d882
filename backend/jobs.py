"""Background training from Label Studio annotations, on a persistent huey queue.

The queue is a SQLite file in MODEL_DIR (no extra server; it survives restarts). One consumer
with one worker runs jobs, so exactly one training runs at a time. A burst of webhooks makes
one job: a per-project "pending" key is set when a job is queued and cleared when it starts,
so events that arrive while a job runs queue exactly one more (which sees their annotations).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from huey import SqliteHuey
from PIL import Image

from wsl_models.data import load_dataset
from wsl_models.ensemble import EnsembleConfig
from wsl_models.images import parse_size
from wsl_models.members import LITE_TRIO
from wsl_models.training import TrainConfig, train_ensemble
from wsl_models.versions import ModelStore

from .fetch import FetchError, ImageFetcher, LabelStudioAuth
from .label_config import parse_label_config
from .model import CamLabelModel, ModelHolder
from .rle import rle_to_mask
from .settings import Settings

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainingSettings:
    """TRAIN_* environment variables."""

    members: str = ",".join(LITE_TRIO)  # TRAIN_MEMBERS
    image_size: str = "224"  # TRAIN_IMAGE_SIZE
    epochs: int = 20  # TRAIN_EPOCHS
    weights: str = "imagenet"  # TRAIN_WEIGHTS
    lr: float = 1e-3  # TRAIN_LR

    @classmethod
    def from_env(cls) -> TrainingSettings:
        e = os.environ.get
        return cls(
            members=e("TRAIN_MEMBERS", cls.members),
            image_size=e("TRAIN_IMAGE_SIZE", cls.image_size),
            epochs=int(e("TRAIN_EPOCHS", str(cls.epochs))),
            weights=e("TRAIN_WEIGHTS", cls.weights),
            lr=float(e("TRAIN_LR", str(cls.lr))),
        )


class LabelStudioAPI:
    """The few Label Studio endpoints the trainer needs (verified against 1.23.2)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise TrainingError("training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        self.url = settings.label_studio_url
        self.auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(method, self.url + path, headers=self.auth.header(), timeout=60, **kw)
        if r.status_code == 401:
            r = requests.request(
                method, self.url + path, headers=self.auth.header(refresh=True), timeout=60, **kw
            )
        if r.status_code >= 400:
            raise TrainingError(
                f"Label Studio {method} {path}: HTTP {r.status_code} {r.text[:200]}"
            )
        return r.json()

    def project(self, project_id: int) -> dict:
        return self._call("GET", f"/api/projects/{project_id}")

    def annotated_tasks(self, project_id: int) -> list[dict]:
        return self._call(
            "GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON"}
        )

    def task_pages(self, project_id: int, page_size: int = 100):
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size}
            tasks = self._call("GET", "/api/tasks", params=params).get("tasks", [])
            if tasks:
                yield tasks
            if len(tasks) < page_size:
                return
            page += 1

    def import_predictions(self, project_id: int, predictions: list[dict]) -> None:
        self._call("POST", f"/api/projects/{project_id}/import/predictions", json=predictions)

    def set_model_version(self, project_id: int, version: str) -> None:
        """Label Studio accepts only a version that a prediction (or a backend title) has."""
        self._call("PATCH", f"/api/projects/{project_id}", json={"model_version": version})


def predict_project(settings: Settings, api: LabelStudioAPI, project_id: int, config: str) -> int:
    """Predict every task with the current version and store the predictions in bulk.

    Label Studio's score column and uncertainty sampling count only predictions of the
    project's model_version, so a new version is useful only once its predictions exist.
    """
    model = CamLabelModel(ModelHolder(settings), ImageFetcher(settings), settings, config)
    model.setup()
    created = 0
    for tasks in api.task_pages(project_id):
        results = model.predict(tasks)
        batch = [
            {"task": t["id"], "result": r["result"], "score": r.get("score"),
             "model_version": r["model_version"]}
            for t, r in zip(tasks, results, strict=True)
            if "result" in r
        ]  # fmt: skip
        if batch:
            api.import_predictions(project_id, batch)
            created += len(batch)
    return created


def _latest_annotation(task: dict) -> dict | None:
    live = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
    return max(live, key=lambda a: a.get("updated_at") or a.get("created_at") or "", default=None)


def collect_dataset(
    tasks: list[dict], label_config: str, fetcher: ImageFetcher, out: Path
) -> dict[str, int]:
    """Write annotated tasks as a dataset (images/, masks/, labels.csv) under ``out``.

    Image label from the Choices result; a human mask from the BrushLabels results (union of
    the regions). Tasks without a Choices answer or whose image fails are skipped and counted.
    """
    schema = parse_label_config(label_config)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows, counts = [], {"tasks": len(tasks), "used": 0, "masks": 0, "skipped": 0}
    for task in tasks:
        annotation = _latest_annotation(task)
        results = annotation.get("result", []) if annotation else []
        label = next(
            (
                r["value"]["choices"][0]
                for r in results
                if r.get("from_name") == schema.choices_name and r.get("value", {}).get("choices")
            ),
            None,
        )
        if label is None:
            counts["skipped"] += 1
            continue
        try:
            image = fetcher.fetch(task["data"][schema.image_key])
        except (FetchError, KeyError, TypeError) as exc:
            log.warning("training: task %s skipped: %s", task.get("id"), exc)
            counts["skipped"] += 1
            continue
        name = f"task_{task['id']}.png"
        image.save(out / "images" / name)
        mask = np.zeros((image.height, image.width), bool)
        for r in results:
            if r.get("type") == "brushlabels" and r.get("value", {}).get("rle"):
                mask |= rle_to_mask(r["value"]["rle"], image.height, image.width)
        if mask.any():
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name)
            counts["masks"] += 1
        rows.append({"image": name, "label": label, "split": "train"})
        counts["used"] += 1
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return counts


def train_from_project(settings: Settings, project_id: int, train: TrainingSettings) -> str:
    """Pull every annotated task, train, write a new version atomically, point the project at it."""
    api = LabelStudioAPI(settings)
    project = api.project(project_id)
    store = ModelStore(settings.model_dir)
    work = Path(settings.model_dir) / "jobs" / f"project-{project_id}-{int(time.time())}"
    try:
        counts = collect_dataset(
            api.annotated_tasks(project_id), project["label_config"], ImageFetcher(settings), work
        )
        log.info("training project %s on %s", project_id, counts)
        if counts["used"] < 4:
            raise TrainingError(f"too few labelled images to train: {counts}")
        dataset = load_dataset(work)
        schema = parse_label_config(project["label_config"])
        masked = [c for c in dataset.classes if c in schema.brush_labels] or None
        ens_cfg = EnsembleConfig(
            classes=list(dataset.classes),
            members=[m for m in train.members.split(",") if m],
            image_size=parse_size(train.image_size),
            mask_classes=masked,
        )
        cfg = TrainConfig(epochs=train.epochs, lr=train.lr, weights=train.weights, progress=False)
        current = store.current_id()
        previous = store.load(current) if current else None
        ensemble, metrics = train_ensemble(dataset, ens_cfg, cfg, init=previous)
        metrics["fine_tuned_from"] = current if metrics["fine_tuned"] else None
        metrics["source"] = {"project": project_id, **counts}
        version = store.save(ensemble, metrics)
        predicted = predict_project(settings, api, project_id, project["label_config"])
        log.info("project %s: version %s, %d predictions stored", project_id, version, predicted)
        api.set_model_version(project_id, version)
        return version
    finally:
        shutil.rmtree(work, ignore_errors=True)


class JobLog:
    """The last job per project, as JSON in MODEL_DIR (shown by /health)."""

    def __init__(self, model_dir: str) -> None:
        self.path = Path(model_dir) / "jobs.json"

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write(self, project_id: int, **state: Any) -> None:
        data = self.read()
        data[str(project_id)] = {**data.get(str(project_id), {}), **state, "at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)


class TrainingQueue:
    def __init__(self, settings: Settings, immediate: bool = False) -> None:
        Path(settings.model_dir).mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.huey = SqliteHuey(
            "camlabel", filename=str(Path(settings.model_dir) / "queue.db"), immediate=immediate
        )
        self.log = JobLog(settings.model_dir)
        self.task = self.huey.task(retries=0)(self._run)

    def enqueue(self, project: dict[str, Any]) -> str:
        pid = int(project["id"])
        if not self.huey.put_if_empty(f"pending-{pid}", "1"):
            return "already-queued"
        self.log.write(pid, state="queued")
        self.task(pid)
        return "queued"

    def _run(self, project_id: int) -> str:
        self.huey.get(f"pending-{project_id}")  # from now on, new events queue a new job
        self.log.write(project_id, state="running", error=None)
        try:
            version = train_from_project(self.settings, project_id, TrainingSettings.from_env())
        except Exception as exc:
            log.exception("training project %s failed", project_id)
            self.log.write(project_id, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        self.log.write(project_id, state="done", version=version)
        return version

    def run_consumer(self) -> None:
        """Run jobs until killed; one worker: one training at a time."""
        consumer = self.huey.create_consumer(workers=1, periodic=False)
        consumer.run()
