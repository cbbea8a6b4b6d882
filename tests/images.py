"""Image and dataset helpers shared by the tests."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from wsl_models.data import Dataset, load_dataset


def png_data_uri(img: np.ndarray) -> str:
    """``img`` as a task's image field: a base64 PNG data: URI (what the fetcher decodes)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def without_masks(root: Path, dest: Path) -> Dataset:
    """A copy of the dataset folder ``root`` with its masks/ folder removed, as a new Label
    Studio project has only image labels: nothing calibrates a threshold."""
    shutil.copytree(root, dest)
    shutil.rmtree(dest / "masks")
    return load_dataset(dest)
