"""Camera JPEGs: pixels stored sideways plus an EXIF orientation tag, shown upright by browsers
and Label Studio. Predictions, human masks and datasets must all use the displayed image."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.annotations import collect_dataset
from backend.app import create_app
from backend.fetch import ImageFetcher
from backend.rle import mask_to_rle, rle_to_mask
from backend.settings import Settings
from wsl_models.images import open_image
from wsl_models.synthetic import blob_image

CONFIG = (Path(__file__).parents[1] / "label_config" / "finding_normal.xml").read_text()
SYNTH_CONFIG = CONFIG.replace("finding", "lesion")
ORIENTATION = 0x0112
# How the stored pixels relate to the displayed ones (np.rot90 turns counter-clockwise):
# 6 = "rotate 90 clockwise to display", so the camera stored the upright image turned left.
STORED = {6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


def camera_jpeg(displayed: np.ndarray, orientation: int) -> bytes:
    stored = np.ascontiguousarray(STORED[orientation](displayed))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def displayed_blob(seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """96 wide, 160 high, as the browser shows it, one blob and its mask."""
    return blob_image(np.random.default_rng(seed), (160, 96), 1)


@pytest.mark.parametrize("orientation", [6, 8])
def test_decoded_as_the_browser_shows_it(orientation):
    shown, _ = displayed_blob()
    raw = Image.open(io.BytesIO(camera_jpeg(shown, orientation)))
    assert raw.size == (160, 96)  # stored sideways
    img = open_image(camera_jpeg(shown, orientation))
    assert img.size == (96, 160)
    pixels = np.asarray(img, float)
    upright = np.abs(pixels - shown).mean()  # JPEG loses some of the pixel noise
    upside_down = np.abs(pixels - np.rot90(shown, 2)).mean()  # the other way to get 96 x 160
    assert upright < 0.6 * upside_down


@pytest.mark.parametrize("orientation", [6, 8])
def test_prediction_is_at_the_displayed_size_on_the_displayed_object(model_dir, orientation):
    shown, truth = displayed_blob()
    client = create_app(Settings(model_dir=str(model_dir))).test_client()
    task = {"id": 1, "data": {"image": data_uri(camera_jpeg(shown, orientation))}}
    r = client.post("/predict", json={"tasks": [task], "label_config": SYNTH_CONFIG})
    assert r.status_code == 200
    regions = {x["type"]: x for x in r.get_json()["results"][0]["result"]}
    brush = regions["brushlabels"]
    assert (brush["original_width"], brush["original_height"]) == (96, 160)
    mask = rle_to_mask(brush["value"]["rle"], 160, 96)
    assert mask.shape == truth.shape
    # The mask covers the blob where the browser shows it; the stored (sideways) placement
    # of the same blob, cropped to the displayed frame, is not where the mask is.
    sideways = np.zeros_like(truth)
    turned = STORED[orientation](truth)[:160, :96]
    sideways[: turned.shape[0], : turned.shape[1]] = turned
    inside = (mask & truth).sum() / truth.sum()
    print(f"orientation {orientation}: {inside:.2f} of the blob covered")
    assert inside > 0.3
    assert (mask & truth).sum() > 2 * (mask & sideways & ~truth).sum()


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_human_mask_is_read_at_the_displayed_size(tmp_path, orientation):
    shown, truth = displayed_blob(7)
    task = {
        "id": 3,
        "data": {"image": data_uri(camera_jpeg(shown, orientation))},
        "annotations": [
            {
                "result": [
                    {
                        "from_name": "diagnosis",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["finding"]},
                    },
                    {
                        "from_name": "mask",
                        "to_name": "image",
                        "type": "brushlabels",
                        "original_width": 96,
                        "original_height": 160,
                        "value": {
                            "format": "rle",
                            "rle": mask_to_rle(truth),
                            "brushlabels": ["finding"],
                        },
                    },
                ]  # fmt: skip
            }
        ],
    }
    counts = collect_dataset([task], CONFIG, ImageFetcher(Settings()), tmp_path)
    assert counts["masks"] == 1
    image = Image.open(tmp_path / "images" / "task_3.png")
    saved = np.asarray(Image.open(tmp_path / "masks" / "task_3.png")) > 0
    assert image.size == (96, 160) and saved.shape == (160, 96)
    assert np.array_equal(saved, truth)
    # The blob's pixels in the saved image are the bright ones: image and mask line up.
    red = np.asarray(image, float)[..., 0]
    assert red[truth].mean() > red[~truth].mean() + 60
