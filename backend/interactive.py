"""Interactive mode: Label Studio's smart tools send a prompt, the answer is one brush region.

With the ML backend's ``is_interactive`` on, a smart RectangleLabels or KeyPointLabels makes
Label Studio POST /predict with that one task and ``params.context.result`` = the annotator's
rectangles and keypoints (values in percent of the displayed image; keypoints carry
``is_positive``). It shows ``results[0]`` at once and stores nothing until the annotator
submits. This module reads the prompt (every malformation is a ``PromptError`` with a message
for the annotator) and finds the mask to start from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rle import rle_to_mask

PROMPT_TYPES = ("rectanglelabels", "keypointlabels")


class PromptError(ValueError):
    """A context Label Studio (or a client) sent that cannot be a prompt."""


@dataclass
class Prompt:
    label: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # pixels
    clicks: list[tuple[float, float, bool]] = field(default_factory=list)  # x, y, positive


def _percent(value: dict, key: str, positive: bool = False) -> float:
    v = value.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PromptError(f"'{key}' must be a number (percent of the image), got {v!r}")
    if not -0.5 <= v <= 100.5 or (positive and v <= 0):
        raise PromptError(f"'{key}' = {v} is outside the image (0-100 %)")
    return float(v)


def parse_prompt(context: Any, size: tuple[int, int]) -> Prompt:
    """The prompt in ``context`` for an image of ``size`` = (W, H) as displayed."""
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        raise PromptError("the context has no 'result' list")
    items = context["result"]
    if not items:
        raise PromptError("the context's 'result' is empty: no rectangle or keypoint to use")
    w, h = size
    labels: set[str] = set()
    prompt = Prompt(label="")
    for item in items:
        if not isinstance(item, dict):
            raise PromptError("every context result must be an object")
        kind = item.get("type")
        if kind not in PROMPT_TYPES:
            raise PromptError(f"unknown prompt type {kind!r}; known: {', '.join(PROMPT_TYPES)}")
        value = item.get("value")
        if not isinstance(value, dict):
            raise PromptError(f"the {kind} has no 'value' object")
        names = value.get(kind)
        if not isinstance(names, list) or not names or not isinstance(names[0], str):
            raise PromptError(f"the {kind} names no label ('value.{kind}')")
        labels.add(names[0])
        x, y = _percent(value, "x") * w / 100, _percent(value, "y") * h / 100
        if kind == "rectanglelabels":
            bw = _percent(value, "width", positive=True) * w / 100
            bh = _percent(value, "height", positive=True) * h / 100
            prompt.boxes.append((x, y, x + bw, y + bh))
        else:
            prompt.clicks.append((x, y, item.get("is_positive", True) is not False))
    if len(labels) > 1:
        raise PromptError(f"one label per prompt, got {sorted(labels)}")
    prompt.label = labels.pop()
    return prompt


def current_mask(
    task: dict, brush_name: str, label: str, size: tuple[int, int]
) -> np.ndarray | None:
    """The mask the annotator sees for ``label``: the latest draft's brush regions, else the
    latest prediction's (None when neither has one). ``size`` = (W, H)."""
    w, h = size
    for source in ("drafts", "predictions"):
        entries = [e for e in task.get(source) or [] if isinstance(e, dict)]
        entries.sort(key=lambda e: str(e.get("updated_at") or e.get("created_at") or ""))
        for entry in reversed(entries):
            regions = [
                r
                for r in entry.get("result") or []
                if isinstance(r, dict)
                and r.get("type") == "brushlabels"
                and r.get("from_name") == brush_name
                and label in (r.get("value") or {}).get("brushlabels", [])
                and (r.get("value") or {}).get("rle")
            ]
            if regions:
                mask = np.zeros((h, w), bool)
                for r in regions:
                    try:
                        mask |= rle_to_mask(r["value"]["rle"], h, w)
                    except Exception as exc:  # a region of another size or a broken RLE
                        raise PromptError(
                            f"the task's current brush mask is unreadable: {exc}"
                        ) from exc
                return mask
    return None
