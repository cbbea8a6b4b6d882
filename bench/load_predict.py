"""Load test of /predict: `camlabel serve` (gunicorn) under N concurrent per-task clients.

    python bench/load_predict.py --out bench/results/load_predict.json

Saves a model version with random weights (speed and memory do not depend on them; default the
EfficientNet-Lite trio that training makes, 224 px, T = 30 MC samples) in a temporary MODEL_DIR,
starts `camlabel serve` on loopback as a subprocess (its own process group), and serves
--images generated PNGs from a local HTTP server whose host:port is put in ALLOWED_IMAGE_HOSTS
(image URLs are allow-listed). Then --clients clients each POST /predict with ONE task per
request, as Label Studio does when a task is opened or predictions are retrieved one by one,
back to back (closed loop) for --warmup seconds (not measured) and then --duration seconds.

Reported: requests/s and images/s, p50/p90/p99 latency, 5xx responses (must be 0: the script
exits 1 otherwise), other errors (4xx, timeouts, connection errors, 200 with a failed task),
the RSS of gunicorn's master and of each of its children (workers and the training worker,
found with `pgrep -P`, VmRSS from /proc/<pid>/status) every second, and the RSS growth of each
process from the first to the last third of the measured run (memory is "flat" below 5 %).

Why a plain Python load generator (threads, one requests.Session per client) and not wrk: wrk
is not installed here, and it would need a Lua script to post JSON bodies. One /predict costs
hundreds of milliseconds of CPU on the server; a client thread spends well under a millisecond
per request and releases the GIL while it waits on the socket, so the generator measures the
server, not itself. Closed-loop clients are also what Label Studio is: each of its requests
waits for the answer. The generator runs on the same machine and takes a little CPU from the
server; the JSON records CPU count and load average so that runs can be compared.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, rss_mb  # noqa: E402
from speed import make_ensemble  # noqa: E402

from wsl_models.images import parse_size  # noqa: E402
from wsl_models.members import LITE_TRIO  # noqa: E402
from wsl_models.synthetic import blob_image  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "multiclass.xml").read_text()  # classes of make_ensemble
FLAT_PCT = 5.0


# ------------------------------------------------------------------------------------ helpers
def pss_mb(pid: int) -> float | None:
    """Proportional set size: shared library pages divided among the processes mapping them
    (RSS counts them in full in every process, so RSS summed over processes overstates)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def role(pid: int, master: int) -> str:
    if pid == master:
        return "master"
    return "trainer" if "backend.cli worker" in cmdline(pid) else "worker"


def image_server(folder: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def make_images(folder: Path, count: int, px: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        img, _ = blob_image(rng, (px, px), int(rng.integers(0, 3)))
        name = f"{i:05d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    return names


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ms = 1000 * np.asarray(values)
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


# ------------------------------------------------------------------------------------- server
def start_server(args, model_dir: Path, allowed: str, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "ALLOWED_IMAGE_HOSTS": allowed,
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
        "BASIC_AUTH_USER": "",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", str(args.workers),
           "--threads", str(args.threads), "--timeout", str(args.timeout)]  # fmt: skip
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{args.port}/health"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(url, timeout=2).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc, set())
    raise RuntimeError(f"camlabel serve did not come up (exit {proc.returncode}); see {log_path}")


def stop_server(proc: subprocess.Popen, known: set[int]) -> list[int]:
    """SIGTERM to the master (it stops its workers and the trainer), then make sure every
    process this run started is gone; returns the pids that had to be killed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    time.sleep(1)
    killed = []
    for pid in sorted(known):  # a pid still alive and still ours (not reused): kill it
        line = cmdline(pid)
        if "gunicorn" in line or "backend.cli" in line:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    try:  # anything else left in the server's own process group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return killed


# --------------------------------------------------------------------------------------- load
class Sampler(threading.Thread):
    """RSS of the master and each child, once a second."""

    def __init__(self, master: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.master, self.t0 = master, t0
        self.samples: list[dict] = []
        self.seen: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter() - self.t0
            procs = {}
            for pid in [self.master, *children(self.master)]:
                mb = rss_mb(pid)
                if mb is None:
                    continue
                self.seen.setdefault(pid, role(pid, self.master))
                procs[str(pid)] = round(mb, 1)
            self.samples.append({"t": round(t, 2), "rss_mb": procs})
            self.stop.wait(1.0)


def client(url: str, bodies: list[bytes], start: int, stop_at: float, timeout: float, out: list):
    """Closed loop: POST one task, wait for the answer, POST the next, until ``stop_at``."""
    session = requests.Session()
    session.trust_env = False
    headers = {"Content-Type": "application/json"}
    i = start
    while time.perf_counter() < stop_at:
        body = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        kind = "ok"
        try:
            r = session.post(url, data=body, headers=headers, timeout=timeout)
            if r.status_code != 200:
                kind = f"http_{r.status_code}"
            else:
                results = r.json().get("results") or []
                if len(results) != 1 or "error" in results[0] or "result" not in results[0]:
                    kind = "task_error"
        except requests.Timeout:
            kind = "timeout"
        except requests.RequestException as exc:
            kind = f"connection:{type(exc).__name__}"
        except ValueError:
            kind = "bad_json"
        out.append((t0, time.perf_counter(), kind))
    session.close()


def run_load(url: str, bodies: list[bytes], clients: int, seconds: float, timeout: float):
    records: list[list] = [[] for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    step = max(1, len(bodies) // clients)
    threads = [
        threading.Thread(target=client, args=(url, bodies, k * step, stop_at, timeout, records[k]))
        for k in range(clients)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [r for rec in records for r in rec]


def summarise(records: list, t_start: float) -> dict:
    ok = [b - a for a, b, kind in records if kind == "ok"]
    kinds: dict[str, int] = {}
    for _, _, kind in records:
        kinds[kind] = kinds.get(kind, 0) + 1
    wall = max((b for _, b, _ in records), default=t_start) - t_start
    server_errors = sum(n for k, n in kinds.items() if k.startswith("http_5"))
    return {
        "requests": len(records),
        "ok": len(ok),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 3) if wall > 0 else 0.0,
        # one task = one image per request
        "images_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        **percentiles(ok),
        "errors_5xx": server_errors,
        "errors_other": len(records) - len(ok) - server_errors,
        "outcomes": kinds,
    }


def memory_growth(samples: list[dict], seen: dict[int, str], t0: float, t1: float) -> dict:
    """Per process: mean RSS over the first and the last third of [t0, t1], growth in %."""
    third = (t1 - t0) / 3
    first = [s for s in samples if t0 <= s["t"] < t0 + third]
    last = [s for s in samples if t1 - third <= s["t"] <= t1]
    out = {}
    for pid, name in seen.items():
        a = [s["rss_mb"][str(pid)] for s in first if str(pid) in s["rss_mb"]]
        b = [s["rss_mb"][str(pid)] for s in last if str(pid) in s["rss_mb"]]
        allv = [s["rss_mb"][str(pid)] for s in samples if str(pid) in s["rss_mb"]]
        row = {"role": name, "peak_mb": round(max(allv), 1) if allv else None}
        if a and b:
            ma, mb = float(np.mean(a)), float(np.mean(b))
            row.update(first_third_mb=round(ma, 1), last_third_mb=round(mb, 1),
                       growth_pct=round(100 * (mb / ma - 1), 2))  # fmt: skip
        else:  # started or ended mid-run: a replaced worker
            row["growth_pct"] = None
        out[str(pid)] = row
    totals_a = [sum(s["rss_mb"].values()) for s in first]
    totals_b = [sum(s["rss_mb"].values()) for s in last]
    total = None
    if totals_a and totals_b:
        total = round(100 * (float(np.mean(totals_b)) / float(np.mean(totals_a)) - 1), 2)
    return {"per_process": out, "total_growth_pct": total}


# --------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/load_predict.json")
    p.add_argument(
        "--members", default=",".join(LITE_TRIO), help="comma-separated (default: %(default)s)"
    )
    p.add_argument("--image-size", default="224", help="model input, '224' or 'WxH'")
    p.add_argument("--mc-samples", type=int, default=30)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds before")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    p.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    p.add_argument("--timeout", type=int, default=120, help="gunicorn worker timeout (s)")
    p.add_argument("--request-timeout", type=float, default=100.0,
                   help="client timeout (s): Label Studio's ML_TIMEOUT_PREDICT")  # fmt: skip
    p.add_argument("--images", type=int, default=64, help="distinct images served")
    p.add_argument("--image-px", type=int, default=512, help="side of the served PNGs")
    p.add_argument("--port", type=int, default=0, help="backend port (0: a free one)")
    args = p.parse_args()
    if args.port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]

    members = [m for m in args.members.split(",") if m]
    size = parse_size(args.image_size)
    work = Path(tempfile.mkdtemp(prefix="camlabel-load-"))
    model_dir, folder = work / "models", work / "images"
    folder.mkdir(parents=True)
    ModelStore(str(model_dir)).save(make_ensemble(members, size, args.mc_samples), {})
    names = make_images(folder, args.images, args.image_px)
    httpd = image_server(folder)
    host = f"127.0.0.1:{httpd.server_address[1]}"
    bodies = [
        json.dumps(
            {
                "tasks": [{"id": i + 1, "data": {"image": f"http://{host}/{n}"}}],
                "label_config": CONFIG,
                "project": "1.0",
            }
        ).encode()
        for i, n in enumerate(names)
    ]
    url = f"http://127.0.0.1:{args.port}/predict"
    log_path = work / "serve.log"
    load_before = loadavg()
    proc = start_server(args, model_dir, host, log_path)
    sampler = Sampler(proc.pid, time.perf_counter())
    sampler.start()
    try:
        r = requests.post(url, data=bodies[0], headers={"Content-Type": "application/json"},
                          timeout=args.request_timeout)  # fmt: skip
        r.raise_for_status()
        assert "result" in r.json()["results"][0], r.text[:300]
        print(f"serving; warm-up {args.warmup:.0f} s with {args.clients} clients", flush=True)
        warm = run_load(url, bodies, args.clients, args.warmup, args.request_timeout)
        t_start = time.perf_counter()
        m0 = t_start - sampler.t0
        print(f"measuring {args.duration:.0f} s", flush=True)
        records = run_load(url, bodies, args.clients, args.duration, args.request_timeout)
        m1 = time.perf_counter() - sampler.t0
        time.sleep(1.1)  # one more sample
        pss_end = {str(pid): pss_mb(pid) for pid in sampler.seen}
    finally:
        sampler.stop.set()
        sampler.join()
        killed = stop_server(proc, set(sampler.seen))
        httpd.shutdown()
        httpd.server_close()
    measured = [r for r in records if r[0] >= t_start]
    stats = summarise(measured, t_start)
    warm_stats = summarise(warm, t_start - args.warmup) if warm else {}
    memory = memory_growth(sampler.samples, sampler.seen, m0, m1)
    worker_growth = [
        row["growth_pct"]
        for row in memory["per_process"].values()
        if row["role"] in ("master", "worker") and row["growth_pct"] is not None
    ]
    max_growth = max(worker_growth) if worker_growth else None
    log_text = log_path.read_text(errors="replace")
    workers_seen = [pid for pid, name in sampler.seen.items() if name == "worker"]
    result = {
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "config": {
            "members": members,
            "image_size": list(size),
            "mc_samples": args.mc_samples,
            "clients": args.clients,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "gunicorn_workers": args.workers,
            "gunicorn_threads": args.threads,
            "served_image_px": args.image_px,
            "distinct_images": args.images,
            "tasks_per_request": 1,
        },
        **stats,
        "warmup": {k: warm_stats.get(k) for k in ("requests", "errors_5xx", "errors_other")},
        "memory": {
            "max_growth_pct": max_growth,  # over master + gunicorn workers
            "flat": max_growth is not None and max_growth < FLAT_PCT,
            "flat_threshold_pct": FLAT_PCT,
            "workers_seen": len(workers_seen),  # > --workers: a worker was replaced
            **memory,
            "samples": sampler.samples,
            "roles": {str(pid): name for pid, name in sampler.seen.items()},
            "pss_mb_end": pss_end,
        },
        "server_log": {
            "tracebacks": log_text.count("Traceback"),
            "worker_timeouts": log_text.count("WORKER TIMEOUT"),
            "errors": sum(" ERROR " in line or "[ERROR]" in line for line in log_text.splitlines()),
        },
        "leftover_processes_killed": killed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    total_5xx = stats["errors_5xx"] + (warm_stats.get("errors_5xx") or 0)
    peaks = {
        f"{row['role']}": row["peak_mb"]
        for row in memory["per_process"].values()
        if row["role"] != "worker"
    }
    worker_peaks = [
        row["peak_mb"] for row in memory["per_process"].values() if row["role"] == "worker"
    ]
    print(
        f"{'+'.join(members)} {size[0]}px T={args.mc_samples}, {args.workers}x{args.threads} "
        f"gunicorn, {args.clients} clients, {args.duration:.0f} s: "
        f"{stats['requests_per_s']:.2f} req/s, {stats['images_per_s']:.2f} images/s, "
        f"p50/p90/p99 {stats['p50_ms']}/{stats['p90_ms']}/{stats['p99_ms']} ms, "
        f"5xx {total_5xx}, other errors {stats['errors_other']}, "
        f"worker RSS peak {worker_peaks} MB, master/trainer {peaks}, "
        f"RSS growth {max_growth}% ({'flat' if result['memory']['flat'] else 'NOT flat'}) "
        f"-> {args.out}"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 1 if total_5xx else 0


if __name__ == "__main__":
    sys.exit(main())
