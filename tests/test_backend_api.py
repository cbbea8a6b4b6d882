"""Every route of the ML backend through Flask's test client, including the error paths.

Images come from data: URIs and from a real HTTP server on loopback (our own test server).
"""

import base64
import http.server
import io
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from backend.rle import rle_to_mask
from backend.settings import Settings
from wsl_models.versions import ModelStore

CONFIG = (Path(__file__).parents[1] / "label_config" / "finding_normal.xml").read_text()
SYNTH_CONFIG = CONFIG.replace("finding", "lesion")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/private/"):
            if self.headers.get("Authorization") != "Token secret-key":
                self.send_error(401)
                return
            self.path = self.path[len("/private") :]
        return super().do_GET()

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client of /slow gives up first: a broken pipe is expected


@pytest.fixture(scope="module")
def server(synth_dir):
    handler = lambda *a, **k: _Handler(*a, directory=str(synth_dir), **k)  # noqa: E731
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def client(model_dir, server):
    settings = Settings(
        model_dir=str(model_dir),
        label_studio_url=server,
        label_studio_api_key="secret-key",
        fetch_timeout=1.0,
        max_image_pixels=4_000_000,
    )
    return create_app(settings).test_client()


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _predict(client, tasks, config=SYNTH_CONFIG):
    return client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})


def test_health_setup_versions(client, model_dir):
    vid = ModelStore(model_dir).current_id()
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["model_version"] == vid and health["trained"]
    setup = client.post("/setup", json={"schema": SYNTH_CONFIG, "project": "1.1"})
    assert setup.status_code == 200 and setup.get_json()["model_version"] == vid
    assert client.get("/versions").get_json() == {"versions": [vid]}


def test_predict_returns_class_score_and_an_rle_mask_at_the_image_size(client, synth_dir):
    image = synth_dir / "images" / "test_lesion_0.png"
    r = _predict(client, [{"id": 7, "data": {"image": _data_uri(image)}}])
    assert r.status_code == 200
    (pred,) = r.get_json()["results"]
    # score = 1 - normalised acquisition value (entropy by default): Label Studio serves the
    # lowest score first, i.e. the most uncertain image; confidence goes beside it.
    assert 0.5 <= pred["confidence"] <= 1.0
    assert pred["acquisition"]["function"] == "entropy"
    entropy = pred["uncertainty"]["entropy"]
    assert pred["score"] == pytest.approx(1 - entropy / math.log(2), abs=1e-6)
    assert all(region["score"] == pred["confidence"] for region in pred["result"])
    by_type = {region["type"]: region for region in pred["result"]}
    assert by_type["choices"]["value"]["choices"] == ["lesion"]
    brush = by_type["brushlabels"]
    w, h = Image.open(image).size
    assert (brush["original_width"], brush["original_height"]) == (w, h)
    mask = rle_to_mask(brush["value"]["rle"], h, w)
    truth = np.asarray(Image.open(synth_dir / "masks" / image.name)) > 0
    inter = (mask & truth).sum()
    assert inter > 0.3 * truth.sum()  # the mask sits on the blob
    assert brush["value"]["brushlabels"] == ["lesion"]
    assert set(pred["uncertainty"]) >= {"entropy", "bald", "disagreement"}


def test_flagged_images_carry_a_visible_review_note(model_dir, server, synth_dir):
    from wsl_models.versions import ModelStore as Store

    app = create_app(Settings(model_dir=str(model_dir)))
    ensemble, _ = app.config["camlabel"]["holder"].get()
    old = ensemble.config.review_threshold
    ensemble.config.review_threshold = -1.0  # every image is "too uncertain"
    try:
        image = synth_dir / "images" / "test_lesion_0.png"
        r = _predict(app.test_client(), [{"id": 1, "data": {"image": _data_uri(image)}}])
    finally:
        ensemble.config.review_threshold = old
    (pred,) = r.get_json()["results"]
    assert pred["flagged"] is True
    assert all("please review" in region["meta"]["text"][0] for region in pred["result"])
    assert Store(model_dir).current_id() == pred["model_version"]


def test_normal_image_gets_a_choice_and_no_brush(client, synth_dir):
    image = synth_dir / "images" / "test_normal_1.png"
    (pred,) = _predict(client, [{"id": 1, "data": {"image": _data_uri(image)}}]).get_json()[
        "results"
    ]
    types = [region["type"] for region in pred["result"]]
    assert "brushlabels" not in types
    assert types == ["choices"]


def test_relative_absolute_and_authenticated_urls(client, server):
    tasks = [
        {"id": 1, "data": {"image": "/images/test_lesion_1.png"}},
        {"id": 2, "data": {"image": f"{server}/images/test_lesion_2.png"}},
        {"id": 3, "data": {"image": "/private/images/test_lesion_3.png"}},
    ]
    results = _predict(client, tasks).get_json()["results"]
    assert len(results) == 3 and all("error" not in r for r in results)


def test_bad_tasks_get_clear_per_task_errors_and_the_rest_still_predicts(client, server, tmp_path):
    junk = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    huge = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    tasks = [
        {"id": 1, "data": {"text": "no image field"}},
        {"id": 2, "data": {"image": f"{server}/images/missing.png"}},
        {"id": 3, "data": {"image": f"{server}/slow/images/test_lesion_0.png"}},
        {"id": 4, "data": {"image": junk}},
        {"id": 5, "data": {"image": huge}},
        {"id": 6, "data": {"image": "ftp://example.com/a.png"}},
        {"id": 7, "data": {"image": "/images/test_lesion_0.png"}},
    ]
    r = _predict(client, tasks)
    assert r.status_code == 200
    results = r.get_json()["results"]
    errors = [res.get("error", "") for res in results]
    assert "no 'image' field" in errors[0]
    assert "HTTP 404" in errors[1]
    assert "timed out" in errors[2]
    assert "not an image" in errors[3]
    assert "above the limit" in errors[4] or "decompression bomb" in errors[4]
    assert "unsupported image URL scheme" in errors[5]
    assert "error" not in results[6] and results[6]["result"]
    assert "secret-key" not in r.get_data(as_text=True)


def test_malformed_requests_are_400_with_json_errors(client):
    cases = [
        client.post("/predict", data="{not json", content_type="application/json"),
        client.post("/predict", json={"tasks": [], "label_config": SYNTH_CONFIG}),
        client.post("/predict", json={"tasks": [{"data": {}}]}),
        client.post("/setup", json={"schema": "<View><Image name='i' value='$i'/></View>"}),
        client.post("/setup", json={"schema": "<View><Image"}),
        client.post("/webhook", data="[]", content_type="application/json"),
        client.post("/webhook", json={"action": "START_TRAINING"}),
    ]
    for response in cases:
        assert response.status_code == 400, response.get_json()
        assert response.get_json()["error"]
    assert "neither <BrushLabels> nor <Choices>" in cases[3].get_json()["error"]
    choices_only = SYNTH_CONFIG.split("<BrushLabels")[0] + "</View>"
    r = client.post("/setup", json={"schema": choices_only})
    assert r.status_code == 400 and "no <BrushLabels>" in r.get_json()["error"]
    assert client.get("/nope").status_code == 404
    assert client.get("/health").status_code == 200  # still serving


def test_webhooks_queue_one_persistent_job_per_burst(model_dir, tmp_path):
    from backend.jobs import TrainingQueue

    settings = Settings(model_dir=str(tmp_path / "m"))
    client = create_app(settings).test_client()
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    statuses = [
        client.post("/webhook", json={"action": action, "project": {"id": 3}}).get_json()["status"]
        for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING")
    ]
    assert statuses == ["queued", "already-queued", "already-queued"]
    # The queue is a file: a new process (a restarted server) sees the same single job.
    restarted = TrainingQueue(settings)
    assert restarted.huey.pending_count() == 1
    assert client.get("/health").get_json()["jobs"]["3"]["state"] == "queued"


def test_untrained_backend_still_serves(tmp_path):
    app = create_app(Settings(model_dir=str(tmp_path / "empty")))
    client = app.test_client()
    health = client.get("/health").get_json()
    assert health["trained"] is False and health["model_version"] == "untrained"
    r = _predict(client, [{"id": 1, "data": {"image": "data:,"}}])
    assert r.status_code == 200
    assert r.get_json()["results"] == [{"result": [], "model_version": "untrained"}]


def test_basic_auth_on_every_route(model_dir):
    settings = Settings(model_dir=str(model_dir), basic_auth_user="ls", basic_auth_pass="pw")
    client = create_app(settings).test_client()
    assert client.get("/health").status_code == 401
    assert client.post("/predict", json={}).status_code == 401
    ok = client.get(
        "/health", headers={"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    )
    assert ok.status_code == 200
    bad = client.get(
        "/health", headers={"Authorization": "Basic " + base64.b64encode(b"ls:x").decode()}
    )
    assert bad.status_code == 401


def test_corrupt_new_version_keeps_the_old_one_serving(model_dir, tmp_path):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    app = create_app(Settings(model_dir=str(root)))
    client = app.test_client()
    store = ModelStore(root)
    old = store.current_id()
    # A new version appears, but one of its files is damaged.
    new = store.save(store.load(), {})
    weights = next((root / "versions" / new).glob("*.pt"))
    weights.write_bytes(weights.read_bytes()[:-5])
    assert client.get("/health").get_json()["model_version"] == old  # its load starts
    app.config["camlabel"]["holder"].settle()
    health = client.get("/health").get_json()
    assert health["model_version"] == old
    assert "corrupt" in health["load_error"]


def test_a_failed_job_is_visible_and_the_current_version_keeps_serving(model_dir, tmp_path):
    import shutil

    from backend.jobs import TrainingQueue

    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    settings = Settings(model_dir=str(root))  # no LABEL_STUDIO_URL: the job cannot pull tasks
    queue = TrainingQueue(settings, immediate=True)
    app = create_app(settings, queue=queue)
    client = app.test_client()
    before = client.get("/health").get_json()["model_version"]
    queue.enqueue({"id": 5})  # runs now (immediate mode); huey logs the TrainingError
    health = client.get("/health").get_json()
    assert health["jobs"]["5"]["state"] == "failed"
    assert "LABEL_STUDIO_URL" in health["jobs"]["5"]["error"]
    assert health["model_version"] == before and health["trained"]
