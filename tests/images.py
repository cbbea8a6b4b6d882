"""Image helpers shared by the tests."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_data_uri(img: np.ndarray) -> str:
    """``img`` as a task's image field: a base64 PNG data: URI (what the fetcher decodes)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
