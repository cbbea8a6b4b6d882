"""`camlabel demo` end to end: a real Label Studio, the backend, training, pre-annotations.

The demo runs as a subprocess the way a user runs it; once it prints its URLs the test checks
the live project through a browser login, then presses Ctrl-C (SIGINT) and checks that both
servers are gone.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from backend.local_label_studio import LS_BIN, login_session, port_in_use
from backend.rle import rle_to_mask

from .progress import descendants, wait_while_progressing

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("CAMLABEL_SKIP_E2E") == "1", reason="CAMLABEL_SKIP_E2E=1"
)


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _ctrl_c_works() -> None:
    """The demo as started from a terminal: SIGINT at its default, whatever this test inherited
    (a job started with `&` by a non-interactive shell ignores SIGINT, and so would the demo)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_pre_annotates_a_project(tmp_path):
    if not LS_BIN.exists():
        pytest.fail(f"Label Studio not installed at {LS_BIN}: run `make labelstudio`")
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "demo", "--port", "0", "--backend-port", "0",
         "--workdir", str(workdir), "--count", "8", "--size", "96", "--timeout", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_ctrl_c_works,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    printed: list[str] = []
    try:

        def ready():  # the demo prints its URLs once the project is pre-annotated
            while not lines.empty():
                line = lines.get()
                assert line is not None, "".join(printed)
                printed.append(line)
            return (True if any("press Ctrl-C" in x for x in printed) else None), len(printed)

        # no time limit: the wait lasts while the demo (LS, backend, training) makes progress
        wait_while_progressing(ready, proc.pid, "the demo", poll=1.0)
        output = "".join(printed)
        info = json.loads((workdir / "demo.json").read_text())
        ls, pid, version = info["label_studio"], info["project"], info["model_version"]
        task_url = re.search(r"pre-annotated\s+(\S+)", output).group(1)
        assert task_url == f"{ls}/projects/{pid}/data?task={info['task']}"
        assert f"login: {info['email']} / {info['password']}" in output
        assert re.search(rf"project\s+{re.escape(ls)}/projects/{pid}/data\b", output)

        # The backend serves the trained version from the project's own line (there is no base
        # model); the project points at it.
        health = requests.get(f"{info['backend']}/health", timeout=10).json()
        assert health["projects"][str(pid)] == version and not health["trained"]
        assert health["jobs"][str(pid)]["state"] == "done"

        s = login_session(ls, info["email"], info["password"])
        project = s.get(f"{ls}/api/projects/{pid}", timeout=30).json()
        assert project["model_version"] == version
        assert project["sampling"] == "Uncertainty sampling"
        tasks = s.get(f"{ls}/api/tasks", params={"project": pid, "page_size": 100}, timeout=30)
        tasks = tasks.json()["tasks"]
        assert len(tasks) == 16
        assert sum(1 for t in tasks if t["total_annotations"]) == 11  # two thirds
        preds = s.get(f"{ls}/api/predictions", params={"project": pid}, timeout=30).json()
        preds = [p for p in preds if p["model_version"] == version]
        assert sorted(p["task"] for p in preds) == sorted(t["id"] for t in tasks)
        brushed, layers = {}, set()
        for p in preds:
            assert 0.0 <= p["score"] <= 1.0
            for r in p["result"]:
                if r["type"] == "brushlabels":
                    mask = rle_to_mask(r["value"]["rle"], r["original_height"],
                                       r["original_width"])  # fmt: skip
                    assert mask.shape == (96, 96) and mask.any()
                    if r["from_name"] == "explanation":  # label_config/explain.xml's layers
                        layers |= set(r["value"]["brushlabels"])
                        continue
                    assert r["from_name"] == "mask" and r["value"]["brushlabels"] == ["finding"]
                    brushed[p["task"]] = mask
        assert info["task"] in brushed
        assert "consensus" in layers and layers <= {"model 1", "model 2", "consensus"}
        shown = next(t for t in tasks if t["id"] == info["task"])
        assert shown["total_annotations"] == 0  # a task the annotator has yet to do

        # The printed URL opens the labeling UI after login (and the login page before).
        assert s.get(task_url, timeout=30).status_code == 200
        anonymous = requests.get(task_url, timeout=30, allow_redirects=False)
        assert anonymous.status_code == 302 and "/user/login" in anonymous.headers["Location"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:  # the demo stops Label Studio and the backend, then exits
            code = wait_while_progressing(
                lambda: (proc.poll(), len(descendants(proc.pid))), proc.pid, "the demo to stop",
                poll=0.5, must_live=False,
            )  # fmt: skip
        except BaseException:
            proc.kill()
            raise
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    assert code == 0, "".join(printed + rest)
    assert "Label Studio and the backend are stopped." in "".join(rest)
    for url in (info["label_studio"], info["backend"]):
        assert not port_in_use(int(url.rsplit(":", 1)[1])), f"{url} still answers"
