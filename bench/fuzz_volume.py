"""Hostile input at volume: >= 100 000 generated payloads against a running backend.

    python bench/fuzz_volume.py --payloads 100000 --images 100000 \\
        --out bench/results/fuzz_volume.json

`camlabel serve` (gunicorn, 2 workers, its training worker) runs on loopback with a model
version and a webhook secret. Payloads are mutations of valid requests (a /predict with a task,
an interactive /predict with a smart rectangle or keypoint as context, a /setup, a training
webhook), random JSON and raw bytes, sent by 4 clients. A mutation replaces, deletes, adds or
duplicates nodes, swaps types, and writes extreme numbers, long strings and mutated image bytes.
A webhook that would validly ask for training is not sent (it is meant to queue a job); every
other webhook is, with the secret or without it.

Reported: counts per route and status, every 5xx (must be 0), tracebacks and "internal error"
lines in the backend's log (must be 0), RSS of the server's processes along the run (must stay
flat), and the model versions, the files under MODEL_DIR and the training queue before and after
(must be untouched). Then as many mutated images go through the image decoder in-process: each
is an RGB image or an ImageError, nothing else. Exit status 1 if any check fails.
Run it alone: it keeps both cores busy for several minutes.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, rss_mb  # noqa: E402

from backend.app import TRAINING_EVENTS  # noqa: E402
from backend.lines import project_id  # noqa: E402
from wsl_models.ensemble import Ensemble, EnsembleConfig  # noqa: E402
from wsl_models.images import ImageError, open_image  # noqa: E402
from wsl_models.members import build_member  # noqa: E402
from wsl_models.synthetic import blob_image  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(ROOT / "label_config" / f"{n}.xml").read_text() for n in ("interactive", "clicks")]
SECRET = "fuzz-webhook-secret"
EXTREMES: list[Any] = [0, -1, 2**63, -(2**63), 1e308, -1e308, 1e-308, "", " ", "\x00", "é" * 300,
                       "NaN", "Infinity", [], {}, None, True, False, "1.1700000000", "../../x"]  # fmt: skip


def image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    pixels, _ = blob_image(rng, (int(rng.integers(8, 80)), int(rng.integers(8, 80))), 1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


class Mutator:
    """Random JSON, and mutations of a valid JSON value, from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.images = [image_bytes(self.rng, f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF")]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, items: list) -> Any:
        return items[int(self.rng.integers(len(items)))]

    def text(self) -> str:
        n = int(self.rng.choice([0, 1, 8, 64, 4096]))
        return "".join(chr(int(c)) for c in self.rng.integers(1, 0x3000, n))

    def image(self) -> bytes:
        data = bytearray(self.pick(self.images))
        for _ in range(int(self.rng.integers(0, 9))):
            data[int(self.rng.integers(len(data)))] = int(self.rng.integers(256))
        if self.chance(0.3):
            data = data[: int(self.rng.integers(len(data) + 1))]
        return bytes(data)

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.image()).decode()

    def value(self, depth: int = 0) -> Any:
        kind = int(self.rng.integers(9 if depth < 3 else 6))
        if kind == 0:
            return self.pick(EXTREMES)
        if kind == 1:
            return int(self.rng.integers(-(2**31), 2**31))
        if kind == 2:
            return float(self.rng.normal() * 10 ** int(self.rng.integers(0, 12)))
        if kind == 3:
            return self.text()
        if kind == 4:
            return self.data_uri()
        if kind == 5:
            return self.pick([None, True, False])
        if kind in (6, 7):
            return [self.value(depth + 1) for _ in range(int(self.rng.integers(0, 4)))]
        return {
            self.text()[:12]: self.value(depth + 1) for _ in range(int(self.rng.integers(0, 4)))
        }

    def mutate(self, obj: Any, rate: float = 0.15) -> Any:
        """Walk ``obj`` and change each node with probability ``rate``."""
        if self.chance(rate):
            return self.value()
        if isinstance(obj, dict):
            out = {}
            for key, val in obj.items():
                if self.chance(rate / 2):
                    continue  # a key deleted
                out[key] = self.mutate(val, rate)
            if self.chance(rate / 2):
                out[self.text()[:12]] = self.value()
            return out
        if isinstance(obj, list):
            out = [self.mutate(v, rate) for v in obj]
            if out and self.chance(rate / 2):
                out += out[: int(self.rng.integers(1, 40))]  # duplicated elements
            return out
        if isinstance(obj, str) and obj.startswith("data:") and self.chance(0.5):
            return self.data_uri()
        return obj


def seeds(m: Mutator) -> dict[str, list[dict]]:
    """Valid requests, per route: what the mutations start from."""
    uri = "data:image/png;base64," + base64.b64encode(m.images[0]).decode()
    task = {"id": 7, "data": {"image": uri}}
    point = {"type": "keypointlabels", "from_name": "point", "to_name": "image",
             "original_width": 40, "original_height": 30, "is_positive": True,
             "value": {"x": 40.0, "y": 50.0, "width": 1.0, "keypointlabels": ["finding"]}}  # fmt: skip
    box = {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
           "original_width": 40, "original_height": 30,
           "value": {"x": 10.0, "y": 10.0, "width": 50.0, "height": 60.0,
                     "rectanglelabels": ["finding"]}}  # fmt: skip
    out: dict[str, list[dict]] = {"/predict": [], "/setup": [], "/webhook": [], "interactive": []}
    for config in CONFIGS:
        out["/predict"].append({"tasks": [task], "label_config": config, "project": "3.1700000000"})
        out["/setup"].append({"project": "3.1700000000", "schema": config})
        out["interactive"].append({"tasks": [task], "label_config": config, "project": "3.17",
                                   "params": {"context": {"result": [box, point]}}})  # fmt: skip
    for action in sorted(TRAINING_EVENTS) + ["PROJECT_UPDATED"]:
        out["/webhook"].append({"action": action, "project": {"id": 3, "title": "p"},
                                "annotation": {"id": 1, "task": 7, "result": []}})  # fmt: skip
    return out


def queues_training(body: Any) -> bool:
    """A webhook the backend is meant to act on (queue a job): the fuzz does not send those."""
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        return False
    if body["action"] not in TRAINING_EVENTS:
        return False
    project = body.get("project")
    return isinstance(project, dict) and project_id(project.get("id")) is not None


def payloads(seed: int, n: int):
    """(kind, route, body bytes, headers) for ``n`` requests, with no training webhook."""
    m = Mutator(seed)
    valid = seeds(m)
    kinds = list(valid)
    sent = 0
    while sent < n:
        kind = m.pick(kinds)
        route = "/predict" if kind == "interactive" else kind
        headers = {"Content-Type": "application/json"}
        if route == "/webhook" and m.chance(0.8):
            headers["X-Camlabel-Webhook-Secret"] = SECRET
        style = m.rng.random()
        if style < 0.8:
            body = m.mutate(copy.deepcopy(m.pick(valid[kind])))
        elif style < 0.9:
            body = m.value()
        else:  # not JSON at all, or JSON cut short
            text = json.dumps(m.pick(valid[kind]))
            raw = m.image() if m.chance(0.5) else text[: int(m.rng.integers(len(text)))].encode()
            yield kind, route, raw, headers
            sent += 1
            continue
        if route == "/webhook" and queues_training(body):
            continue
        yield kind, route, json.dumps(body).encode(), headers
        sent += 1


def tree_rss(root: int) -> float:
    """RSS (MB) of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return round(sum(rss_mb(p) or 0.0 for p in tree), 1)


def model_dir_state(root: Path) -> dict[str, str]:
    """sha256 of every file under MODEL_DIR but the queue's and the logs' own files."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(("queue", "jobs")) and path.suffix != ".log":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_model(model_dir: Path) -> str:
    """A small version (two tiny members, 64 px, random weights): every parser and the whole
    inference path run, as with a trained model, at a fraction of the time."""
    torch.manual_seed(0)
    classes = ["finding", "normal"]
    members = [build_member("tiny", 2, "none", dropout=0.5) for _ in range(2)]
    cfg = EnsembleConfig(classes, ["tiny", "tiny"], (64, 64), mc_samples=4,
                         mask_classes=["finding"], decoder=False)  # fmt: skip
    return ModelStore(model_dir).save(Ensemble(members, cfg), {"note": "fuzz"})


def serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "PORT": str(port), "HOST": "127.0.0.1",
           "WORKERS": "2", "THREADS": "4", "WEBHOOK_SECRET": SECRET, "FETCH_TIMEOUT": "0.5"}  # fmt: skip
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "ALLOWED_IMAGE_HOSTS"):
        env.pop(key, None)  # no network: every URL is refused before a connection
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    while True:  # up when /health answers; gone is an error, however long a busy start takes
        if proc.poll() is not None:
            raise RuntimeError(
                f"the backend exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)


def snapshot(url: str, model_dir: Path) -> dict:
    health = requests.get(f"{url}/health", timeout=30).json()
    return {
        "versions": requests.get(f"{url}/versions", timeout=30).json()["versions"],
        "queue_pending": health["queue_pending"],
        "jobs": health["jobs"],
        "projects": health["projects"],
        "files": model_dir_state(model_dir),
    }


def fuzz_http(url: str, proc: subprocess.Popen, n: int, seed: int, clients: int) -> dict:
    outcomes: Counter[str] = Counter()
    server_errors: list[dict] = []
    rss: list[tuple[int, float]] = []
    lock = threading.Lock()
    local = threading.local()
    done = 0

    def send(item) -> None:
        nonlocal done
        kind, route, data, headers = item
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        try:
            r = session.post(url + route, data=data, headers=headers, timeout=120)
            status = str(r.status_code)
            if route == "/predict" and r.status_code == 200:  # per task: a prediction or an error
                results = r.json()["results"]
                ok = sum("error" not in res for res in results)
                status += f" ({ok} predicted, {len(results) - ok} task errors)" if results else ""
            if r.status_code >= 500 or "application/json" not in r.headers.get("Content-Type", ""):
                with lock:
                    server_errors.append({"kind": kind, "status": r.status_code,
                                          "body": data[:300].decode(errors="replace"),
                                          "answer": r.text[:300]})  # fmt: skip
        except requests.RequestException as exc:
            status = f"client {type(exc).__name__}"
        with lock:
            outcomes[f"{kind} {status}"] += 1
            done += 1
            if done % 2000 == 0:
                rss.append((done, tree_rss(proc.pid)))
                print(f"{done} sent, RSS {rss[-1][1]} MB, {dict(outcomes)}", flush=True)

    start = time.perf_counter()
    rss.append((0, tree_rss(proc.pid)))
    stream = payloads(seed, n)
    with ThreadPoolExecutor(clients) as pool:
        while chunk := list(itertools.islice(stream, 500)):  # generated as they are sent
            list(pool.map(send, chunk))
    return {"seconds": round(time.perf_counter() - start, 1), "outcomes": dict(sorted(outcomes.items())),
            "server_errors": server_errors, "rss_mb": rss}  # fmt: skip


def fuzz_decoder(n: int, seed: int) -> dict:
    warnings.simplefilter("ignore")  # PIL warns on every corrupt TIFF tag; outcomes count them
    m = Mutator(seed + 1)
    outcomes: Counter[str] = Counter()
    uncaught: list[str] = []
    for _ in range(n):
        data = m.image() if m.chance(0.9) else m.rng.bytes(int(m.rng.integers(0, 300)))
        try:
            img = open_image(data, max_pixels=1_000_000)
            outcomes["RGB image" if img.mode == "RGB" else f"mode {img.mode}"] += 1
        except ImageError:
            outcomes["ImageError"] += 1
        except Exception as exc:  # anything else reaching the caller is a bug
            outcomes[f"uncaught {type(exc).__name__}"] += 1
            uncaught.append(f"{type(exc).__name__}: {exc}"[:200])
    return {"outcomes": dict(outcomes), "uncaught": uncaught[:20]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--payloads", type=int, default=100_000)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=9317)
    p.add_argument("--out", default="bench/results/fuzz_volume.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="camlabel-fuzz-"))
    model_dir = work / "models"
    version = make_model(model_dir)
    log = work / "backend.log"
    proc = serve(model_dir, args.port, log)
    url = f"http://127.0.0.1:{args.port}"
    try:
        before = snapshot(url, model_dir)
        http = fuzz_http(url, proc, args.payloads, args.seed, args.clients)
        after = snapshot(url, model_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=90)
    text = log.read_text(errors="replace")
    rss = [v for _, v in http["rss_mb"]]
    warm = rss[min(2, len(rss) - 1)]  # after the first 4000 requests (each worker has loaded)
    checks = {
        "no 5xx or non-JSON answer": not http["server_errors"],
        "no traceback in the log": "Traceback" not in text,
        "no internal error": "internal error" not in text and " failed\n" not in text,
        "RSS flat (last <= 1.15 x after warm-up)": rss[-1] <= 1.15 * warm,
        "versions, files and queue untouched": before == after and version in after["versions"],
    }
    decoder = fuzz_decoder(args.images, args.seed)
    checks["image decoder: RGB or ImageError only"] = not decoder["uncaught"]
    result = {
        "machine": machine(),
        "payloads": args.payloads,
        "clients": args.clients,
        "http": http,
        "requests_per_s": round(args.payloads / http["seconds"], 1),
        "log_lines": len(text.splitlines()),
        "versions_before_after": [before["versions"], after["versions"]],
        "queue_pending_before_after": [before["queue_pending"], after["queue_pending"]],
        "model_files": len(before["files"]),
        "image_decoder": {"images": args.images, **decoder},
        "checks": checks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
