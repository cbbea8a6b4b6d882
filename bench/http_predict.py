"""/predict through HTTP on loopback against in-process inference, and RLE encoding speed.

    python bench/http_predict.py --out bench/results/http_predict.json

Paper trio (ResNet50 + EfficientNet-B0 + DenseNet121, random weights: speed does not depend
on them) at 224 px, T = 30. One task per request (a 512x512 PNG by URL from a local HTTP server), 1 and 4
concurrent clients, gunicorn with 1 and 2 workers; the same task predicted in-process; RSS of
each worker; then one request of 32 tasks for the throughput behind "tasks per 100 s".
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import make_ensemble  # noqa: E402

from backend.fetch import ImageFetcher  # noqa: E402
from backend.holder import ModelHolder  # noqa: E402
from backend.inference import InferenceEngine  # noqa: E402
from backend.model import CamLabelModel  # noqa: E402
from backend.rle import mask_to_rle  # noqa: E402
from backend.settings import Settings  # noqa: E402
from wsl_models.members import PAPER_TRIO  # noqa: E402
from wsl_models.synthetic import blob_image  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "multiclass.xml").read_text()


def task(seed: int, folder: Path, base_url: str) -> dict:
    """A 512x512 PNG served over HTTP, as Label Studio sends it (a URL, not the pixels)."""
    img, _ = blob_image(np.random.default_rng(seed), (512, 512), 2)
    Image.fromarray(img).save(folder / f"{seed}.png")
    return {"id": seed, "data": {"image": f"{base_url}/{seed}.png"}}


def image_server(folder: Path) -> str:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_rss(master: int) -> dict[str, float]:
    """RSS (MB) of gunicorn's master, each of its workers, and the training worker."""
    out = {"gunicorn master": round(rss_mb(master))}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid, ppid = int(stat.parent.name), int(fields[1])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid != master:
            continue
        role = "training worker" if "backend.cli worker" in cmd else f"gunicorn worker {pid}"
        out[role] = round(rss_mb(pid))
    return out


def serve(
    model_dir: str, port: int, workers: int, threads: int = 4, images: str = ""
) -> subprocess.Popen:
    """``images``: the image server's host:port, allow-listed (backend/url_policy.py)."""
    env = {**os.environ, "MODEL_DIR": model_dir, "PORT": str(port), "HOST": "127.0.0.1",
           "WORKERS": str(workers), "THREADS": str(threads),
           "ALLOWED_IMAGE_HOSTS": images}  # fmt: skip
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
    p.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    args = p.parse_args()
    model_dir = tempfile.mkdtemp()
    ens = make_ensemble(list(PAPER_TRIO), (224, 224), 30)
    ModelStore(model_dir).save(ens, {})
    folder = Path(tempfile.mkdtemp())
    base = image_server(folder)
    payload = {"tasks": [task(1, folder, base)], "label_config": CONFIG}

    images = base.removeprefix("http://")
    settings = Settings(model_dir=model_dir, allowed_image_hosts=images)
    holder = ModelHolder(settings)
    holder.preload()
    engine = InferenceEngine(settings.predict_batch, settings.batch_invariant)
    model = CamLabelModel(holder.get(), engine, ImageFetcher(settings), settings, CONFIG)
    model.setup()
    model.predict(payload["tasks"])
    rows = []
    inproc, http_single = [], []
    for workers in (1, 2):
        proc = serve(model_dir, args.port, workers, args.threads, images)
        url = f"http://127.0.0.1:{args.port}/predict"
        for _ in range(2):  # warm every worker
            requests.post(url, json=payload, timeout=100)
        if workers == 1:  # overhead: in-process and HTTP alternately, so drift hits both
            for _ in range(args.requests):
                t0 = time.perf_counter()
                model.predict(payload["tasks"])
                inproc.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                requests.post(url, json=payload, timeout=100).raise_for_status()
                http_single.append(time.perf_counter() - t0)
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
            big = {
                "tasks": [task(100 + i, folder, base) for i in range(32)],
                "label_config": CONFIG,
            }
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
    result = {
        "machine": {"cpu_threads": os.cpu_count(), "python": platform.python_version()},
        "gunicorn_threads": args.threads,
        "in_process_ms": 1000 * statistics.median(inproc),
        "http_interleaved_ms": 1000 * statistics.median(http_single),
        "http_overhead_pct": 100 * (statistics.median(http_single) / statistics.median(inproc) - 1),
        "http": rows,
        "batch32_seconds": big_s,
        "tasks_per_100s": int(100 / (big_s / 32)),
        "rle_2048_ms": 1000 * statistics.median(rle_s),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
