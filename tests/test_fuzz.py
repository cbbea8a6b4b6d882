"""Hostile input, generated: /predict, /setup and /webhook payloads, and image bytes.

Whatever arrives, the answer is JSON with a 2xx or 4xx status (an "error" key with 4xx), never a
500, and the server keeps serving; image decoding either returns an RGB image or raises
ImageError. Seeds are fixed (derandomize) so a failure reproduces; `--hypothesis-seed` varies it.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.app import create_app
from backend.settings import Settings
from wsl_models.images import ImageError, open_image
from wsl_models.synthetic import blob_image

CONFIG = (Path(__file__).parents[1] / "label_config" / "finding_normal.xml").read_text()
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _valid_image_bytes(fmt: str) -> bytes:
    pixels, _ = blob_image(np.random.default_rng(1), (40, 48), blobs=2)
    img = Image.fromarray(pixels) if fmt != "GIF" else Image.new("P", (48, 40), 3)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


VALID = {fmt: _valid_image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image with a few bytes changed, cut short, or a header field rewritten."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


image_bytes = st.binary(max_size=256) | mutated_images()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


tasks = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "data": st.dictionaries(
                st.sampled_from(["image", "img", ""]),
                json_values
                | image_bytes.map(_data_uri)
                | st.sampled_from(
                    [
                        "/data/upload/1/x.png",
                        "http://169.254.169.254/latest/meta-data/",
                        "http://127.0.0.1:1/x.png",
                        "file:///etc/passwd",
                        "data:,",
                        "data:image/png;base64,!!!",
                    ]
                ),
                max_size=2,
            )
            | json_values,
        },
    )
    | json_values,
    max_size=3,
)

label_configs = st.sampled_from(
    [CONFIG, CONFIG.replace("finding", "lesion"), CONFIG[: len(CONFIG) // 2], "", "<View/>"]
) | st.text(max_size=60)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # No LABEL_STUDIO_URL and no allow-list: every URL is refused before any connection, so the
    # fuzz never touches the network. The model is untrained on purpose: an untrained backend
    # still parses everything (trained inference is fuzzed through the image decoder below).
    model_dir = tmp_path_factory.mktemp("fuzz-models")
    return create_app(Settings(model_dir=str(model_dir), fetch_timeout=0.5)).test_client()


def _assert_clean(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert body.get("error")


@FUZZ
@given(body=json_values | st.fixed_dictionaries({"tasks": tasks, "label_config": label_configs}))
def test_predict_never_fails_on_hostile_payloads(client, body):
    _assert_clean(client.post("/predict", json=body))


@FUZZ
@given(
    body=json_values
    | st.fixed_dictionaries({"schema": label_configs}, optional={"project": json_values})
)
def test_setup_never_fails_on_hostile_payloads(client, body):
    _assert_clean(client.post("/setup", json=body))


actions = st.sampled_from(["ANNOTATION_CREATED", "START_TRAINING", "ANNOTATIONS_DELETED", "X"])


@FUZZ
@given(
    body=json_values
    | st.fixed_dictionaries(
        {"action": actions | json_values},
        optional={"project": st.fixed_dictionaries({"id": json_values}) | json_values},
    )
)
def test_webhook_never_fails_on_hostile_payloads(client, body):
    _assert_clean(client.post("/webhook", json=body))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_raw_bytes_bodies_are_refused_cleanly(client, raw):
    for route in ("/predict", "/setup", "/webhook"):
        _assert_clean(client.post(route, data=raw, content_type="application/json"))
    assert client.get("/health").status_code == 200


@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=image_bytes)
def test_image_decoding_returns_rgb_or_image_error(data):
    try:
        img = open_image(data, max_pixels=1_000_000)
    except ImageError:
        return
    assert img.mode == "RGB" and img.width * img.height <= 1_000_000


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "BMP"])
def test_decompression_bombs_are_refused_from_the_header(fmt):
    """A small file that declares a huge canvas is refused before its pixels are decoded."""
    buf = io.BytesIO()
    Image.new("1" if fmt != "GIF" else "P", (20000, 15000)).save(buf, format=fmt)
    assert len(buf.getvalue()) < 40_000_000
    with pytest.raises(ImageError, match="above the limit|decompression bomb"):
        open_image(buf.getvalue(), max_pixels=100_000_000 // 2)
