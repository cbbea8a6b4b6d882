"""How a worker serves: one inference thread batching across requests, results that do not
depend on timing or neighbours, a model line per project, per-task fetch deadlines."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from werkzeug.serving import make_server

from backend.app import create_app
from backend.inference import InferenceEngine
from backend.settings import Settings
from wsl_models.ensemble import Ensemble, EnsembleConfig
from wsl_models.members import build_member
from wsl_models.synthetic import blob_image
from wsl_models.versions import ModelStore

from .images import png_data_uri

CONFIG = (Path(__file__).parents[1] / "label_config" / "finding_normal.xml").read_text()
SYNTH_CONFIG = CONFIG.replace("finding", "lesion")


def _tasks(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, _ = blob_image(rng, (80 + 8 * (i % 3), 96), i % 2)
        out.append({"id": 100 + i, "data": {"image": png_data_uri(img)}})
    return out


def _comparable(pred: dict) -> dict:
    """Everything of a prediction but the random region ids."""
    regions = [{k: v for k, v in r.items() if k != "id"} for r in pred["result"]]
    return {**pred, "result": regions}


class _Server:
    """The Flask app behind a real threaded HTTP server on loopback (as gunicorn threads)."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.httpd = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def predict(self, tasks: list[dict], project: str = "1.1") -> dict:
        body = {"tasks": tasks, "label_config": SYNTH_CONFIG, "project": project}
        r = requests.post(f"{self.url}/predict", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.httpd.shutdown()


def test_concurrent_clients_get_exactly_what_each_task_gets_alone(model_dir):
    """4 clients x 4 tasks, 3 rounds, while another thread uses the global RNG: every score,
    uncertainty and mask equals the task predicted alone, bit for bit."""
    server = _Server(Settings(model_dir=str(model_dir), predict_batch=8))
    try:
        tasks = _tasks(16)
        alone = {t["id"]: _comparable(server.predict([t])["results"][0]) for t in tasks}
        assert len({p["score"] for p in alone.values()}) > 8  # the scores really differ
        stop = threading.Event()

        def global_rng_user() -> None:  # e.g. a library seeding torch on another thread
            while not stop.is_set():
                torch.manual_seed(int(time.time_ns() % 1000))
                torch.rand(64)

        noise = threading.Thread(target=global_rng_user, daemon=True)
        noise.start()
        engine = server.app.config["camlabel"]["engine"]
        before = engine.batches
        try:
            for round_ in range(3):
                clients = [tasks[k::4] for k in range(4)]  # each client sends its 4, one by one

                def run(own: list[dict]) -> list[tuple[int, dict]]:
                    return [(t["id"], server.predict([t])["results"][0]) for t in own]

                with ThreadPoolExecutor(4) as pool:
                    got = [p for ps in pool.map(run, clients) for p in ps]
                assert len(got) == 16
                for tid, pred in got:
                    assert _comparable(pred) == alone[tid], f"round {round_}, task {tid}"
                # A request of several tasks (one forward) agrees too.
                many = server.predict(tasks[:6])["results"]
                assert [_comparable(p) for p in many] == [alone[t["id"]] for t in tasks[:6]]
        finally:
            stop.set()
            noise.join()
        forwards = engine.batches - before
        print(f"{3 * 16 + 3 * 6} images in {forwards} forwards")
        assert forwards <= 3 * 16 + 3  # never more forwards than requests
    finally:
        server.close()


@pytest.mark.parametrize("exact", [True, False])
def test_the_engine_batches_whatever_is_waiting(exact):
    """While one batch runs, three requests arrive: they share the next batch (one forward per
    image when exact, else one forward)."""
    cfg = EnsembleConfig(classes=["a", "b"], members=["tiny"], image_size=(64, 64))
    ensemble = Ensemble([build_member("tiny", 2, decoder=True)], cfg)
    running, release = threading.Event(), threading.Event()
    real_predict = ensemble.predict
    sizes: list[int] = []

    def predict(x, seed=None, amp=None, samples=None):
        sizes.append(len(x))
        running.set()
        release.wait(30)
        return real_predict(x, seed=seed, amp=amp, samples=samples)

    ensemble.predict = predict
    engine = InferenceEngine(max_batch=8, exact=exact)
    images = torch.rand(7, 3, 64, 64)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(engine.predict, ensemble, images[:1])
            assert running.wait(30)
            later = [pool.submit(engine.predict, ensemble, images[i : i + 2]) for i in (1, 3, 5)]
            while len(engine._jobs) < 3:  # all three are waiting behind the running forward
                time.sleep(0.01)
            release.set()
            outs = [first.result(30)] + [f.result(30) for f in later]
    finally:
        engine.close()
    assert engine.batches == 2
    assert sizes == ([1] * 7 if exact else [1, 6])
    ensemble.predict = real_predict
    direct = real_predict(images, seed=0)
    got = [o for group in outs for o in group]
    assert len(got) == 7
    second = real_predict(images[1:], seed=0)  # the second batch, forwarded at once
    for i, out in enumerate(got):
        alone = real_predict(images[i : i + 1], seed=0)
        together = alone.probs if i == 0 else second.probs[i - 1 : i]
        assert torch.equal(out.probs, alone.probs if exact else together)
        assert torch.allclose(out.mc_probs[:, :, 0], direct.mc_probs[:, :, i], atol=1e-5)
        assert torch.allclose(out.cams[0][0], direct.cams[0][i], atol=1e-5)


def test_a_job_that_cannot_join_the_batch_does_not_stop_the_engine():
    """Waiting: a smart-tool job (no MC samples), a prediction (the version's samples) and
    another smart-tool job. The first and third share a batch; taking the third out of the
    queue past the second once compared their image tensors and killed the inference thread,
    so every later request of that worker waited forever (found by bench/fuzz_volume.py)."""
    cfg = EnsembleConfig(classes=["a", "b"], members=["tiny"], image_size=(64, 64), mc_samples=4)
    ensemble = Ensemble([build_member("tiny", 2, decoder=True)], cfg)
    running, release = threading.Event(), threading.Event()
    real_predict = ensemble.predict

    def predict(x, seed=None, amp=None, samples=None):
        running.set()
        release.wait(30)
        return real_predict(x, seed=seed, amp=amp, samples=samples)

    ensemble.predict = predict
    engine = InferenceEngine(max_batch=8)
    images = torch.rand(4, 3, 64, 64)
    outs: dict[int, list] = {}

    def ask(i: int, samples: int | None) -> threading.Thread:
        # daemon threads: a dead engine leaves them waiting, and the test must still end
        def run():
            outs[i] = engine.predict(ensemble, images[i : i + 1], samples)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    try:
        threads = [ask(0, None)]
        assert running.wait(30)
        for i, samples in ((1, 0), (2, None), (3, 0)):
            threads.append(ask(i, samples))
            while len(engine._jobs) < i:  # queued in this order behind the running forward
                time.sleep(0.01)
        release.set()
        for thread in threads:
            while thread.is_alive():  # wait while the engine lives, fail once it died
                assert engine._thread.is_alive(), "the inference thread died"
                thread.join(0.01)
    finally:
        release.set()
        engine.close()
    ensemble.predict = real_predict
    for i, (out,) in sorted(outs.items()):
        samples = (None, 0, None, 0)[i]
        alone = real_predict(images[i : i + 1], seed=0, samples=samples)
        assert torch.equal(out.probs, alone.probs)
        assert out.mc_probs.shape == alone.mc_probs.shape


def _saved(root: Path, classes: list[str], seed: int) -> str:
    torch.manual_seed(seed)
    cfg = EnsembleConfig(classes=classes, members=["tiny"], image_size=(64, 64))
    return ModelStore(root).save(
        Ensemble([build_member("tiny", len(classes), decoder=True)], cfg), {}
    )


def test_each_project_is_served_from_its_own_line(model_dir, tmp_path):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(model_dir, root)  # a MODEL_DIR from before per-project lines: the base
    base = ModelStore(root).current_id()
    own = _saved(root / "projects" / "7", ["benign", "malignant"], 1)
    app = create_app(Settings(model_dir=str(root)))
    client = app.test_client()
    tasks = _tasks(1)
    config7 = CONFIG.replace("finding", "benign").replace("normal", "malignant")

    def predict(project, config):
        body = {"tasks": tasks, "label_config": config, "project": project}
        return client.post("/predict", json=body).get_json()

    assert predict("7.1712", config7)["model_version"] == own
    assert predict("8.1712", SYNTH_CONFIG)["model_version"] == base  # no line: the base
    assert client.post("/setup", json={"schema": config7, "project": "7.1"}).get_json() == {
        "model_version": own
    }
    assert client.get("/versions?project=7").get_json()["versions"] == [base, own]
    assert client.get("/versions?project=8").get_json()["versions"] == [base]
    assert client.get(f"/versions/{own}").get_json()["config"]["classes"] == ["benign", "malignant"]
    health = client.get("/health").get_json()
    assert health["model_version"] == base and health["projects"] == {"7": own}

    # Project 8 gets its first version: project 7 does not notice; 8 switches once it is loaded
    # (meanwhile the base keeps answering it).
    first8 = _saved(root / "projects" / "8", ["lesion", "normal"], 2)
    assert predict("8.1712", SYNTH_CONFIG)["model_version"] in (base, first8)
    app.config["camlabel"]["holder"].settle()
    assert predict("8.1712", SYNTH_CONFIG)["model_version"] == first8
    assert predict("7.1712", config7)["model_version"] == own
    assert predict("9", SYNTH_CONFIG)["model_version"] == base


def test_a_worker_keeps_at_most_max_loaded_lines(model_dir, tmp_path):
    """MAX_LOADED_LINES=1: one project line in memory besides the base; the project asked for
    last stays, the other is dropped, and its next request is answered by its own version
    (loaded back, never the base's), while the watcher does not load dropped lines back."""
    import shutil

    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    own = {p: _saved(root / "projects" / str(p), ["lesion", "normal"], p) for p in (7, 8)}
    app = create_app(Settings(model_dir=str(root), max_loaded_lines=1))
    holder = app.config["camlabel"]["holder"]
    client = app.test_client()
    tasks = _tasks(1)

    def predict(pid: int) -> str:
        body = {"tasks": tasks, "label_config": SYNTH_CONFIG, "project": f"{pid}.1712"}
        return client.post("/predict", json=body).get_json()["model_version"]

    newest = max(own, key=own.get)
    assert holder.loaded() == sorted([str(newest), "base"])  # the start: the newest line
    for pid in (7, 8, 7, 7, 8):
        assert predict(pid) == own[pid]
        assert holder.loaded() == sorted([str(pid), "base"])
        holder.refresh()  # the watcher's check brings nothing back
        holder.settle()
        assert holder.loaded() == sorted([str(pid), "base"])
    with pytest.raises(ValueError, match="MAX_LOADED_LINES"):
        create_app(Settings(model_dir=str(root), max_loaded_lines=-1))


def test_images_past_the_deadline_get_their_own_error(model_dir):
    """One task's image host hangs: the others are answered, that one gets an error, and the
    request does not wait for the hung download."""
    import http.server

    release, answered = threading.Event(), threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            release.wait(300)  # hangs until the test has its answer (a safety bound only)
            answered.set()

        def log_message(self, *args):
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{slow.server_address[1]}"
    settings = Settings(model_dir=str(model_dir), allowed_image_hosts=host, fetch_deadline=1.0,
                        fetch_timeout=30.0)  # fmt: skip
    client = create_app(settings).test_client()
    tasks = _tasks(3)
    tasks.insert(1, {"id": 9, "data": {"image": f"http://{host}/hang.png"}})
    try:
        r = client.post("/predict", json={"tasks": tasks, "label_config": SYNTH_CONFIG})
        # The answer came while the host still hung: the request did not wait for it.
        hung_at_answer = not answered.is_set()
    finally:
        release.set()
        slow.shutdown()
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert "deadline" in results[1]["error"] and "task 9" in results[1]["error"]
    assert all("result" in results[i] for i in (0, 2, 3))
    assert hung_at_answer
