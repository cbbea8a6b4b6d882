"""/predict through HTTP on loopback against in-process inference, and RLE encoding speed.

    python bench/http_predict.py --out bench/results/http_predict.json

Paper trio (ResNet50 + EfficientNet-B0 + DenseNet121, random weights: speed does not depend
on them) at 224 px, T = 30. One task per request (a 512x512 PNG as a data: URI), 1 and 4
concurrent clients, gunicorn with 1 and 2 workers; the same task predicted in-process; RSS of
each worker; then one request of 32 tasks for the throughput behind "tasks per 100 s".
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import make_ensemble  # noqa: E402

from backend.fetch import ImageFetcher  # noqa: E402
from backend.model import CamLabelModel, ModelHolder  # noqa: E402
from backend.rle import mask_to_rle  # noqa: E402
from backend.settings import Settings  # noqa: E402
from wsl_models.members import PAPER_TRIO  # noqa: E402
from wsl_models.synthetic import blob_image  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "multiclass.xml").read_text()


def task(seed: int) -> dict:
    img, _ = blob_image(np.random.default_rng(seed), (512, 512), 2)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"id": seed, "data": {"image": uri}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_rss(root: int) -> dict[str, float]:
    """RSS (MB) of every process under ``root``, named by role: gunicorn workers, trainer."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = [], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    out = {}
    for pid in tree:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "worker" in cmd and "backend.cli" in cmd:
            role = "training worker"
        elif "gunicorn" in cmd and parent.get(parent.get(pid, 0), 0) == root:
            role = f"gunicorn worker {pid}"
        elif "gunicorn" in cmd:
            role = "gunicorn master"
        else:
            continue
        out[role] = round(rss_mb(pid))
    return out


def serve(model_dir: str, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "MODEL_DIR": model_dir, "PORT": str(port), "HOST": "127.0.0.1",
           "WORKERS": str(workers), "THREADS": "4"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
    raise TimeoutError("backend did not start")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/http_predict.json")
    p.add_argument("--requests", type=int, default=24, help="requests per client")
    p.add_argument("--port", type=int, default=9311)
    args = p.parse_args()
    model_dir = tempfile.mkdtemp()
    ens = make_ensemble(list(PAPER_TRIO), (224, 224), 30)
    ModelStore(model_dir).save(ens, {})
    payload = {"tasks": [task(1)], "label_config": CONFIG}

    settings = Settings(model_dir=model_dir)
    model = CamLabelModel(ModelHolder(settings), ImageFetcher(settings), settings, CONFIG)
    model.setup()
    model.predict(payload["tasks"])
    inproc = []
    for _ in range(10):
        t0 = time.perf_counter()
        model.predict(payload["tasks"])
        inproc.append(time.perf_counter() - t0)
    rows = []
    for workers in (1, 2):
        proc = serve(model_dir, args.port, workers)
        url = f"http://127.0.0.1:{args.port}/predict"
        for _ in range(2):  # warm every worker
            requests.post(url, json=payload, timeout=100)
        for clients in (1, 4):

            def one(_, url=url):
                t0 = time.perf_counter()
                r = requests.post(url, json=payload, timeout=100)
                assert r.status_code == 200 and "error" not in r.json()["results"][0], r.text
                return time.perf_counter() - t0

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(one, range(clients * args.requests)))
            wall = time.perf_counter() - start
            row = {
                "workers": workers,
                "clients": clients,
                "requests": len(lat),
                "p50_ms": 1000 * percentile(lat, 50),
                "p99_ms": 1000 * percentile(lat, 99),
                "requests_per_s": len(lat) / wall,
                "rss_mb": process_rss(proc.pid),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        if workers == 1:
            big = {"tasks": [task(100 + i) for i in range(32)], "label_config": CONFIG}
            t0 = time.perf_counter()
            r = requests.post(url, json=big, timeout=100)
            big_s = time.perf_counter() - t0
            assert r.status_code == 200 and len(r.json()["results"]) == 32
        proc.terminate()
        proc.wait(timeout=30)
        time.sleep(1)
    yy, xx = np.mgrid[0:2048, 0:2048]
    mask = ((yy - 900) ** 2 / 500**2 + (xx - 1100) ** 2 / 700**2) <= 1
    mask |= ((yy - 1600) ** 2 + (xx - 400) ** 2) <= 250**2
    rle_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        mask_to_rle(mask)
        rle_s.append(time.perf_counter() - t0)
    single = next(r for r in rows if r["workers"] == 1 and r["clients"] == 1)
    result = {
        "machine": {"cpu_threads": os.cpu_count(), "python": platform.python_version()},
        "in_process_ms": 1000 * statistics.median(inproc),
        "http": rows,
        "http_overhead_pct": 100 * (single["p50_ms"] / (1000 * statistics.median(inproc)) - 1),
        "batch32_seconds": big_s,
        "tasks_per_100s": int(100 / (big_s / 32)),
        "rle_2048_ms": 1000 * statistics.median(rle_s),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
