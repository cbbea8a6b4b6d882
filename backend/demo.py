"""`camlabel demo`: the whole loop on one machine, with a real Label Studio.

1. starts Label Studio (from .lsvenv or LABEL_STUDIO_BIN) on loopback, with a fresh SQLite
   database under the work folder, and creates a personal access token;
2. creates a project from a folder of images with image-level labels (DIR/<class>/*.png|jpg;
   by default a small synthetic set: bright blobs = "finding", none = "normal"), using a label
   config of label_config/ (Choices + BrushLabels) or one made for the folder's classes;
3. uploads the images as tasks and gives a labelled subset its class (a Choices annotation);
4. starts the backend (`camlabel serve`), connects it to the project (POST /api/ml) and starts
   training (POST /api/ml/{id}/train, Label Studio's "Start Training" button);
5. waits until the backend's /health shows the job done: the new version re-ranked the project
   and stored its predictions (brush masks + class + uncertainty score) for every task;
6. prints the project's URL, one pre-annotated task's URL and the login, and keeps both servers
   running until Ctrl-C (or exits at once with --no-wait).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import requests
from PIL import Image

from wsl_models.synthetic import blob_image

from .label_config import EXPLANATION_CONTROL, parse_label_config
from .local_label_studio import (
    EMAIL,
    PASSWORD,
    ROOT,
    LabelStudio,
    free_port,
    port_in_use,
    stop_process,
    wait_http,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MARKER = ".camlabel-demo"  # a work folder with this file may be wiped by the next demo
# Classes that get a Choice but no brush label in a generated config (nothing to outline).
UNMASKED = {"normal", "negative", "background", "none", "healthy", "other"}
PALETTE = ["#ff3b30", "#34c759", "#007aff", "#ff9500", "#af52de", "#5ac8fa", "#ffcc00"]


class DemoError(ValueError):
    """Something the user can fix (a busy port, a bad folder): one line, exit status 2."""


@dataclass
class Item:
    path: Path
    label: str


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="start Label Studio + the backend, label a few images, train, pre-annotate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="DIR/<class>/*.png|jpg (default: a synthetic finding/normal set)",
    )
    d.add_argument("--port", type=int, default=8080, help="Label Studio port (0: any free)")
    d.add_argument("--backend-port", type=int, default=9090, help="backend port (0: any free)")
    d.add_argument(
        "--workdir",
        default="runs/demo",
        help="Label Studio data, models and logs; recreated on each run",
    )
    d.add_argument(
        "--labelled",
        type=int,
        default=None,
        metavar="N",
        help="images to annotate with their class (default: two thirds)",
    )
    d.add_argument("--count", type=int, default=12, help="synthetic images per class")
    d.add_argument("--size", type=int, default=160, help="synthetic image size in pixels")
    d.add_argument(
        "--label-config",
        default=None,
        metavar="XML",
        help="label config file (default: one of label_config/ matching the classes)",
    )
    d.add_argument("--members", default="tiny,tiny", help="ensemble members (TRAIN_MEMBERS)")
    d.add_argument("--image-size", default="96", help="training image size (TRAIN_IMAGE_SIZE)")
    d.add_argument("--epochs", type=int, default=30, help="TRAIN_EPOCHS")
    d.add_argument("--lr", type=float, default=0.003, help="TRAIN_LR")
    d.add_argument("--weights", default="none", help="TRAIN_WEIGHTS: none | imagenet | PATH")
    d.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds to wait for Label Studio + training (0: no limit)",
    )
    d.add_argument(
        "--no-wait",
        action="store_true",
        help="stop both servers and exit once the project is pre-annotated",
    )
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return Demo(args).run()
    except (RuntimeError, TimeoutError, FileNotFoundError, requests.RequestException) as exc:
        print(f"camlabel demo: error: {exc}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------ inputs
def synthetic_images(out: Path, per_class: int, size: int, seed: int = 0) -> Path:
    """out/finding/*.png (1-2 bright blobs) and out/normal/*.png (none)."""
    rng = np.random.default_rng(seed)
    for label in ("finding", "normal"):
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            blobs = int(rng.integers(1, 3)) if label == "finding" else 0
            img, _ = blob_image(rng, (size, size), blobs)
            Image.fromarray(img).save(out / label / f"{label}_{i:03d}.png")
    return out


def scan_images(folder: Path) -> list[Item]:
    if not folder.is_dir():
        raise DemoError(f"--images {folder}: not a folder")
    items = [
        Item(p, d.name)
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".")
        for p in sorted(d.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DemoError(f"--images {folder}: no <class>/*.png|jpg images")
    return items


def choose_labelled(items: list[Item], n: int | None) -> list[int]:
    """Indices of the images to annotate: ``n`` of them, classes taking turns."""
    n = round(len(items) * 2 / 3) if n is None else n
    if not 4 <= n <= len(items):
        raise DemoError(f"--labelled must be between 4 and {len(items)} (training needs 4)")
    by_class: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_class.setdefault(item.label, []).append(i)
    order = [
        queue[k] for k in range(max(map(len, by_class.values())))
        for queue in by_class.values() if k < len(queue)
    ]  # fmt: skip
    return sorted(order[:n])


def label_config_for(classes: list[str], path: str | None = None) -> tuple[str, str]:
    """(XML, where it came from): --label-config, else a label_config/*.xml whose Choices are
    exactly the classes, else a config made for them (a brush label per class to outline)."""
    if path:
        xml = Path(path).read_text()
        missing = set(classes) - set(parse_label_config(xml).choices)
        if missing:
            raise DemoError(f"{path}: its <Choices> lack the classes {sorted(missing)}")
        return xml, path
    # explain.xml first: the demo shows what each model saw.
    ready = sorted(
        (ROOT / "label_config").glob("*.xml"), key=lambda p: (p.name != "explain.xml", p.name)
    )
    for candidate in ready:
        xml = candidate.read_text()
        if set(parse_label_config(xml).choices) == set(classes):
            return xml, str(candidate.relative_to(ROOT))
    masked = [c for c in classes if c.lower() not in UNMASKED] or classes
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    labels = "\n".join(
        f"    <Label value={quoteattr(c)} background={quoteattr(PALETTE[i % len(PALETTE)])}/>"
        for i, c in enumerate(masked)
    )
    xml = (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <Choices name="class" toName="image" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n"
        '  <BrushLabels name="mask" toName="image">\n'
        f"{labels}\n  </BrushLabels>\n"
        "</View>\n"
    )
    return xml, "generated for the classes " + ", ".join(classes)


def _upload_name(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem)[:40]
    return f"{index:05d}_{stem}{path.suffix.lower()}"


def _upload_index(url: str) -> int:
    """The index back from /data/upload/<project>/<8 hex>-<index>_<stem>.png."""
    return int(url.rsplit("/", 1)[-1].split("-", 1)[1][:5])


# ------------------------------------------------------------------------------ the demo
class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir).resolve()
        self.ls: LabelStudio | None = None
        self.backend: subprocess.Popen | None = None
        self.backend_url = ""
        self.deadline = 0.0

    def say(self, message: str) -> None:
        print(message, flush=True)

    def run(self) -> int:
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        for s in previous:  # stop the servers on kill/hang-up too, not only on Ctrl-C
            signal.signal(s, _interrupt)
        info: dict[str, Any] = {}
        try:
            info = self.setup()
            if self.args.no_wait:
                return 0
            self.say("Both servers keep running; press Ctrl-C to stop them.")
            while True:
                time.sleep(1)
                for name, proc in (("Label Studio", self.ls.proc), ("backend", self.backend)):
                    if proc.poll() is not None:
                        self.say(f"{name} exited with {proc.returncode}; see {info['logs']}")
                        return 1
        except KeyboardInterrupt:
            self.say("\nstopping ...")
            return 0 if info else 130
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        stop_process(self.backend, timeout=40)  # the gunicorn master stops its trainer
        if self.ls is not None:
            self.ls.stop()
        if self.backend is not None or self.ls is not None:
            self.say("Label Studio and the backend are stopped.")

    # ---------------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        args = self.args
        self.deadline = time.time() + args.timeout if args.timeout > 0 else math.inf
        ls_port = self._port(args.port, "--port")
        backend_port = self._port(args.backend_port, "--backend-port")
        self._prepare_workdir()
        if args.images:
            items = scan_images(Path(args.images))
        else:
            items = scan_images(synthetic_images(self.workdir / "images", args.count, args.size))
        classes = sorted({i.label for i in items})
        labelled = choose_labelled(items, args.labelled)
        config, config_from = label_config_for(classes, args.label_config)
        schema = parse_label_config(config)
        self.say(f"{len(items)} images of {', '.join(classes)}; label config: {config_from}")

        self.say(f"starting Label Studio on 127.0.0.1:{ls_port} (first start: ~30-60 s) ...")
        self.ls = LabelStudio(self.workdir / "label-studio", port=ls_port, detach=True)
        self.ls.start(timeout=self._left())
        ls = self.ls
        pid = self._create_project(config, items)
        tasks = self._tasks(pid)
        by_index = {_upload_index(t["data"][schema.image_key]): t for t in tasks}
        if sorted(by_index) != list(range(len(items))):
            raise RuntimeError(f"imported {len(tasks)} tasks for {len(items)} images")
        for i in labelled:
            choice = {"from_name": schema.choices_name, "to_name": schema.image_name,
                      "type": "choices", "value": {"choices": [items[i].label]}}  # fmt: skip
            r = ls.api("POST", f"/api/tasks/{by_index[i]['id']}/annotations",
                       json={"result": [choice]})  # fmt: skip
            _check(r, "annotate a task")
        self.say(f"project {pid}: {len(tasks)} tasks, {len(labelled)} annotated with their class")

        self.say(f"starting the backend on 127.0.0.1:{backend_port} ...")
        self._start_backend(backend_port)
        r = ls.api("POST", "/api/ml", json={"project": pid, "url": self.backend_url,
                                            "title": "camlabel"})  # fmt: skip
        ml_id = _check(r, "connect the ML backend").json()["id"]
        _check(ls.api("POST", f"/api/ml/{ml_id}/train"), "start training")
        self.say(f"training ({args.members} at {args.image_size} px, {args.epochs} epochs) ...")
        started = time.time()
        version = self._wait_for_training(pid)
        self.say(f"trained version {version} in {time.time() - started:.0f} s")

        r = _check(ls.api("GET", "/api/predictions", params={"project": pid}), "list predictions")
        predictions = [p for p in r.json() if p["model_version"] == version]
        annotated = {by_index[i]["id"] for i in labelled}
        brushed = [p for p in predictions if _has_brush(p)]
        if not brushed:
            raise RuntimeError(f"version {version} stored no brush mask: see {self._logs()}")
        shown = next((p for p in brushed if p["task"] not in annotated), brushed[0])
        project_url = f"{ls.url}/projects/{pid}/data"
        info = {
            "label_studio": ls.url,
            "email": EMAIL,
            "password": PASSWORD,
            "project": pid,
            "project_url": project_url,
            "task": shown["task"],
            "task_url": f"{project_url}?task={shown['task']}",
            "backend": self.backend_url,
            "model_version": version,
            "tasks": len(tasks),
            "annotated": len(labelled),
            "predictions": len(predictions),
            "brush_predictions": len(brushed),
            "logs": self._logs(),
        }
        (self.workdir / "demo.json").write_text(json.dumps(info, indent=2))
        self.say(
            "\n"
            "camlabel demo is ready\n"
            f"  Label Studio   {ls.url}   login: {EMAIL} / {PASSWORD}\n"
            f"  project        {project_url}\n"
            f"  pre-annotated  {info['task_url']}\n"
            f"  backend        {self.backend_url}/health   model version {version}\n"
            f"  {len(predictions)} of {len(tasks)} tasks carry a prediction of this version "
            f"({len(brushed)} with a brush mask); unlabelled tasks come most uncertain first\n"
            f"  (tab 'camlabel: most uncertain first'). Logs: {info['logs']}\n"
        )
        return info

    def _port(self, port: int, option: str) -> int:
        if port == 0:
            return free_port()
        if port_in_use(port):
            raise DemoError(f"{option} {port} is in use: pick another port, or 0 for any")
        return port

    def _prepare_workdir(self) -> None:
        w = self.workdir
        if w.exists() and any(w.iterdir()):
            if not (w / MARKER).exists():
                raise DemoError(f"--workdir {w} is not empty and not an earlier demo's folder")
            shutil.rmtree(w)
        w.mkdir(parents=True, exist_ok=True)
        (w / MARKER).write_text("made by `camlabel demo`; the next demo may delete this folder\n")

    def _left(self) -> float:
        left = self.deadline - time.time()
        if left <= 0:
            raise TimeoutError(f"the demo took longer than --timeout {self.args.timeout:.0f} s")
        return left

    def _logs(self) -> str:
        return f"{self.workdir}/label-studio/label-studio.log, {self.workdir}/backend.log"

    def _create_project(self, config: str, items: list[Item]) -> int:
        ls = self.ls
        r = ls.api("POST", "/api/projects", json={
            "title": "camlabel demo", "label_config": config,
            "description": "Image-level labels in, brush masks out (camlabel demo).",
        })  # fmt: skip
        pid = _check(r, "create the project").json()["id"]
        for start in range(0, len(items), 25):
            chunk = list(enumerate(items))[start : start + 25]
            handles = [(i, item.path.open("rb")) for i, item in chunk]
            try:
                files = {
                    _upload_name(i, items[i].path): (_upload_name(i, items[i].path), fh)
                    for i, fh in handles
                }
                _check(ls.api("POST", f"/api/projects/{pid}/import", files=files), "upload images")
            finally:
                for _, fh in handles:
                    fh.close()
        return pid

    def _tasks(self, pid: int) -> list[dict]:
        tasks, page = [], 1
        while True:
            r = self.ls.api("GET", "/api/tasks",
                            params={"project": pid, "page": page, "page_size": 100})  # fmt: skip
            batch = _check(r, "list tasks").json()["tasks"]
            tasks += batch
            if len(batch) < 100:
                return tasks
            page += 1

    def _start_backend(self, port: int) -> None:
        args = self.args
        env = {
            **os.environ,
            "MODEL_DIR": str(self.workdir / "models"),
            "LABEL_STUDIO_URL": self.ls.url,
            "LABEL_STUDIO_API_KEY": self.ls.pat,
            "TRAIN_MEMBERS": args.members,
            "TRAIN_IMAGE_SIZE": str(args.image_size),
            "TRAIN_EPOCHS": str(args.epochs),
            "TRAIN_LR": str(args.lr),
            "TRAIN_WEIGHTS": args.weights,
        }
        for key in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WEBHOOK_SECRET"):
            env.pop(key, None)  # Label Studio here is set up without them
        self.backend_url = f"http://127.0.0.1:{port}"
        with (self.workdir / "backend.log").open("w") as log:
            self.backend = subprocess.Popen(
                [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_http(f"{self.backend_url}/health", self._left(), self.backend)

    def _wait_for_training(self, pid: int) -> str:
        job: dict = {}
        while time.time() < self.deadline:
            if self.backend.poll() is not None:
                raise RuntimeError(f"the backend exited with {self.backend.returncode}")
            health = requests.get(f"{self.backend_url}/health", timeout=10).json()
            job = health["jobs"].get(str(pid), {})
            if job.get("state") == "failed" and not health["queue_pending"]:
                raise RuntimeError(f"training failed: {job.get('error')}; see {self._logs()}")
            if job.get("state") == "done" and not health["queue_pending"]:
                if not job.get("promoted"):
                    raise RuntimeError(f"version {job.get('version')} was not made current")
                return job["version"]
            time.sleep(2)
        raise TimeoutError(f"no trained version within --timeout {self.args.timeout:.0f} s: {job}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _check(r: requests.Response, what: str) -> requests.Response:
    if r.status_code >= 400:
        raise RuntimeError(f"could not {what}: HTTP {r.status_code} {r.text[:300]}")
    return r


def _has_brush(prediction: dict) -> bool:
    """A mask to look at (the explanation layers alone are not one)."""
    return any(
        r.get("type") == "brushlabels"
        and r.get("from_name") != EXPLANATION_CONTROL
        and r.get("value", {}).get("rle")
        for r in prediction.get("result", [])
    )
