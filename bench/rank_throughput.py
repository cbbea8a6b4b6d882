"""Ranking a large project: `backend.ranking.rank_project` against a real Label Studio.

    python bench/rank_throughput.py --tasks 10000 --out bench/results/rank_throughput.json

Starts Label Studio 1.23 on loopback (tests.ls_harness.LabelStudio: own SQLite database in a
temporary folder, personal access token), creates a project with
label_config/finding_normal.xml and imports --tasks tasks in bulk (JSON lists of
--import-chunk tasks to POST /api/projects/{id}/import). Their data.image URLs point to an image
server on loopback (`python -m http.server`, a separate process so that it does not share this
process's CPU time or GIL), which serves --images generated PNGs (wsl_models.synthetic.
blob_image) as /img/00042.png; its host:port is the ALLOWED_IMAGE_HOSTS entry. A model version
with random weights is saved (default two "tiny" members at 96 px: the point is the pipeline
around the model; pass --members efficientnet_lite0,... for a production-sized one).

Then rank_project(settings, project, ...) runs in this process, as `camlabel rank` does, while a
thread samples this process's RSS (and Label Studio's) every 0.5 s. Reported: images/s
(report.images_per_second) and wall time, ranked/failed, where the time went (Label Studio API
calls, image downloads, the rest = inference + masks + RLE), CPU seconds of this process and of
Label Studio, RSS at start, peak, end and its growth from the first 10 % of the ranking to the
last 10 %. Afterwards the Label Studio API must show exactly one prediction of the version per
task (model-versions counter and each task's total_predictions), the project's model_version
and "Uncertainty sampling"; the script exits 1 otherwise or if any task failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import cpu_s, loadavg, machine, rss_mb  # noqa: E402
from speed import make_ensemble  # noqa: E402

from backend import fetch as fetch_module  # noqa: E402
from backend.local_label_studio import LabelStudio, free_port, wait_http  # noqa: E402
from backend.ls_api import LabelStudioAPI  # noqa: E402
from backend.ranking import SAMPLING, rank_project  # noqa: E402
from backend.settings import Settings  # noqa: E402
from wsl_models.images import parse_size  # noqa: E402
from wsl_models.synthetic import blob_image  # noqa: E402
from wsl_models.versions import ModelStore  # noqa: E402

CONFIG = (ROOT / "label_config" / "finding_normal.xml").read_text()
CLASSES = ["finding", "normal"]  # the project's Choices, so predictions carry a choice


# ------------------------------------------------------------------------------------ helpers


def make_images(folder: Path, count: int, px: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, _ = blob_image(rng, (px, px), int(rng.integers(0, 3)))
        Image.fromarray(img).save(folder / f"{i:05d}.png")


class RSSSampler(threading.Thread):
    def __init__(self, other: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.other, self.every = other, every
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float, float | None]] = []  # (t, self MB, other MB)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter() - self.t0
            other = rss_mb(self.other)
            self.samples.append((round(t, 2), round(rss_mb(), 1), other and round(other, 1)))
            self.stop.wait(self.every)


class TimedAPI(LabelStudioAPI):
    """LabelStudioAPI that adds up the wall time of each kind of call."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def call(self, method: str, path: str, **kw):
        kind = f"{method} " + "/".join("{id}" if p.isdigit() else p for p in path.split("/"))
        t0 = time.perf_counter()
        try:
            return super().call(method, path, **kw)
        finally:
            self.seconds[kind] += time.perf_counter() - t0
            self.calls[kind] += 1


def time_fetches() -> dict[str, float]:
    """Wrap ImageFetcher.fetch (this process only) to add up download + decode time."""
    totals = {"seconds": 0.0, "images": 0}
    original = fetch_module.ImageFetcher.fetch

    def fetch(self, url):
        t0 = time.perf_counter()
        try:
            return original(self, url)
        finally:
            totals["seconds"] += time.perf_counter() - t0
            totals["images"] += 1

    fetch_module.ImageFetcher.fetch = fetch
    return totals


def window_mean(samples: list[tuple], col: int, t0: float, t1: float) -> float | None:
    vals = [s[col] for s in samples if t0 <= s[0] <= t1 and s[col] is not None]
    return float(np.mean(vals)) if vals else None


def rss_summary(samples: list[tuple], col: int, t0: float, t1: float) -> dict:
    during = [s[col] for s in samples if t0 <= s[0] <= t1 and s[col] is not None]
    tenth = max((t1 - t0) / 10, 0.5)  # at least one sample
    first = window_mean(samples, col, t0, t0 + tenth)
    last = window_mean(samples, col, t1 - tenth, t1)
    return {
        "start_mb": during[0] if during else None,
        "peak_mb": max(during) if during else None,
        "end_mb": during[-1] if during else None,
        "first_10pct_mb": round(first, 1) if first else None,
        "last_10pct_mb": round(last, 1) if last else None,
        "growth_pct": round(100 * (last / first - 1), 2) if first and last else None,
    }


# ------------------------------------------------------------------------------- Label Studio
def import_tasks(ls: LabelStudio, pid: int, urls: list[str], chunk: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(urls), chunk):
        body = [{"data": {"image": u}} for u in urls[start : start + chunk]]
        r = ls.api("POST", f"/api/projects/{pid}/import", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"import failed: HTTP {r.status_code} {r.text[:300]}")
    return time.perf_counter() - t0


def verify(ls: LabelStudio, pid: int, version: str, n_tasks: int) -> dict:
    counts = ls.api("GET", f"/api/projects/{pid}/model-versions/").json()
    project = ls.api("GET", f"/api/projects/{pid}").json()
    per_task: dict[int, int] = defaultdict(int)  # total_predictions -> tasks
    seen, page = 0, 1
    while True:
        r = ls.api("GET", "/api/tasks", params={"project": pid, "page": page, "page_size": 1000})
        if r.status_code == 404:  # past the last page
            break
        tasks = r.json().get("tasks", [])
        for t in tasks:
            per_task[int(t.get("total_predictions") or 0)] += 1
        seen += len(tasks)
        if len(tasks) < 1000:
            break
        page += 1
    out = {
        "tasks_in_project": project.get("task_number"),
        "tasks_listed": seen,
        "predictions_of_version": counts.get(version, 0),
        "model_versions": counts,
        "tasks_by_prediction_count": {str(k): v for k, v in sorted(per_task.items())},
        "project_model_version": project.get("model_version"),
        "project_sampling": project.get("sampling"),
    }
    out["ok"] = (
        out["predictions_of_version"] == n_tasks
        and per_task.get(1, 0) == n_tasks
        and project.get("task_number") == n_tasks
        and project.get("model_version") == version
        and project.get("sampling") == SAMPLING
    )
    return out


# --------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/rank_throughput.json")
    p.add_argument("--tasks", type=int, default=10000)
    p.add_argument("--images", type=int, default=300, help="distinct PNGs the tasks cycle over")
    p.add_argument("--image-px", type=int, default=256, help="side of the served PNGs")
    p.add_argument("--import-chunk", type=int, default=1000, help="tasks per import request")
    p.add_argument("--members", default="tiny,tiny")
    p.add_argument("--image-size", default="96", help="model input, '96' or 'WxH'")
    p.add_argument("--mc-samples", type=int, default=30)
    p.add_argument("--page-size", type=int, default=100, help="rank_project page_size")
    p.add_argument("--predict-batch", type=int, default=8, help="PREDICT_BATCH")
    p.add_argument("--acquisition", default="entropy")
    p.add_argument("--diversity", type=int, default=0, help="RANK_DIVERSITY (0: off)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    members = [m for m in args.members.split(",") if m]
    size = parse_size(args.image_size)
    work = Path(tempfile.mkdtemp(prefix="camlabel-rank-"))
    ls = LabelStudio(work / "ls")
    images: subprocess.Popen | None = None
    phases: dict[str, float] = {}
    load_before = loadavg()
    try:
        t0 = time.perf_counter()
        make_images(work / "www" / "img", args.images, args.image_px)
        port = free_port()
        images = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(work / "www")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        host = f"127.0.0.1:{port}"
        wait_http(f"http://{host}/img/00000.png", 60, images)
        model_dir = work / "models"
        ModelStore(str(model_dir)).save(make_ensemble(members, size, args.mc_samples, CLASSES), {})
        phases["images_and_model_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ls.start()
        phases["label_studio_start_s"] = time.perf_counter() - t0
        r = ls.api("POST", "/api/projects", json={"title": "rank bench", "label_config": CONFIG})
        r.raise_for_status()
        pid = r.json()["id"]
        urls = [f"http://{host}/img/{i % args.images:05d}.png" for i in range(args.tasks)]
        phases["import_s"] = import_tasks(ls, pid, urls, args.import_chunk)
        print(f"{args.tasks} tasks imported in {phases['import_s']:.1f} s", flush=True)

        settings = Settings(
            model_dir=str(model_dir),
            label_studio_url=ls.url,
            label_studio_api_key=ls.pat,
            allowed_image_hosts=host,
            predict_batch=args.predict_batch,
        )
        api = TimedAPI(settings)
        fetched = time_fetches()
        ls_pid = ls.proc.pid
        sampler = RSSSampler(ls_pid)
        sampler.start()
        time.sleep(1.0)  # a baseline sample or two
        cpu0, ls_cpu0 = os.times(), cpu_s(ls_pid)
        r0 = time.perf_counter() - sampler.t0
        report = rank_project(
            settings, pid, args.acquisition, args.diversity, args.page_size,
            progress=False, api=api,
        )  # fmt: skip
        r1 = time.perf_counter() - sampler.t0
        cpu1, ls_cpu1 = os.times(), cpu_s(ls_pid)
        time.sleep(1.0)
        sampler.stop.set()
        sampler.join()

        check = verify(ls, pid, report.model_version, args.tasks)
        api_s = sum(api.seconds.values())
        own_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        result = {
            "machine": machine(),
            "loadavg_before": load_before,
            "config": {
                "tasks": args.tasks,
                "distinct_images": args.images,
                "served_image_px": args.image_px,
                "members": members,
                "image_size": list(size),
                "mc_samples": args.mc_samples,
                "page_size": args.page_size,
                "predict_batch": args.predict_batch,
                "acquisition": args.acquisition,
                "diversity": args.diversity,
                "import_chunk": args.import_chunk,
            },
            "phases": {k: round(v, 2) for k, v in phases.items()},
            "rank": {
                "images_per_second": round(report.images_per_second, 3),
                "seconds": round(report.seconds, 2),
                "wall_s": round(r1 - r0, 2),
                "tasks": report.tasks,
                "ranked": report.ranked,
                "failed": report.failed,
                "model_version": report.model_version,
                "view_id": report.view_id,
            },
            "time_split_s": {
                "label_studio_api": round(api_s, 2),
                "image_fetch": round(fetched["seconds"], 2),
                "inference_masks_rle_other": round(report.seconds - api_s - fetched["seconds"], 2),
                "api_calls": {
                    k: {"calls": api.calls[k], "seconds": round(v, 2)}
                    for k, v in sorted(api.seconds.items(), key=lambda kv: -kv[1])
                },
            },
            "cpu_s": {
                "this_process": round(own_cpu, 2),
                "label_studio": round(ls_cpu1 - ls_cpu0, 2),
            },
            "rss": {
                "this_process": rss_summary(sampler.samples, 1, r0, r1),
                "label_studio": rss_summary(sampler.samples, 2, r0, r1),
                "interval_s": sampler.every,
                "rank_window_s": [round(r0, 2), round(r1, 2)],
                "samples_t_self_ls_mb": sampler.samples,
            },
            "verification": check,
            "loadavg_after": loadavg(),
        }
    finally:
        ls.stop()
        if images is not None:
            images.terminate()
            images.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    rss = result["rss"]["this_process"]
    split = result["time_split_s"]
    print(
        f"{report.ranked}/{report.tasks} tasks ranked ({report.failed} failed) with "
        f"{'+'.join(members)} {size[0]}px T={args.mc_samples} in {report.seconds:.1f} s: "
        f"{report.images_per_second:.2f} images/s (LS API {split['label_studio_api']:.1f} s, "
        f"fetch {split['image_fetch']:.1f} s, rest {split['inference_masks_rle_other']:.1f} s); "
        f"RSS start/peak/end {rss['start_mb']}/{rss['peak_mb']}/{rss['end_mb']} MB, "
        f"growth {rss['growth_pct']}%; verification {'OK' if check['ok'] else 'FAILED'} "
        f"({check['predictions_of_version']} predictions of {report.model_version}) -> {args.out}"
    )
    return 0 if check["ok"] and report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
