"""Rank a whole project by uncertainty and make Label Studio serve it in that order.

Label Studio (Community) orders unlabelled tasks by the stored prediction ``score`` of the
project's ``model_version``, lowest first ("Uncertainty sampling"), and a Data Manager tab can
sort by the same column. So ranking = predict every task, store score = 1 - acquisition value
in bulk, point the project at the version, switch sampling on, and save a sorted tab.

Nothing is left half done: the new predictions are imported first, and only then is the project
switched to the version and the version's older predictions removed. A ranking that fails
removes what it imported and leaves the previous predictions, version and order in place.

Streaming: one page of tasks at a time (memory stays bounded by the page size). With batch
diversity on, the ``pool`` most informative predictions are held back until the end, the first
query batch is picked among them (``diverse_order``, unlabelled tasks only), and its scores are lowered below every
other task's so Label Studio serves that batch first, in that order.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from wsl_models.acquisition import diverse_order

from .fetch import ImageFetcher
from .holder import ModelHolder
from .inference import InferenceEngine
from .ls_api import LabelStudioAPI, TrainingError
from .model import CamLabelModel
from .settings import Settings

log = logging.getLogger(__name__)


class RankingError(RuntimeError):
    """A ranking that stopped; the project keeps its previous predictions."""


VIEW_TITLE = "camlabel: most uncertain first"
SAMPLING = "Uncertainty sampling"
# Unlabelled tasks, lowest prediction score (= most informative) first.
VIEW_DATA: dict[str, Any] = {
    "title": VIEW_TITLE,
    "ordering": ["tasks:predictions_score"],
    "filters": {
        "conjunction": "and",
        "items": [
            {
                "filter": "filter:tasks:total_annotations",
                "operator": "equal",
                "type": "Number",
                "value": 0,
            }
        ],
    },
}


@dataclass
class RankReport:
    project: int
    model_version: str
    acquisition: str
    tasks: int = 0
    ranked: int = 0
    failed: int = 0
    diverse_batch: list[int] = field(default_factory=list)
    view_id: int | None = None
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.ranked / self.seconds if self.seconds else 0.0


def _stored(task_id: int, pred: dict) -> dict:
    """The fields Label Studio's bulk prediction import takes."""
    return {
        "task": task_id,
        "result": pred["result"],
        "score": pred["score"],
        "model_version": pred["model_version"],
    }


def diverse_first(held: list[tuple[float, int, dict]], k: int, floor: float) -> list[dict]:
    """Order the held-back predictions: a diverse first batch of ``k``, then the rest.

    The batch gets scores in [0, floor) (increasing in pick order) so it comes before every
    other task, whose scores are >= ``floor``; the others keep score = 1 - value.
    """
    preds = [p for _, _, p in held]
    values = np.array([v for v, _, _ in held])
    emb = np.stack([p["embedding"] for p in preds])
    order = diverse_order(values, emb, k)
    for rank, i in enumerate(order):
        preds[i]["score"] = floor * rank / max(len(order), 1)
    picked = set(order)
    return [preds[i] for i in order] + [p for j, p in enumerate(preds) if j not in picked]


def rank_project(
    settings: Settings,
    project_id: int,
    acquisition: str | None = None,
    diversity: int | None = None,
    page_size: int = 100,
    progress: bool = True,
    api: LabelStudioAPI | None = None,
) -> RankReport:
    """Score every task of the project with the current version; see the module docstring."""
    api = api or LabelStudioAPI(settings)
    project = api.project(project_id)
    # One version for the whole run (its own line's, else the base model's), even if a
    # training finishes meanwhile.
    served = ModelHolder(settings).load_now(project_id)
    if served[0] is None:
        raise TrainingError("no model version to rank with: train one first")
    engine = InferenceEngine(settings.predict_batch, settings.batch_invariant)
    model = CamLabelModel(served, engine, ImageFetcher(settings), settings,
                          project["label_config"], project_id)  # fmt: skip
    if acquisition:
        model.acquisition = acquisition
    model.setup()
    version = model.model_version
    k = settings.rank_diversity if diversity is None else diversity
    report = RankReport(project_id, version, model.acquisition)
    start = time.perf_counter()
    # Re-ranking with the same version replaces its predictions, after the new ones are in.
    older = [p["id"] for p in api.predictions(project_id) if p.get("model_version") == version]
    try:
        _score_pages(api, model, project, k, page_size, progress, report)
        api.set_model_version(project_id, version)
        api.set_sampling(project_id, SAMPLING)
    except Exception as exc:
        _remove_new(api, project, version, set(older))
        raise RankingError(
            f"ranking project {project_id} with {version} stopped after {report.ranked} of "
            f"{report.tasks} tasks ({type(exc).__name__}: {exc}); what it imported was "
            "removed, the previous predictions and order are kept"
        ) from exc
    finally:
        engine.close()
    report.view_id = save_view(api, project_id)
    for pid in older:
        api.delete_prediction(pid)
    report.seconds = time.perf_counter() - start
    log.info(
        "ranked project %s: %d/%d tasks (%d failed) with %s by %s in %.1f s (%.1f images/s)",
        project_id, report.ranked, report.tasks, report.failed, version, report.acquisition,
        report.seconds, report.images_per_second,
    )  # fmt: skip
    return report


def _score_pages(
    api: LabelStudioAPI,
    model: CamLabelModel,
    project: dict,
    k: int,
    page_size: int,
    progress: bool,
    report: RankReport,
) -> None:
    """Predict and import every page; with diversity on, the ``5 k`` most informative
    unlabelled predictions are held back and imported last, ordered (see the module doc)."""
    project_id = int(project["id"])
    pool = 5 * k
    held: list[tuple[float, int, dict]] = []  # min-heap on value: the `pool` largest kept
    floor = 1.0  # lowest score among predictions stored so far
    total = project.get("task_number") or None
    bar = tqdm(total=total, desc=f"rank {project_id}", unit="task", disable=not progress)
    for tasks in api.task_pages(project_id, page_size):
        preds = model.predict(tasks, embeddings=k > 0)
        batch = []
        for task, pred in zip(tasks, preds, strict=True):
            report.tasks += 1
            if "result" not in pred:
                report.failed += 1
                continue
            pred["task"] = task["id"]
            value = pred["acquisition"]["value"]
            annotated = bool(task.get("total_annotations") or task.get("annotations"))
            if k > 0 and not annotated:  # the query batch is made of unlabelled tasks
                pushed = (value, task["id"], pred)
                out = heapq.heappushpop(held, pushed) if len(held) >= pool else None
                if out is None:
                    heapq.heappush(held, pushed)
                    continue
                pred = out[2]
            floor = min(floor, pred["score"])
            batch.append(_stored(pred["task"], pred))
        if batch:
            api.import_predictions(project_id, batch)
            report.ranked += len(batch)
        bar.update(len(tasks))
    bar.close()
    if held:
        floor = min([floor, *(p["score"] for _, _, p in held)])
        ordered = diverse_first(held, k, floor)
        report.diverse_batch = [p["task"] for p in ordered[:k]]
        api.import_predictions(project_id, [_stored(p["task"], p) for p in ordered])
        report.ranked += len(ordered)


def _remove_new(api: LabelStudioAPI, project: dict, version: str, older: set[int]) -> None:
    """Undo a failed ranking: its imports, and the project's version if it was switched
    (best effort: Label Studio may be what failed)."""
    project_id = int(project["id"])
    try:
        if project.get("model_version") and project["model_version"] != version:
            api.set_model_version(project_id, project["model_version"])
        if not older:  # a version new to the project: all of its predictions are ours
            api.delete_predictions(project_id, version)
            return
        for p in api.predictions(project_id):
            if p.get("model_version") == version and p["id"] not in older:
                api.delete_prediction(p["id"])
    except Exception:
        log.exception("project %s: could not remove the predictions of a failed ranking",
                      project_id)  # fmt: skip


def save_view(api: LabelStudioAPI, project_id: int) -> int:
    """Create the sorted tab, or update ours if it exists (found by title)."""
    ours = [v for v in api.views(project_id) if v.get("data", {}).get("title") == VIEW_TITLE]
    view = api.save_view(project_id, VIEW_DATA, ours[0]["id"] if ours else None)
    return int(view["id"])
