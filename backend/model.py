"""The model class, shaped like label-studio-ml 2.x's LabelStudioMLBase: setup / predict / fit."""

from __future__ import annotations

import logging
import threading
import uuid
import zlib
from typing import Any

import torch

from wsl_models.acquisition import acquisition, score_from_value
from wsl_models.ensemble import Ensemble, EnsembleOutput
from wsl_models.images import to_tensor
from wsl_models.training import resolve_device
from wsl_models.versions import ModelStore, VersionError

from .fetch import FetchError, ImageFetcher
from .label_config import ProjectSchema, parse_label_config, parse_label_map
from .rle import mask_to_rle
from .settings import Settings

log = logging.getLogger(__name__)

UNTRAINED = "untrained"


class ModelHolder:
    """This worker's current ensemble; reloaded when MODEL_DIR/CURRENT points elsewhere."""

    def __init__(self, settings: Settings) -> None:
        self.store = ModelStore(settings.model_dir)
        self.device = resolve_device(settings.device)
        self.amp = settings.amp
        self.map_source = settings.map_source
        self._lock = threading.Lock()
        # (ensemble, version) replaced as one tuple: a reader never sees a mixed pair.
        self._loaded: tuple[Ensemble | None, str | None] = (None, None)
        self.last_error: str | None = None
        self._pinned = False

    def pin(self) -> tuple[Ensemble | None, str | None]:
        """Keep the version loaded now, whatever CURRENT says later (a ranking run must not
        switch versions halfway: its predictions would carry two)."""
        loaded = self.get()
        self._pinned = True
        return loaded

    def get(self) -> tuple[Ensemble | None, str | None]:
        if self._pinned:
            return self._loaded
        wanted = self.store.current_id()
        if wanted and wanted != self._loaded[1]:
            with self._lock:
                if wanted != self._loaded[1]:
                    try:
                        ensemble = self.store.load(wanted, self.device)
                        ensemble.amp = self.amp
                        self._apply_map_source(ensemble, wanted)
                        self._loaded, self.last_error = (ensemble, wanted), None
                        log.info("serving model version %s", wanted)
                    except VersionError as exc:  # keep serving the version we have
                        self.last_error = str(exc)
                        log.error("cannot load version %s: %s", wanted, exc)
        return self._loaded

    def _apply_map_source(self, ensemble: Ensemble, version: str) -> None:
        """MAP_SOURCE overrides the version's own source where the version has it."""
        if not self.map_source:
            return
        if self.map_source in ensemble.config.sources:
            ensemble.config.map_source = self.map_source
        else:
            log.warning("version %s has no %r maps (it has %s): serving its own %r",
                        version, self.map_source, ensemble.config.sources,
                        ensemble.config.map_source)  # fmt: skip

    def versions(self) -> list[str]:
        return self.store.version_ids()


class CamLabelModel:
    """One request's view of the model: the project's label config plus the shared ensemble."""

    def __init__(
        self,
        holder: ModelHolder,
        fetcher: ImageFetcher,
        settings: Settings,
        label_config: str,
        project_id: str | None = None,
    ) -> None:
        self.holder = holder
        self.fetcher = fetcher
        self.settings = settings
        self.label_config = label_config
        self.project_id = project_id
        self.schema: ProjectSchema | None = None
        self.label_map: dict[str, str] = {}
        self.acquisition = settings.acquisition

    def setup(self) -> None:
        self.schema = parse_label_config(self.label_config)
        self.label_map = parse_label_map(self.settings.label_map)
        acquisition(self.acquisition)  # an unknown name fails here, once, with the known ones

    @property
    def model_version(self) -> str:
        return self.holder.get()[1] or UNTRAINED

    def fit(self, event: str, data: dict[str, Any], queue: Any) -> str:
        """Training runs in the background: queue a job for the event's project."""
        return queue.enqueue(data["project"])

    def predict(
        self,
        tasks: list[dict[str, Any]],
        context: dict | None = None,
        embeddings: bool = False,
    ) -> list[dict]:
        """One prediction per task, in order. A task that fails gets {"error": ...} only.

        ``embeddings``: add each image's "embedding" (for batch diversity; not sent to LS).
        """
        if self.schema is None:
            self.setup()
        ensemble, version = self.holder.get()
        if ensemble is None:
            return [{"result": [], "model_version": UNTRAINED} for _ in tasks]
        out: list[dict] = []
        batch = max(1, self.settings.predict_batch)
        for start in range(0, len(tasks), batch):
            out += self._predict_batch(ensemble, version, tasks[start : start + batch], embeddings)
        return out

    def _acquisition_values(self, out: EnsembleOutput, tasks: list[dict]) -> torch.Tensor:
        """Per image; ``random`` is seeded by the task ids, so a task keeps its draw."""
        ids = [t.get("id") for t in tasks if isinstance(t, dict)]
        seed = zlib.crc32(repr(ids).encode())
        gen = torch.Generator().manual_seed(seed)
        return acquisition(self.acquisition)(out.mc_probs.flatten(0, 1), generator=gen)

    def _predict_batch(
        self, ensemble: Ensemble, version: str, tasks: list[dict], embeddings: bool = False
    ) -> list[dict]:
        results: list[dict | None] = [None] * len(tasks)
        images = []
        for i, task in enumerate(tasks):
            try:
                images.append((i, self.fetcher.fetch(self._image_url(task))))
            except FetchError as exc:
                task_id = task.get("id") if isinstance(task, dict) else None
                log.warning("task %s: %s", task_id, exc)
                results[i] = {"error": f"task {task_id}: {exc}"}
        if images:
            size = ensemble.config.image_size
            x = torch.stack([to_tensor(img, size) for _, img in images])
            output = ensemble.predict(x, seed=0)
            values = self._acquisition_values(output, [tasks[i] for i, _ in images])
            for j, (i, img) in enumerate(images):
                results[i] = self._task_result(
                    ensemble, output, j, img.size, version, float(values[j])
                )
                if embeddings and output.embeddings is not None:
                    results[i]["embedding"] = output.embeddings[j].numpy()
        return [r for r in results if r is not None]

    def _image_url(self, task: Any) -> str:
        key = self.schema.image_key
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise FetchError("the task has no 'data' object")
        if key not in task["data"]:
            raise FetchError(f"the task data has no {key!r} field")
        return task["data"][key]

    def _task_result(
        self,
        ensemble: Ensemble,
        out: EnsembleOutput,
        j: int,
        size: tuple[int, int],
        version: str,
        acq_value: float,
    ) -> dict:
        schema, cfg = self.schema, ensemble.config
        width, height = size
        masks = ensemble.masks(out, j, (height, width))
        label = cfg.classes[masks.label]
        confidence = float(out.confidence[j])
        mapping = self.label_map
        regions: list[dict] = []

        def region(from_name: str, kind: str, value: dict, **extra: Any) -> dict:
            return {
                "id": uuid.uuid4().hex[:10],
                "from_name": from_name,
                "to_name": schema.image_name,
                "type": kind,
                **extra,
                "value": value,
                "score": confidence,
            }

        choice = schema.label_for(label, schema.choices, mapping) if schema.choices_name else None
        if choice is not None:
            regions.append(region(schema.choices_name, "choices", {"choices": [choice]}))
        has_mask = masks.mask is not None and masks.mask.any()
        brush = schema.label_for(label, schema.brush_labels, mapping) if has_mask else None
        if brush is not None:
            rle = mask_to_rle(masks.mask)
            value = {"format": "rle", "rle": rle, "brushlabels": [brush]}
            size_fields = {"original_width": width, "original_height": height, "image_rotation": 0}
            regions.append(region(schema.brush_name, "brushlabels", value, **size_fields))
        unc = {k: float(v[j]) for k, v in out.uncertainty.items()}
        flagged = bool(out.flagged[j])
        # Visible in the region panel: why this task was ranked where it is.
        note = (
            f"camlabel: {'please review: ' if flagged else ''}confidence {confidence:.2f}, "
            f"{self.acquisition} {acq_value:.2f}, entropy {unc['entropy']:.2f}, "
            f"BALD {unc['bald']:.3f}, {len(masks.agreeing)}/{len(cfg.members)} models agree"
        )
        for r in regions:
            r["meta"] = {"text": [note]}
        return {
            "result": regions,
            # Label Studio serves the lowest score first: score = 1 - acquisition value.
            "score": score_from_value(acq_value),
            "model_version": version,
            "flagged": flagged,
            "confidence": confidence,
            "acquisition": {"function": self.acquisition, "value": acq_value},
            "uncertainty": unc,
        }
