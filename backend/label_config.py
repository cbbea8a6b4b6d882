"""What the backend needs from a Label Studio label config, parsed with the SDK."""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

# The name of the optional <BrushLabels> that shows what each model saw (label_config/README.md):
# its regions come from the backend and are never training data.
EXPLANATION_CONTROL = "explanation"


class LabelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ProjectSchema:
    image_name: str  # <Image name=...>
    image_key: str  # the task data key in value="$key"
    brush_name: str | None  # <BrushLabels name=...>: mask classes
    brush_labels: tuple[str, ...]
    choices_name: str | None  # <Choices name=...>: the image-level class
    choices: tuple[str, ...]
    explanation_name: str | None = None  # <BrushLabels name="explanation">: model layers
    explanation_labels: tuple[str, ...] = ()

    def label_for(
        self, model_class: str, options: tuple[str, ...], mapping: dict[str, str]
    ) -> str | None:
        """The project label for a model class: LABEL_MAP first, then the same name (any case)."""
        if model_class in mapping:
            wanted = mapping[model_class]
            return wanted if wanted in options else None
        for option in options:
            if option.lower() == model_class.lower():
                return option
        return None


def parse_label_map(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if "=" in item]
    return {k.strip(): v.strip() for k, v in pairs}


def parse_label_config(xml: str) -> ProjectSchema:
    if not xml or not xml.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several XML/validation error types
        raise LabelConfigError(f"the label config cannot be parsed: {exc}") from exc
    images = [o for o in interface.objects if o.tag == "Image"]
    if not images:
        raise LabelConfigError("the label config has no <Image> object")
    image = images[0]
    brushes = [c for c in interface.controls if c.tag == "BrushLabels" and image.name in c.to_name]
    brush = next((c for c in brushes if c.name != EXPLANATION_CONTROL), None)
    explanation = next((c for c in brushes if c.name == EXPLANATION_CONTROL), None)
    choices = next(
        (c for c in interface.controls if c.tag == "Choices" and image.name in c.to_name), None
    )
    if brush is None:
        what = "neither <BrushLabels> nor <Choices>" if choices is None else "no <BrushLabels>"
        raise LabelConfigError(
            f"the label config has {what} for image {image.name!r}: camlabel pre-annotates "
            "brush masks (and reads image-level labels from an optional <Choices>)"
        )
    return ProjectSchema(
        image_name=image.name,
        image_key=str(image.value).lstrip("$"),
        brush_name=brush.name if brush else None,
        brush_labels=tuple(brush.labels) if brush else (),
        choices_name=choices.name if choices else None,
        choices=tuple(choices.labels) if choices else (),
        explanation_name=explanation.name if explanation else None,
        explanation_labels=tuple(explanation.labels) if explanation else (),
    )
