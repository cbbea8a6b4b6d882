"""The training queue under faults: dead workers, concurrent webhooks, half-written versions.

(The real kill -9 of a training worker mid-job, against Label Studio, is in
test_e2e_label_studio.py; these check the rules it relies on, quickly.)
"""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from backend.app import create_app
from backend.jobs import TrainingQueue
from backend.settings import Settings
from wsl_models.versions import ModelStore, VersionError


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_job_whose_worker_died_is_requeued_once_then_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_MAX_ATTEMPTS", "2")
    queue = TrainingQueue(Settings(model_dir=str(tmp_path)))
    queue.log.write(4, state="running", attempt=1, worker_pid=_dead_pid())
    queue.log.write(5, state="running", attempt=2, worker_pid=_dead_pid())
    queue.log.write(6, state="running", attempt=1, worker_pid=os.getpid())  # alive: untouched
    queue.log.write(7, state="done", version="v")
    assert queue.recover() == {"4": "requeued", "5": "failed"}
    jobs = queue.log.read()
    assert jobs["4"]["state"] == "queued" and jobs["4"]["attempt"] == 2
    assert queue.huey.pending_count() == 1  # the retry is really in the queue
    assert jobs["5"]["state"] == "failed" and "died during attempt 2 of 2" in jobs["5"]["error"]
    assert jobs["6"]["state"] == "running" and jobs["7"]["state"] == "done"
    assert queue.recover() == {}  # nothing left to recover


def test_a_requeue_after_a_newer_event_makes_no_second_job(tmp_path):
    queue = TrainingQueue(Settings(model_dir=str(tmp_path)))
    assert queue.enqueue({"id": 4}) == "queued"  # an annotation arrived after the crash
    queue.log.write(4, state="running", attempt=1, worker_pid=_dead_pid())
    assert queue.recover() == {"4": "requeued"}
    assert queue.huey.pending_count() == 1


def test_concurrent_webhooks_from_two_workers_queue_one_training(tmp_path):
    settings = Settings(model_dir=str(tmp_path))
    clients = [create_app(settings).test_client() for _ in range(2)]  # two gunicorn workers
    statuses: list[str] = []
    barrier = threading.Barrier(8)

    def send(k: int) -> None:
        barrier.wait()
        r = clients[k % 2].post("/webhook", json={"action": "ANNOTATION_CREATED",
                                                  "project": {"id": 9}})  # fmt: skip
        statuses.append(r.get_json()["status"])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == ["already-queued"] * 7 + ["queued"]
    assert TrainingQueue(settings).huey.pending_count() == 1


def test_half_written_versions_are_never_listed_or_loaded(tmp_path):
    store = ModelStore(tmp_path)
    partial = tmp_path / "versions" / ".tmp-20260101-000000-abcdef"
    partial.mkdir(parents=True)
    (partial / "0-tiny.pt").write_bytes(b"half a checkpoint")
    no_manifest = tmp_path / "versions" / "20260101-000001-abcdef"
    no_manifest.mkdir()
    (no_manifest / "0-tiny.pt").write_bytes(b"weights but no manifest")
    assert store.version_ids() == []
    with pytest.raises(VersionError, match="no complete version"):
        store.set_current("20260101-000001-abcdef")
    assert store.current_id() is None


def test_a_new_version_loads_in_the_background_while_the_old_one_serves(tmp_path, monkeypatch):
    """No request waits on a load: until the new version is in, the previous one answers."""
    import threading

    import torch

    from backend.holder import ModelHolder
    from wsl_models.ensemble import Ensemble, EnsembleConfig
    from wsl_models.members import build_member

    cfg = EnsembleConfig(classes=["a", "b"], members=["tiny"], image_size=(64, 64))
    store = ModelStore(tmp_path)
    first = store.save(Ensemble([build_member("tiny", 2, decoder=True)], cfg), {})
    holder = ModelHolder(Settings(model_dir=str(tmp_path)))
    holder.preload()
    assert holder.get()[1] == first
    torch.manual_seed(1)
    second = store.save(Ensemble([build_member("tiny", 2, decoder=True)], cfg), {})

    release, loaded = threading.Event(), threading.Event()
    real_load = ModelStore.load

    def slow_load(self, *args, **kwargs):
        release.wait(60)  # a large version on a slow disk
        try:
            return real_load(self, *args, **kwargs)
        finally:
            loaded.set()

    monkeypatch.setattr(ModelStore, "load", slow_load)
    for _ in range(3):
        assert holder.get()[1] == first  # answered while the load is blocked
    assert not loaded.is_set()
    release.set()
    holder.settle()
    assert holder.get()[1] == second
    assert holder.load_now(None)[1] == second  # what a ranking run pins


def test_a_replica_without_a_usable_queue_still_serves_predictions(tmp_path):
    import base64
    import io
    from pathlib import Path

    from PIL import Image

    from wsl_models.ensemble import Ensemble, EnsembleConfig
    from wsl_models.members import build_member

    cfg = EnsembleConfig(classes=["finding", "normal"], members=["tiny"], image_size=(64, 64))
    version = ModelStore(tmp_path).save(Ensemble([build_member("tiny", 2, decoder=True)], cfg), {})
    (tmp_path / "queue.db").mkdir()  # the queue file cannot be opened (as on a read-only mount)
    client = create_app(Settings(model_dir=str(tmp_path))).test_client()
    health = client.get("/health").get_json()
    assert health["model_version"] == version and "queue unavailable" in health["queue_error"]
    hook = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert hook.status_code == 503 and "queue unavailable" in hook.get_json()["error"]
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (120, 30, 90)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    config = (Path(__file__).parents[1] / "label_config" / "finding_normal.xml").read_text()
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": uri}}],
                                      "label_config": config})  # fmt: skip
    assert r.status_code == 200 and r.get_json()["model_version"] == version
    assert r.get_json()["results"][0]["result"]


def test_a_failure_between_the_pending_flag_and_the_job_leaves_neither(tmp_path, monkeypatch):
    """The flag and the job are one transaction: a crash between them (here: the job's write
    fails) must not leave a flag that answers every later webhook "already queued"."""
    import sqlite3

    settings = Settings(model_dir=str(tmp_path))
    client = create_app(settings).test_client()
    queue = client.application.config["camlabel"]["queue"]

    def disk_full(cursor, job):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(queue, "_write_job", disk_full)
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 3}}
    r = client.post("/webhook", json=hook)
    assert r.status_code == 503 and "disk is full" in r.get_json()["error"]
    assert queue.huey.pending_count() == 0
    assert queue.huey.get("pending-3", peek=True) is None  # no flag left behind
    monkeypatch.undo()
    for expected in ("queued", "already-queued"):
        r = client.post("/webhook", json=hook)
        assert r.status_code == 200 and r.get_json()["status"] == expected
    assert queue.huey.pending_count() == 1
    assert queue.huey.get("pending-3", peek=True) == "1"  # what the job pops when it starts
    # The consumer's side: the job starts (clears the flag) and fails without Label Studio.
    queue.huey.execute(queue.huey.dequeue())
    assert queue.huey.get("pending-3", peek=True) is None
    assert "LABEL_STUDIO_URL" in queue.log.get(3)["error"]


def test_bulk_imported_annotations_queue_training(tmp_path):
    client = create_app(Settings(model_dir=str(tmp_path))).test_client()
    hook = {"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 1}, {"id": 2}],
            "project": {"id": 12}}  # fmt: skip
    r = client.post("/webhook", json=hook)
    assert r.get_json() == {"status": "queued", "action": "ANNOTATIONS_CREATED", "project": 12}
    assert TrainingQueue(Settings(model_dir=str(tmp_path))).log.get(12)["state"] == "queued"


def test_job_state_is_kept_per_project_in_its_line(tmp_path):
    queue = TrainingQueue(Settings(model_dir=str(tmp_path)))
    queue.log.write(4, state="done", version="v4")
    queue.log.write(9, state="failed", error="boom")
    assert (tmp_path / "projects" / "4" / "job.json").is_file()
    assert queue.log.read() == {"4": queue.log.get(4), "9": queue.log.get(9)}
    assert queue.log.get(4)["version"] == "v4" and queue.log.get(9)["error"] == "boom"


def test_a_failed_ranking_is_reported_in_the_job_state(tmp_path, monkeypatch):
    """The version is promoted but its ranking failed: the job says the previous predictions
    are kept (what rank_project guarantees is checked against Label Studio in the e2e test)."""
    import backend.jobs as jobs

    def trained_but_not_ranked(settings, project_id, train):
        return "v2", True, "Label Studio POST /api/projects/5/import/predictions: HTTP 500"

    monkeypatch.setattr(jobs, "train_from_project", trained_but_not_ranked)
    queue = TrainingQueue(Settings(model_dir=str(tmp_path)), immediate=True)
    assert queue.enqueue({"id": 5}) == "queued"
    job = queue.log.get(5)
    assert job["state"] == "done" and job["version"] == "v2" and job["promoted"] is True
    assert job["ranking"].startswith("failed, the previous predictions are kept: ")
    assert "HTTP 500" in job["ranking"]


def test_the_first_served_version_skips_refused_ones_and_counts_old_ones_as_served(tmp_path):
    """The promotion gate's anchor: the line's first version made current, oldest first;
    a version saved before the gate recorded its verdict counts as served."""
    import json

    from backend.jobs import first_served
    from backend.lines import ModelLines

    lines = ModelLines(tmp_path)
    assert first_served(lines, 3) is None  # no line yet: the base model serves
    folder = lines.project_dir(3) / "versions"
    verdicts = {"20260101-000000-aaaaaa": False, "20260102-000000-bbbbbb": True}
    for vid, accepted in verdicts.items():
        (folder / vid).mkdir(parents=True)
        promotion = {"accepted": accepted, "reason": "test"}
        (folder / vid / "manifest.json").write_text(
            json.dumps({"metrics": {"promotion": promotion}})
        )
    assert first_served(lines, 3) == "20260102-000000-bbbbbb"  # the refused one never served
    (folder / "20251231-000000-cccccc").mkdir()
    (folder / "20251231-000000-cccccc" / "manifest.json").write_text('{"metrics": {}}')
    assert first_served(lines, 3) == "20251231-000000-cccccc"  # before the verdicts: served
