"""End to end against a real Label Studio 1.23.2: pre-annotate, learn from annotators, rank.

Label Studio runs from its own venv (.lsvenv, made by `make test`) on loopback with SQLite;
the backend runs as `camlabel serve` (gunicorn + training worker) in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from backend.rle import mask_to_rle, rle_to_mask
from wsl_models.synthetic import blob_image
from wsl_models.versions import ModelStore

from .ls_harness import LabelStudio, free_port
from .progress import children, wait_http, wait_while_progressing

ROOT = Path(__file__).resolve().parents[1]
# finding_normal.xml plus keypoints (clicks as training data)
CONFIG = (ROOT / "label_config" / "clicks.xml").read_text()

pytestmark = pytest.mark.skipif(
    os.environ.get("CAMLABEL_SKIP_E2E") == "1", reason="CAMLABEL_SKIP_E2E=1"
)


@pytest.fixture(scope="module")
def backend(label_studio, base_model, tmp_path_factory):
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(tmp_path_factory.mktemp("models")),
        "BASE_MODEL": str(base_model),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.pat,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WORKERS": "2",
        "TRAIN_MEMBERS": "tiny,tiny",
        "TRAIN_IMAGE_SIZE": "96",
        "TRAIN_EPOCHS": "30",
        "TRAIN_LR": "0.003",
        "TRAIN_WEIGHTS": "none",
        # Every new version wins here; refusing a worse one is tested in-process below.
        "PROMOTE_TOLERANCE": "100",
        # Deployed as recommended: basic auth on every route, a shared secret on webhooks.
        "BASIC_AUTH_USER": "ls-backend",
        "BASIC_AUTH_PASS": "e2e-basic-pass",
        "WEBHOOK_SECRET": "e2e-webhook-secret",
    }
    log = (Path(env["MODEL_DIR"]) / "backend.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    plain = f"http://127.0.0.1:{port}"
    url = f"http://ls-backend:e2e-basic-pass@127.0.0.1:{port}"  # requests sends it as basic auth
    wait_http(f"{url}/health", proc)
    assert requests.get(f"{plain}/health", timeout=5).status_code == 401
    yield SimpleNamespace(url=url, plain_url=plain, model_dir=env["MODEL_DIR"], pid=proc.pid,
                          env=env, base=ModelStore(base_model).current_id())  # fmt: skip
    proc.terminate()
    proc.wait(timeout=30)


def _connect(ls, server, pid: int, *extra: str) -> subprocess.CompletedProcess:
    """`camlabel connect` for the project, as a deployment runs it."""
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", "connect", "--project", str(pid),
         "--backend-url", server.plain_url, *extra],
        env={**server.env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _wait_while_progressing(server: SimpleNamespace, check, what: str, poll: float):
    """Wait on ``check`` while the backend (the gunicorn master and all below it) works."""
    return wait_while_progressing(check, server.pid, what, poll=poll)


def _wait_for_training(server: SimpleNamespace, project: int, previous: str | None) -> str:
    """The new version once the project's job is done and nothing is queued."""
    failures = 0

    def check():
        nonlocal failures
        health = requests.get(f"{server.url}/health", timeout=5).json()
        job = health["jobs"].get(str(project), {})
        failures = (
            failures + 1 if job.get("state") == "failed" and not health["queue_pending"] else 0
        )
        if failures >= 3:  # the last job failed and nothing else is queued
            raise AssertionError(f"training failed: {job}")
        if (
            job.get("state") == "done"
            and health["queue_pending"] == 0
            and job.get("version") not in (None, previous)
        ):
            return job["version"], None
        return None, (job.get("state"), job.get("attempt"), health["queue_pending"])

    return _wait_while_progressing(server, check, "training", poll=2.0)


def _settled_version(server: SimpleNamespace, project: int) -> str:
    """The version once training is idle and stays idle (webhook bursts may queue a 2nd job)."""
    version = _wait_for_training(server, project, None)
    while True:
        time.sleep(5)
        again = _wait_for_training(server, project, None)
        if again == version:
            return version
        version = again


def test_pre_annotate_learn_and_rank(label_studio, backend, tmp_path):
    ls, server = label_studio, backend
    backend = server.url
    rng = np.random.default_rng(3)
    images, truths = {}, {}
    for i in range(20):
        label = "finding" if i % 2 == 0 else "normal"
        img, mask = blob_image(rng, (96, 96), 1 if label == "finding" else 0)
        name = f"img_{i:02d}_{label}.png"
        Image.fromarray(img).save(tmp_path / name)
        images[name], truths[name] = label, mask

    project = ls.api(
        "POST", "/api/projects", json={"title": "camlabel e2e", "label_config": CONFIG}
    )
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    files = {n: (n, (tmp_path / n).open("rb"), "image/png") for n in images}
    r = ls.api("POST", f"/api/projects/{pid}/import", files=files)
    assert r.status_code == 201, r.text
    tasks = ls.api("GET", "/api/tasks", params={"project": pid, "page_size": 100}).json()["tasks"]
    assert len(tasks) == 20
    by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}  # uploads are prefixed
    assert set(by_name) == set(images)
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)  # relative URLs

    # `camlabel connect`: the ML backend with basic auth, the secret on its webhook.
    connect = _connect(ls, server, pid)
    assert connect.returncode == 0, connect.stderr[-2000:]
    (ml,) = ls.api("GET", "/api/ml", params={"project": pid}).json()
    ml_id = ml["id"]
    assert ml["auth_method"] == "BASIC_AUTH" and ml["state"] == "CO"  # connected, with auth
    (hook,) = ls.api("GET", "/api/webhooks", params={"project": pid}).json()
    assert hook["headers"] == {"X-Camlabel-Webhook-Secret": "e2e-webhook-secret"}
    assert "e2e-webhook-secret" not in connect.stdout + connect.stderr

    # Before its first training the project is served by the base model.
    config = ls.api("GET", f"/api/projects/{pid}").json()["label_config"]
    body = {"tasks": [tasks[0]], "label_config": config, "project": f"{pid}.1700000000"}
    served = requests.post(f"{backend}/predict", json=body, timeout=60).json()
    assert served["model_version"] == server.base and served["results"][0]["result"]

    # Annotators give image-level labels to 14 images; 6 stay unlabelled.
    names = sorted(images)
    labelled, unlabelled = names[:14], names[14:]
    for n in labelled:
        choice = {
            "from_name": "diagnosis", "to_name": "image", "type": "choices",
            "value": {"choices": [images[n]]},
        }  # fmt: skip
        r = ls.api("POST", f"/api/tasks/{by_name[n]['id']}/annotations", json={"result": [choice]})
        assert r.status_code == 201, r.text
    assert ls.api("POST", f"/api/ml/{ml_id}/train").status_code in (200, 201)
    v1 = _settled_version(server, pid)
    assert ls.api("GET", f"/api/projects/{pid}").json()["model_version"] == v1
    # The line's first version (the webhook burst may have made several) started from the
    # base model, whose pseudo-masks also taught it on the unannotated tasks.
    line = ModelStore(Path(server.model_dir) / "projects" / str(pid)).version_ids()
    assert v1 in line and server.base not in line
    first = requests.get(f"{backend}/versions/{line[0]}", timeout=5).json()["metrics"]
    assert first["fine_tuned_from"] == server.base and first["source"]["unlabelled"] > 0
    # No held-out task has a mask: the weak decoder's threshold comes from its seeds' mass
    # (the plug-in Dice rule where the probe gate found large objects).
    weak, gate = first["decoder_threshold"], first["decoders"].get("probe_gate") or {}
    assert weak["rule"] == ("plug_in" if gate.get("open") else "seed_area")
    assert "calibration" not in first
    assert weak["target_area"] == first["decoders"]["seed_area"]["mass"]
    # The tiny members train from scratch (no feature bank): fine-tuning them keeps the full
    # schedule, TRAIN_EPOCHS=30 and the decoder's 60 epochs (the short one is for pretrained
    # members, tests/test_fast_training.py).
    assert (first["train_config"]["epochs"], first["train_config"]["decoder_epochs"]) == (30, 60)

    # The job stored predictions of v1 for every task. A task imported now has none: Label
    # Studio's "Retrieve predictions" sends it to /predict (tasks with a v1 prediction are skipped).
    img, _ = blob_image(rng, (96, 96), 1)
    Image.fromarray(img).save(tmp_path / "late.png")
    r = ls.api(
        "POST",
        f"/api/projects/{pid}/import",
        files={"late.png": (tmp_path / "late.png").open("rb")},
    )
    assert r.status_code == 201, r.text
    r = ls.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": pid},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert r.status_code == 200, r.text
    preds = ls.api("GET", "/api/predictions", params={"project": pid}).json()
    preds = [p for p in preds if p["model_version"] == v1]
    assert len(preds) == 21 and len({p["task"] for p in preds}) == 21
    task_name = {t["id"]: n for n, t in by_name.items()}
    brushes = 0
    for p in preds:
        assert 0.0 <= p["score"] <= 1.0
        types = {r["type"]: r for r in p["result"]}
        assert types["choices"]["value"]["choices"][0] in ("finding", "normal")
        if "brushlabels" in types:
            b = types["brushlabels"]
            mask = rle_to_mask(b["value"]["rle"], b["original_height"], b["original_width"])
            assert mask.shape == (96, 96) and mask.any()
            brushes += 1
    assert brushes >= 3
    # Pre-annotation quality on the synthetic findings.
    ious = _finding_ious(preds, task_name, images, truths)
    print(f"pre-annotation IoU of v1 on {len(ious)} findings: {np.mean(list(ious.values())):.3f}")
    assert len(ious) == 10 and np.mean(list(ious.values())) >= 0.5

    # Annotators paint masks on two unlabelled findings and click on a third instead (5 on
    # the finding, 5 off it, no mask); one masked task also carries a background keypoint.
    findings = [n for n in unlabelled if images[n] == "finding"]
    masked, clicked = findings[:2], findings[2]
    for n in (*masked, clicked):
        finding = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
                   "value": {"choices": ["finding"]}}  # fmt: skip
        result = [finding, *(_mask_result(truths[n]) if n in masked else _clicks(truths[n]))]
        if n == masked[0]:
            result += _clicks(truths[n])[-1:]  # a background keypoint beside the mask
        r = ls.api("POST", f"/api/tasks/{by_name[n]['id']}/annotations", json={"result": result})
        assert r.status_code == 201, r.text
    assert ls.api("POST", f"/api/ml/{ml_id}/train").status_code in (200, 201)
    _wait_for_training(server, pid, v1)
    v2 = _settled_version(server, pid)
    assert v2 != v1
    assert ls.api("GET", f"/api/projects/{pid}").json()["model_version"] == v2
    assert set(requests.get(f"{backend}/versions", timeout=5).json()["versions"]) >= {v1, v2}
    manifest = requests.get(f"{backend}/versions/{v2}", timeout=5).json()
    source = manifest["metrics"]["source"]
    # 17 annotated tasks (two with a human mask) + 4 unannotated ones through pseudo-masks.
    assert (source["masks"], source["labelled"], source["unlabelled"]) == (2, 17, 4)
    assert source["clicked"] == 2  # the keypoints came back from Label Studio as clicks
    # The human masks and clicks trained the decoder as a segmenter, served at its own scale
    # (unless the hash hold-out put those tasks among the validation images).
    held = set(manifest["metrics"]["held_out"])
    trained = [n for n in (*masked, clicked) if f"task_{by_name[n]['id']}.png" not in held]
    segmentation = manifest["metrics"]["segmentation"]
    assert segmentation.get("masks", 0) == len(set(trained) & set(masked))
    assert segmentation.get("clicked", 0) == len(set(trained) - set(masked))
    if segmentation.get("clicked"):  # spread into the probe's mask, as the annotator saw it
        assert segmentation["clicks_as"] == "probed masks", segmentation
        kept = Path(server.model_dir) / "projects" / str(pid) / "click_masks"
        assert len(list(kept.glob("*.png"))) >= segmentation["clicked"]  # made once, kept
    assert manifest["config"]["decoder_scale"] == (2.0 if trained else 1.0)
    assert manifest["metrics"]["pseudo_masks"] > 0
    # A decoder trained on human masks keeps its probability threshold.
    assert "decoder_threshold" not in manifest["metrics"]
    # From v1, or from a version of an earlier job of the same webhook burst.
    versions = requests.get(f"{backend}/versions", timeout=5).json()["versions"]
    assert manifest["metrics"]["fine_tuned_from"] in set(versions) - {v2}
    assert manifest["metrics"]["promotion"]["accepted"] is True
    assert task_name  # every task name was resolved

    # The job stored v2's pre-annotations: on the findings nobody masked or clicked, they
    # are better than v1's.
    preds2 = ls.api("GET", "/api/predictions", params={"project": pid}).json()
    preds2 = [p for p in preds2 if p["model_version"] == v2]
    assert len({p["task"] for p in preds2}) == 21
    untouched = [n for n in labelled if images[n] == "finding"]
    before = np.mean([ious[n] for n in untouched])
    after = np.mean([_finding_ious(preds2, task_name, images, truths)[n] for n in untouched])
    print(
        f"IoU on {len(untouched)} findings without masks or clicks: v1 {before:.3f}, v2 {after:.3f}"
    )
    assert after > before + 0.03, (before, after)

    _rank_and_check(ls, server, pid, v2)
    _a_failed_ranking_keeps_the_previous_predictions(ls, server, pid, v2)
    _worse_version_is_kept_but_not_served(ls, server, pid, v2)
    _a_second_project_with_other_classes(ls, server, pid, v2, tmp_path)
    n = next(n for n in unlabelled if images[n] == "normal")  # still unannotated
    _kill_9_mid_training(ls, server, pid, v2, by_name[n]["id"], images[n])


def _finding_ious(preds: list[dict], task_name: dict, images: dict, truths: dict) -> dict:
    """{image name: IoU of its brush region with the known finding} for the finding tasks
    among ``preds`` (a finding predicted without a mask counts 0)."""
    ious = {}
    for p in preds:
        name = task_name.get(p["task"])
        if name is None or images[name] != "finding":
            continue
        b = {r["type"]: r for r in p["result"]}.get("brushlabels")
        mask = rle_to_mask(b["value"]["rle"], 96, 96) if b else np.zeros((96, 96), bool)
        truth = truths[name]
        ious[name] = (mask & truth).sum() / max((mask | truth).sum(), 1)
    return ious


def _mask_result(truth: np.ndarray) -> list[dict]:
    """A brush mask as Label Studio stores it."""
    return [{"from_name": "mask", "to_name": "image", "type": "brushlabels",
             "original_width": 96, "original_height": 96, "image_rotation": 0,
             "value": {"format": "rle", "rle": mask_to_rle(truth), "brushlabels": ["finding"]}}]  # fmt: skip


def _clicks(truth: np.ndarray) -> list[dict]:
    """5 keypoints on the finding and 5 off it, where an annotator would put them (the
    innermost free pixels), in Label Studio's percent coordinates; the negatives last."""
    from wsl_models.clicks import simulated_clicks

    return [
        {"from_name": "point", "to_name": "image", "type": "keypointlabels",
         "original_width": 96, "original_height": 96,
         "value": {"x": 100 * (x + 0.5) / 96, "y": 100 * (y + 0.5) / 96, "width": 1.0,
                   "keypointlabels": ["finding" if positive else "background"]}}
        for x, y, positive in simulated_clicks(np.zeros_like(truth), truth, 5, radius=2)
    ]  # fmt: skip


def _settings(ls: LabelStudio, server: SimpleNamespace):
    from backend.settings import Settings

    return Settings(
        model_dir=server.model_dir, label_studio_url=ls.url, label_studio_api_key=ls.pat
    )


def _own_values(ls, server, pid: int, tasks: list[dict], name: str) -> dict[int, float]:
    """The backend's own acquisition values, computed here in-process."""
    from backend.fetch import ImageFetcher
    from backend.holder import ModelHolder
    from backend.inference import InferenceEngine
    from backend.model import CamLabelModel

    settings = _settings(ls, server)
    config = ls.api("GET", f"/api/projects/{pid}").json()["label_config"]
    served = ModelHolder(settings).load_now(pid)
    model = CamLabelModel(served, InferenceEngine(), ImageFetcher(settings), settings, config)
    model.acquisition = name
    preds = model.predict(tasks)
    return {t["id"]: p["acquisition"]["value"] for t, p in zip(tasks, preds, strict=True)}


def _rank_and_check(ls: LabelStudio, server: SimpleNamespace, pid: int, version: str) -> None:
    env = {
        **os.environ,
        "MODEL_DIR": server.model_dir,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.pat,
    }
    run = subprocess.run(
        # 21 tasks = 3 pages of 7: Label Studio answers a 4th page with 404 (must end the loop)
        [sys.executable, "-m", "backend.cli", "rank", "--project", str(pid), "--acquisition",
         "bald", "--page-size", "7"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "21 of 21 tasks ranked by bald" in run.stdout
    project = ls.api("GET", f"/api/projects/{pid}").json()
    assert project["model_version"] == version and project["sampling"] == "Uncertainty sampling"
    preds = [
        p
        for p in ls.api("GET", "/api/predictions", params={"project": pid}).json()
        if p["model_version"] == version
    ]
    # Re-ranking replaced the version's predictions: one per task, not two.
    assert len(preds) == 21 and len({p["task"] for p in preds}) == 21
    tasks = ls.api("GET", "/api/tasks", params={"project": pid, "page_size": 100}).json()["tasks"]
    open_tasks = [t for t in tasks if not t["total_annotations"]]
    values = _own_values(ls, server, pid, open_tasks, "bald")
    stored = {p["task"]: p["score"] for p in preds}
    for tid, v in values.items():
        assert stored[tid] == pytest.approx(1 - v, abs=1e-5)
    ranked = sorted(values, key=lambda t: -values[t])
    nxt = ls.api("GET", f"/api/projects/{pid}/next")
    assert nxt.status_code == 200, nxt.text
    assert nxt.json()["id"] == ranked[0]
    view = next(
        v
        for v in ls.api("GET", "/api/dm/views", params={"project": pid}).json()
        if v["data"]["title"] == "camlabel: most uncertain first"
    )
    listed = ls.api(
        "GET", "/api/tasks", params={"project": pid, "view": view["id"], "page_size": 100}
    ).json()["tasks"]
    assert [t["id"] for t in listed] == ranked  # unlabelled only, most uncertain first

    # Batch diversity: the first query batch is re-ordered, and Label Studio follows it.
    from backend.ranking import rank_project

    report = rank_project(_settings(ls, server), pid, "bald", diversity=3, progress=False)
    assert len(report.diverse_batch) == 3 and set(report.diverse_batch) <= set(values)
    # (/next now returns the task it locked for this user above, so the tab is the check.)
    listed = ls.api(
        "GET", "/api/tasks", params={"project": pid, "view": report.view_id, "page_size": 100}
    ).json()["tasks"]
    assert report.view_id == view["id"]  # the same tab, updated
    assert [t["id"] for t in listed][:3] == report.diverse_batch


def _worse_version_is_kept_but_not_served(ls, server, pid: int, current: str) -> None:
    """A new version that loses on the hold-out is stored with the reason, never served."""
    from backend.jobs import TrainingSettings, first_served, train_from_project
    from backend.lines import ModelLines
    from wsl_models.versions import ModelStore

    strict = TrainingSettings(
        members="tiny,tiny", image_size="96", epochs=1, weights="none", lr=0.003,
        tolerance=-100.0, tolerance_images=0,  # 100 points better, no image's slack: impossible
    )  # fmt: skip
    version, promoted, _ = train_from_project(_settings(ls, server), pid, strict)
    store = ModelStore(Path(server.model_dir) / "projects" / str(pid))  # the project's line
    assert not promoted and store.current_id() == current
    assert version in store.version_ids()
    promotion = store.manifest(version)["metrics"]["promotion"]
    assert promotion["accepted"] is False and "worse than the current" in promotion["reason"]
    assert promotion["compared_with"] == current
    # The line's first served version is the gate's second reference when it is not the current.
    first = first_served(ModelLines(server.model_dir), pid)
    assert first is not None and first in store.version_ids()
    expected = None if first == current else first
    assert (promotion["first"] or {}).get("version") == expected, promotion
    assert ls.api("GET", f"/api/projects/{pid}").json()["model_version"] == current


def _predictions(ls: LabelStudio, pid: int) -> dict[int, tuple[int, float, str]]:
    """{prediction id: (task, score, version)} of the project."""
    preds = ls.api("GET", "/api/predictions", params={"project": pid}).json()
    return {p["id"]: (p["task"], p["score"], p["model_version"]) for p in preds}


def _a_failed_ranking_keeps_the_previous_predictions(ls, server, pid: int, version: str) -> None:
    """Label Studio refuses the second page of a re-ranking: what was imported is removed,
    the previous predictions, scores and project version stay."""
    from backend.ls_api import LabelStudioAPI, TrainingError
    from backend.ranking import RankingError, rank_project

    class RefusesThe2ndImport(LabelStudioAPI):
        imports = 0

        def import_predictions(self, project_id, predictions):
            self.imports += 1
            if self.imports == 2:
                raise TrainingError("Label Studio POST import/predictions: HTTP 500 (injected)")
            super().import_predictions(project_id, predictions)

    settings = _settings(ls, server)
    before = _predictions(ls, pid)
    api = RefusesThe2ndImport(settings)
    with pytest.raises(RankingError, match="previous predictions and order are kept"):
        rank_project(settings, pid, "entropy", page_size=7, progress=False, api=api)
    assert api.imports == 2  # the first page was imported, then removed
    assert _predictions(ls, pid) == before
    assert ls.api("GET", f"/api/projects/{pid}").json()["model_version"] == version


B_CONFIG = CONFIG.replace('"finding"', '"malignant"').replace('"normal"', '"benign"')


def _a_second_project_with_other_classes(ls, server, pid_a: int, v_a: str, tmp_path) -> None:
    """Project B (malignant / benign) on the same backend: its annotations arrive in bulk
    (ANNOTATIONS_CREATED), it trains its own line, and project A does not notice.

    Label Studio 1.23 sends ANNOTATIONS_CREATED from one place: the Data Manager action that
    turns predictions into annotations (an import of tasks with annotations sends nothing).
    So B's labels come in as imported predictions of an earlier tool and are accepted in bulk."""
    import base64

    before_a = _predictions(ls, pid_a)
    view_a = next(v for v in ls.api("GET", "/api/dm/views", params={"project": pid_a}).json()
                  if v["data"]["title"] == "camlabel: most uncertain first")  # fmt: skip
    tab_a = ls.api("GET", "/api/tasks", params={"project": pid_a, "view": view_a["id"]}).json()
    r = ls.api("POST", "/api/projects", json={"title": "camlabel e2e B", "label_config": B_CONFIG})
    assert r.status_code == 201, r.text
    pid_b = r.json()["id"]
    connect = _connect(ls, server, pid_b)
    assert connect.returncode == 0, connect.stderr[-2000:]
    rng = np.random.default_rng(11)
    tasks = []
    for i in range(16):
        label = "malignant" if i % 2 == 0 else "benign"
        img, _ = blob_image(rng, (96, 96), 1 if label == "malignant" else 0)
        Image.fromarray(img).save(tmp_path / "b.png")
        uri = (
            "data:image/png;base64," + base64.b64encode((tmp_path / "b.png").read_bytes()).decode()
        )
        choice = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
                  "value": {"choices": [label]}}  # fmt: skip
        prior = [{"model_version": "earlier-tool", "result": [choice]}] if i < 12 else []
        tasks.append({"data": {"image": uri}, "predictions": prior})  # 4 stay unlabelled
    r = ls.api("POST", f"/api/projects/{pid_b}/import", json=tasks)
    assert r.status_code == 201, r.text
    r = ls.api(
        "POST",
        "/api/dm/actions",
        params={"id": "predictions_to_annotations", "project": pid_b},
        json={"selectedItems": {"all": True, "excluded": []}, "model_version": "earlier-tool"},
    )  # 12 annotations at once: one ANNOTATIONS_CREATED webhook
    assert r.status_code == 200, r.text
    v_b = _settled_version(server, pid_b)  # trained by the ANNOTATIONS_CREATED webhook
    job_b = requests.get(f"{server.url}/health", timeout=5).json()["jobs"][str(pid_b)]
    assert job_b["promoted"] is True and job_b["ranking"] == "done", job_b
    manifest = requests.get(f"{server.url}/versions/{v_b}", timeout=5).json()
    assert manifest["config"]["classes"] == ["benign", "malignant"]
    assert manifest["metrics"]["source"]["project"] == pid_b
    assert manifest["metrics"]["fine_tuned_from"] is None  # A's model is not B's teacher

    # A: same version, same predictions, same order, still served from its own line.
    assert ls.api("GET", f"/api/projects/{pid_a}").json()["model_version"] == v_a
    assert _predictions(ls, pid_a) == before_a
    again = ls.api("GET", "/api/tasks", params={"project": pid_a, "view": view_a["id"]}).json()
    assert [t["id"] for t in again["tasks"]] == [t["id"] for t in tab_a["tasks"]]
    task_a = ls.api("GET", "/api/tasks", params={"project": pid_a}).json()["tasks"][0]
    config_a = ls.api("GET", f"/api/projects/{pid_a}").json()["label_config"]
    body = {"tasks": [task_a], "label_config": config_a, "project": f"{pid_a}.1700000000"}
    r = requests.post(f"{server.url}/predict", json=body, timeout=60).json()
    assert r["model_version"] == v_a
    choices = [x for x in r["results"][0]["result"] if x["type"] == "choices"]
    assert choices[0]["value"]["choices"][0] in ("finding", "normal")
    versions_a = requests.get(f"{server.url}/versions", params={"project": pid_a}, timeout=5)
    assert v_a in versions_a.json()["versions"] and v_b not in versions_a.json()["versions"]

    # B: its own version, its own labels, and Label Studio serves B by B's scores.
    assert ls.api("GET", f"/api/projects/{pid_b}").json()["model_version"] == v_b
    preds_b = [p for p in _predictions(ls, pid_b).values() if p[2] == v_b]
    assert len(preds_b) == 16 and len({t for t, _, _ in preds_b}) == 16
    stored = ls.api("GET", "/api/predictions", params={"project": pid_b}).json()
    labels = {
        r["value"]["choices"][0] for p in stored for r in p["result"] if r["type"] == "choices"
    }
    assert labels <= {"malignant", "benign"} and labels
    open_b = {t["id"] for t in ls.api("GET", "/api/tasks", params={"project": pid_b}).json()["tasks"]
              if not t["total_annotations"]}  # fmt: skip
    assert len(open_b) == 4
    lowest = min((score, task) for task, score, _ in preds_b if task in open_b)[1]
    nxt = ls.api("GET", f"/api/projects/{pid_b}/next")
    assert nxt.status_code == 200 and nxt.json()["id"] == lowest


def _kill_9_mid_training(ls, server, pid: int, current: str, task_id: int, label: str) -> None:
    """kill -9 the trainer mid-job and a web worker: serving goes on with the current version,
    the master restarts the trainer, the job is retried and trains on every annotation,
    including the one whose webhook started the killed job."""
    import signal

    choice = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
              "value": {"choices": [label]}}  # fmt: skip
    r = ls.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": [choice]})
    assert r.status_code == 201, r.text  # its webhook queues a job

    def running():
        job = requests.get(f"{server.url}/health", timeout=5).json()["jobs"].get(str(pid), {})
        started = job.get("state") == "running" and job.get("attempt") == 1
        return (job if started else None), (job.get("state"), job.get("attempt"))

    job = _wait_while_progressing(server, running, "the job to start", poll=0.1)
    trainer = job["worker_pid"]
    web_workers = [p for p in children(server.pid) if p != trainer]
    assert trainer in children(server.pid) and len(web_workers) == 2
    os.kill(trainer, signal.SIGKILL)
    os.kill(web_workers[0], signal.SIGKILL)

    config = ls.api("GET", f"/api/projects/{pid}").json()["label_config"]
    task = ls.api("GET", f"/api/tasks/{task_id}").json()
    for _ in range(6):  # both workers' turns, one of them freshly forked
        body = {"tasks": [task], "label_config": config, "project": f"{pid}.1700000000"}
        r = requests.post(f"{server.url}/predict", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == current
        assert r.json()["results"][0]["result"]

    version = _settled_version(server, pid)
    job = requests.get(f"{server.url}/health", timeout=5).json()["jobs"][str(pid)]
    assert job["attempt"] == 2 and job["worker_pid"] != trainer, job
    source = requests.get(f"{server.url}/versions/{version}", timeout=5).json()["metrics"]["source"]
    assert version != current and source["labelled"] == 18  # the new annotation is in
    assert trainer not in children(server.pid)


def test_smart_tools_re_segment_through_label_studio(label_studio, backend, tmp_path):
    """Interactive mode on: Label Studio's interactive-annotating endpoint, with a rectangle and
    with a keypoint as the labeling UI sends them, answers one brush region at the image's
    displayed size, inside the rectangle, with the prompted label; nothing is stored."""
    from wsl_models.synthetic import disk_image

    ls, server = label_studio, backend
    config = (ROOT / "label_config" / "interactive.xml").read_text()
    r = ls.api("POST", "/api/projects", json={"title": "camlabel smart", "label_config": config})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    img, disk = disk_image(np.random.default_rng(8), (96, 128), 1)  # 128 wide, 96 high
    Image.fromarray(img).save(tmp_path / "smart.png")
    r = ls.api("POST", f"/api/projects/{pid}/import",
               files={"smart.png": (tmp_path / "smart.png").open("rb")})  # fmt: skip
    assert r.status_code == 201, r.text
    connect = _connect(ls, server, pid, "--interactive")
    assert connect.returncode == 0 and "(interactive)" in connect.stdout, connect.stderr[-2000:]
    (ml,) = ls.api("GET", "/api/ml", params={"project": pid}).json()
    assert ml["is_interactive"] is True
    (task,) = ls.api("GET", "/api/tasks", params={"project": pid}).json()["tasks"]
    ys, xs = np.nonzero(disk)
    x0, y0, x1, y1 = xs.min() - 6, ys.min() - 6, xs.max() + 7, ys.max() + 7
    common = {"original_width": 128, "original_height": 96, "image_rotation": 0,
              "to_name": "image", "origin": "manual"}  # fmt: skip
    rect = {**common, "id": "r1", "from_name": "box", "type": "rectanglelabels",
            "value": {"x": 100 * x0 / 128, "y": 100 * y0 / 96, "width": 100 * (x1 - x0) / 128,
                      "height": 100 * (y1 - y0) / 96, "rotation": 0,
                      "rectanglelabels": ["finding"]}}  # fmt: skip
    cx, cy = float(xs.mean()), float(ys.mean())
    point = {**common, "id": "k1", "from_name": "point", "type": "keypointlabels",
             "is_positive": True,
             "value": {"x": 100 * cx / 128, "y": 100 * cy / 96, "width": 0.6,
                       "keypointlabels": ["finding"]}}  # fmt: skip
    before = len(ls.api("GET", "/api/predictions", params={"project": pid}).json())
    for prompt in (rect, point):
        r = ls.api("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                   json={"task": task["id"], "context": {"result": [prompt]}})  # fmt: skip
        assert r.status_code == 200 and "errors" not in r.json(), r.text
        answer = r.json()["data"]
        assert answer["model_version"] == server.base  # the base model serves this project
        # The rectangle needs no map (GrabCut in the box): no forward, no score. The keypoint
        # on a task with no mask starts from the pre-annotation: its confidence comes along.
        assert ("score" in answer) == (prompt is point)
        (region,) = answer["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["finding"]
        assert (region["original_width"], region["original_height"]) == (128, 96)
        mask = rle_to_mask(region["value"]["rle"], 96, 128)
        assert mask.any()
        iou = (mask & disk).sum() / (mask | disk).sum()
        print(f"{prompt['type']}: IoU {iou:.2f} with the disk")
        if prompt is rect:
            inside = np.zeros_like(mask)
            inside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
            assert not (mask & ~inside).any()
            assert iou >= 0.5
        else:
            assert mask[int(cy), int(cx)]
    assert len(ls.api("GET", "/api/predictions", params={"project": pid}).json()) == before


def test_explanation_layers_through_label_studio(label_studio, backend, tmp_path):
    """A project with label_config/explain.xml: Label Studio's predictions hold each agreeing
    member's layers at the image's displayed size; an annotation submitted with them as they
    came (the annotator accepted the pre-annotation) is collected for training exactly as one
    without them."""
    from backend.annotations import collect_dataset
    from backend.fetch import ImageFetcher
    from backend.ls_api import LabelStudioAPI
    from backend.settings import Settings

    ls, server = label_studio, backend
    config = (ROOT / "label_config" / "explain.xml").read_text()
    r = ls.api("POST", "/api/projects", json={"title": "camlabel explain", "label_config": config})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    rng = np.random.default_rng(11)
    for name in ("a", "b"):  # the same finding twice: one task per way of submitting it
        Image.fromarray(blob_image(np.random.default_rng(12), (96, 128), 1)[0]).save(
            tmp_path / f"{name}.png"
        )
    Image.fromarray(blob_image(rng, (96, 128), 0)[0]).save(tmp_path / "normal.png")
    for name in ("a.png", "b.png", "normal.png"):
        r = ls.api("POST", f"/api/projects/{pid}/import",
                   files={name: (tmp_path / name).open("rb")})  # fmt: skip
        assert r.status_code == 201, r.text
    assert _connect(ls, server, pid).returncode == 0
    r = ls.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
               json={"selectedItems": {"all": True, "excluded": []}})  # fmt: skip
    assert r.status_code == 200, r.text
    preds = ls.api("GET", "/api/predictions", params={"project": pid}).json()
    assert len(preds) == 3
    layered = 0
    for p in preds:
        layers = [x for x in p["result"] if x["from_name"] == "explanation"]
        note = next(
            (x["meta"]["text"][0] for x in p["result"] if x["from_name"] != "explanation"), ""
        )
        masked = any(x["from_name"] == "mask" for x in p["result"])
        if not layers:
            assert not masked  # no mask, nothing to explain (a normal image)
            continue
        layered += 1
        agreeing = int(note.split(" models agree")[0].rsplit(" ", 1)[1].split("/")[0])
        labels = {x["value"]["brushlabels"][0] for x in layers}
        members = labels - {"consensus"}
        assert len(members) == agreeing and members <= {"model 1", "model 2"}
        assert "consensus" in labels
        for x in layers:
            assert (x["original_width"], x["original_height"]) == (128, 96)
            assert rle_to_mask(x["value"]["rle"], 96, 128).any()
    assert layered >= 1
    tasks = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in
             ls.api("GET", "/api/tasks", params={"project": pid}).json()["tasks"]}  # fmt: skip
    pred_a = next(p for p in preds if p["task"] == tasks["a.png"]["id"])
    assert any(x["from_name"] == "explanation" for x in pred_a["result"])
    choice = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
              "value": {"choices": ["finding"]}}  # fmt: skip
    mask = next(x for x in pred_a["result"] if x["from_name"] == "mask")
    layers = [x for x in pred_a["result"] if x["from_name"] == "explanation"]
    submitted = {"a.png": [choice, mask, *layers], "b.png": [choice, mask]}
    for name, result in submitted.items():
        kept = [{k: v for k, v in x.items() if k not in ("id", "score", "meta")} for x in result]
        r = ls.api("POST", f"/api/tasks/{tasks[name]['id']}/annotations", json={"result": kept})
        assert r.status_code == 201, r.text
    settings = Settings(label_studio_url=ls.url, label_studio_api_key=ls.pat)
    annotated = LabelStudioAPI(settings).annotated_tasks(pid)
    back = {t["id"]: t for t in annotated}
    stored = back[tasks["a.png"]["id"]]["annotations"][0]["result"]
    assert sum(x["from_name"] == "explanation" for x in stored) == len(layers)  # kept by LS
    counts = collect_dataset(annotated, config, ImageFetcher(settings), tmp_path / "data")
    assert (counts["used"], counts["labelled"], counts["masks"]) == (2, 2, 2)
    ids = {name: tasks[name]["id"] for name in submitted}
    rows = (tmp_path / "data" / "labels.csv").read_text().splitlines()
    assert sorted(rows[1:]) == sorted(f"task_{i}.png,finding,train" for i in ids.values())
    a, b = (np.asarray(Image.open(tmp_path / "data" / "masks" / f"task_{ids[n]}.png"))
            for n in ("a.png", "b.png"))  # fmt: skip
    assert np.array_equal(a, b) and a.any()
