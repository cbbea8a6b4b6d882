"""The model class, shaped like label-studio-ml 2.x's LabelStudioMLBase: setup / predict / fit."""

from __future__ import annotations

import functools
import logging
import time
import uuid
import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsl_models import probe, refine
from wsl_models.acquisition import acquisition, score_from_value
from wsl_models.ensemble import EnsembleOutput, ImageMasks
from wsl_models.explanation import explanation_layers, flag_reasons, member_votes
from wsl_models.images import to_tensor
from wsl_models.masks import review_region

from .explain import layer_label
from .fetch import FetchError, ImageFetcher
from .holder import Served
from .inference import InferenceEngine
from .interactive import PromptError, current_mask, parse_prompt
from .label_config import ProjectSchema, parse_label_config, parse_label_map
from .rle import mask_to_rle
from .settings import Settings

log = logging.getLogger(__name__)

UNTRAINED = "untrained"


class CamLabelModel:
    """One request's view: the project's label config and the version that serves it."""

    def __init__(
        self,
        served: Served,
        engine: InferenceEngine,
        fetcher: ImageFetcher,
        settings: Settings,
        label_config: str,
        project_id: int | None = None,
    ) -> None:
        self.ensemble, self.version = served  # one version for the whole request
        self.engine = engine
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
        return self.version or UNTRAINED

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

        Images are fetched in parallel for at most FETCH_DEADLINE seconds from now, then go
        to the worker's inference thread. ``embeddings``: add each
        image's "embedding" (for batch diversity; not sent to Label Studio).
        """
        if self.schema is None:
            self.setup()
        if self.ensemble is None:
            return [{"result": [], "model_version": UNTRAINED} for _ in tasks]
        deadline = time.monotonic() + self.settings.fetch_deadline
        if context:  # a smart tool's prompt (interactive mode): one brush region per task
            return [self._prompted(task, context, deadline) for task in tasks]
        results: list[dict | None] = [None] * len(tasks)
        urls: dict[int, str] = {}
        for i, task in enumerate(tasks):
            try:
                urls[i] = self._image_url(task)
            except FetchError as exc:
                results[i] = self._error(task, exc)
        fetched = self.fetcher.fetch_all(list(urls.values()), deadline)
        images: list[tuple[int, Image.Image]] = []
        for i, image in zip(urls, fetched, strict=True):
            if isinstance(image, FetchError):
                results[i] = self._error(tasks[i], image)
            else:
                images.append((i, image))
        if images:
            size = self.ensemble.config.input_size
            x = torch.stack([to_tensor(img, size) for _, img in images])
            outputs = self.engine.predict(self.ensemble, x)
            for (i, img), out in zip(images, outputs, strict=True):
                value = self._acquisition_value(out, tasks[i])
                results[i] = self._task_result(out, img.size, value)
                if embeddings and out.embeddings is not None:
                    results[i]["embedding"] = out.embeddings[0].numpy()
        return [r for r in results if r is not None]

    @staticmethod
    def _error(task: Any, exc: Exception) -> dict:
        task_id = task.get("id") if isinstance(task, dict) else None
        log.warning("task %s: %s", task_id, exc)
        return {"error": f"task {task_id}: {exc}"}

    def _acquisition_value(self, out: EnsembleOutput, task: Any) -> float:
        """``random`` is seeded by the task id: a task keeps its draw, whatever its batch."""
        task_id = task.get("id") if isinstance(task, dict) else None
        gen = torch.Generator().manual_seed(zlib.crc32(repr(task_id).encode()))
        return float(acquisition(self.acquisition)(out.mc_probs.flatten(0, 1), generator=gen)[0])

    def _image_url(self, task: Any) -> str:
        key = self.schema.image_key
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise FetchError("the task has no 'data' object")
        if key not in task["data"]:
            raise FetchError(f"the task data has no {key!r} field")
        return task["data"][key]

    def _prompted(self, task: Any, context: dict, deadline: float) -> dict:
        """The prompted label's mask: a rectangle re-segments inside it, keypoints add or
        remove objects on top of the current mask; from the probability map (no MC samples,
        no ranking) refined on the image by GrabCut, or for keypoints by the feature probe
        (KEYPOINTS).

        The ensemble runs only where its maps are used (BOX_PRIOR=map, GrabCut keypoints, or
        keypoints on a task with no mask yet): a rectangle (GrabCut in the box) and the
        probe's keypoints on the mask the annotator sees need none of it (1024 px image, Lite
        trio: 405 / 248 ms p50 against 551 / 421, and 397 / 259 against 963 / 798 with flip
        TTA; docs/interactive.md). The answer's score is the ensemble's confidence where it
        ran, else there is none (Label Studio stores nothing of an interactive answer)."""
        ran: list[EnsembleOutput] = []
        try:
            (image,) = self.fetcher.fetch_all([self._image_url(task)], deadline)
            if isinstance(image, FetchError):
                raise image
            prompt = parse_prompt(context, image.size)
            schema, ensemble = self.schema, self.ensemble
            if prompt.label not in schema.brush_labels:
                raise PromptError(f"the label {prompt.label!r} is not a BrushLabels label of "
                                  f"this project ({', '.join(schema.brush_labels) or 'none'})")  # fmt: skip
            cfg = ensemble.config
            width, height = image.size

            @functools.cache  # at the image's size, once, and only where they are used
            def model_masks() -> ImageMasks:
                x = to_tensor(image, cfg.input_size)[None]
                ran.extend(self.engine.predict(ensemble, x, samples=0))
                classes = [c for c in cfg.classes
                           if schema.label_for(c, (prompt.label,), self.label_map)]  # fmt: skip
                label = cfg.classes.index(classes[0]) if classes else None
                return ensemble.masks(ran[0], 0, (height, width), label=label)

            grabcut_clicks = bool(prompt.clicks) and self.settings.keypoints == "grabcut"
            # The map seeds GrabCut's clicks and BOX_PRIOR=map; the probe needs none.
            uses_map = grabcut_clicks or self.settings.box_prior == "map"
            prob = model_masks().intersection_map if uses_map else None
            pixels = np.asarray(image)
            mask = np.zeros((height, width), bool)
            inside = prob if self.settings.box_prior == "map" else None  # BOX_PRIOR
            for box in prompt.boxes:
                mask |= refine.box_mask(pixels, inside, box)
            if prompt.clicks and not prompt.boxes:  # clicks edit the mask the annotator sees
                start = current_mask(task, schema.brush_name, prompt.label, image.size)
                if start is None:  # no draft or prediction: the pre-annotation
                    start = model_masks().mask
                mask = start if start is not None else mask
            if prompt.clicks and not grabcut_clicks:
                member = ensemble.members[0]
                features = self.engine.call(
                    lambda: probe.image_features(member, image, cfg.input_size)
                )
                mask = probe.probe_clicks(features, mask, prompt.clicks)
            elif prompt.clicks:
                mask = refine.apply_clicks(pixels, prob, mask, prompt.clicks)
        except (FetchError, PromptError) as exc:
            return self._error(task, exc)
        confidence = float(ran[0].confidence[0]) if ran else None
        region = self._brush(schema.brush_name, prompt.label, mask, image.size, confidence)
        answer = {"result": [region], "model_version": self.version}
        return answer if confidence is None else {**answer, "score": confidence}

    def _region(
        self, from_name: str, kind: str, value: dict, score: float | None, **extra: Any
    ) -> dict:
        """A result region; without a ``score`` (no model output behind it) it has none."""
        region = {
            "id": uuid.uuid4().hex[:10],
            "from_name": from_name,
            "to_name": self.schema.image_name,
            "type": kind,
            **extra,
            "value": value,
        }
        return region if score is None else {**region, "score": score}

    def _brush(
        self, name: str, label: str, mask: np.ndarray, size: tuple[int, int], score: float | None
    ) -> dict:
        """A BrushLabels region at the displayed ``size`` = (W, H)."""
        width, height = size
        value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
        return self._region(name, "brushlabels", value, score, original_width=width,
                            original_height=height, image_rotation=0)  # fmt: skip

    def _explanation(
        self, out: EnsembleOutput, masks: ImageMasks, size: tuple[int, int], score: float
    ) -> list[dict]:
        """The explanation control's regions: each agreeing member's map and the consensus at
        EXPLAIN_LEVELS, each with a note of whose map it is and what that member said."""
        schema, cfg = self.schema, self.ensemble.config
        keys = out.member_keys
        votes = {v.member: v for v in member_votes(out, 0, cfg.classes)}
        source = cfg.map_source
        regions = []
        levels, style = self.settings.explain_level_values, self.settings.explain_style
        for layer in explanation_layers(masks, levels, style):
            label = layer_label(layer.source, keys, schema.explanation_labels)
            if label is None:
                continue
            vote = votes.get(layer.source)
            said = f"; it says {vote.label} {vote.probability:.2f}" if vote else ""
            whose = "the agreeing models' overlap" if vote is None else f"{layer.source}'s"
            region = self._brush(schema.explanation_name, label, layer.mask, size, score)
            region["meta"] = {"text": [
                f"camlabel explanation, {label}: {whose} {source} map of "
                f"{cfg.classes[masks.label]} >= {layer.level:.2f}{said}"
            ]}  # fmt: skip
            regions.append(region)
        return regions

    def _task_result(self, out: EnsembleOutput, size: tuple[int, int], acq_value: float) -> dict:
        """The regions of one image (``out`` holds that image alone) at its displayed size."""
        schema, ensemble = self.schema, self.ensemble
        cfg = ensemble.config
        width, height = size
        masks = ensemble.masks(out, 0, (height, width))
        label = cfg.classes[masks.label]
        confidence = float(out.confidence[0])
        mapping = self.label_map
        regions: list[dict] = []

        choice = schema.label_for(label, schema.choices, mapping) if schema.choices_name else None
        if choice is not None:
            value = {"choices": [choice]}
            regions.append(self._region(schema.choices_name, "choices", value, confidence))
        has_mask = masks.mask is not None and masks.mask.any()
        brush = schema.label_for(label, schema.brush_labels, mapping) if has_mask else None
        if brush is not None:
            regions.append(self._brush(schema.brush_name, brush, masks.mask, size, confidence))
            review = self.settings.review_label
            if review and review in schema.brush_labels:  # "review here": where it is unsure
                agreeing = [masks.member_masks[n] for n in masks.agreeing]
                band = self.settings.review_band_values
                unsure = review_region(agreeing, masks.intersection_map, band)
                if unsure.any():
                    regions.append(self._brush(schema.brush_name, review, unsure, size, confidence))
        unc = {k: float(v[0]) for k, v in out.uncertainty.items()}
        flagged = bool(out.flagged[0])
        why = ""
        if flagged:
            reasons = flag_reasons(out, 0, cfg.classes, cfg.review_measure, cfg.review_threshold)
            why = f"please review ({'; '.join(reasons)}): " if reasons else "please review: "
        # Visible in the region panel: why this task was ranked where it is.
        note = (
            f"camlabel: {why}"
            f"confidence {confidence:.2f}, {self.acquisition} {acq_value:.2f}, "
            f"entropy {unc['entropy']:.2f}, BALD {unc['bald']:.3f}, "
            f"{len(masks.agreeing)}/{len(cfg.members)} models agree"
        )
        for r in regions:
            r["meta"] = {"text": [note]}
        if schema.explanation_name:  # listed first: Label Studio draws the first region on top
            regions = self._explanation(out, masks, size, confidence) + regions
        return {
            "result": regions,
            # Label Studio serves the lowest score first: score = 1 - acquisition value.
            "score": score_from_value(acq_value),
            "model_version": self.version,
            "flagged": flagged,
            "confidence": confidence,
            "acquisition": {"function": self.acquisition, "value": acq_value},
            "uncertainty": unc,
        }
