"""The Dockerfile's image, run: health, HEALTHCHECK, /predict, a training job, non-root, clean stop.

`make test` builds the image first (`make image`: scripts/container.sh, podman with runc on a
debootstrapped Debian base, the Dockerfile unchanged but for BASE_IMAGE). The container runs on
the host network beside the real Label Studio of the e2e harness, with a model directory mounted
at /data/models, as a user runs it: `camlabel serve` as uid 10001.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from backend.rle import rle_to_mask
from wsl_models.synthetic import blob_image

from .images import png_data_uri
from .ls_harness import free_port
from .progress import wait_while_progressing

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("CAMLABEL_IMAGE", "localhost/camlabel:test")
CONFIG = (ROOT / "label_config" / "finding_normal.xml").read_text()
UID = 10001
LIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")

pytestmark = pytest.mark.skipif(
    os.environ.get("CAMLABEL_SKIP_CONTAINER") == "1", reason="CAMLABEL_SKIP_CONTAINER=1"
)


@functools.cache
def _flags() -> tuple[str, ...]:
    """podman's global flags for this machine, from the script that builds the image."""
    out = subprocess.run([ROOT / "scripts" / "container.sh", "flags"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return tuple(out.split())


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """podman with this machine's global flags; `run` with its explicit limits (the defaults
    exceed this sandbox's)."""
    flags = _flags()
    if args[0] == "run":
        args = ("run", *LIMITS, *args[1:])
    out = subprocess.run(["podman", *flags, *args], capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None or podman("image", "exists", IMAGE, check=False).returncode:
        pytest.fail(f"no image {IMAGE}: run `make image` (make test builds it)")
    return IMAGE


def _container_pid(name: str) -> int:
    return int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip() or 0)


def test_the_image_runs_as_its_own_user_and_keeps_the_healthcheck(image):
    assert podman("run", "--rm", image, "id", "-u").stdout.strip() == str(UID)
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    health = config.get("Healthcheck") or config["Config"].get("Healthcheck")
    assert health["Test"] == ["CMD", "python", "/app/scripts/healthcheck.py"]
    assert config["Config"]["Cmd"] == ["camlabel", "serve"]


def test_the_compose_file_is_valid_for_a_compose_tool(tmp_path):
    """podman-compose reads and resolves it: both services, the GPU one behind its profile."""
    env = {**os.environ, "LABEL_STUDIO_PASSWORD": "x" * 12}
    out = subprocess.run(
        [ROOT / ".venv" / "bin" / "podman-compose", "-f", ROOT / "docker-compose.yml", "config"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = yaml.safe_load(out.stdout)
    assert {"label-studio", "camlabel"} <= set(resolved["services"])
    camlabel = resolved["services"]["camlabel"]
    assert camlabel["environment"]["MODEL_DIR"] == "/data/models"
    assert camlabel["healthcheck"]["test"][-1] == "/app/scripts/healthcheck.py"


def test_serve_predict_train_and_stop_in_the_container(image, label_studio, base_model, tmp_path):
    ls = label_studio
    models = tmp_path / "models"  # the volume: the base model at its root, as documented
    shutil.copytree(base_model, models)
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(models)], check=True)
    port, name = free_port(), f"camlabel-test-{os.getpid()}"
    volumes_before = podman("volume", "ls", "-q").stdout.split()
    env = {
        "PORT": str(port),
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.pat,
        "TRAIN_MEMBERS": "tiny,tiny",
        "TRAIN_IMAGE_SIZE": "96",
        "TRAIN_EPOCHS": "8",
        "TRAIN_LR": "0.003",
        "TRAIN_WEIGHTS": "none",
        "PROMOTE_TOLERANCE": "100",
    }
    if "OMP_NUM_THREADS" in os.environ:  # under `make test`'s two workers: one thread, as outside
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    run = ["run", "-d", "--name", name, "--network", "host", "-v", f"{models}:/data/models"]
    for key, value in env.items():
        run += ["-e", f"{key}={value}"]
    podman(*run, image)
    url = f"http://127.0.0.1:{port}"
    try:
        pid = _container_pid(name)

        def healthy():
            try:
                return requests.get(f"{url}/health", timeout=2).json(), None
            except requests.RequestException as exc:
                return None, type(exc).__name__

        health = wait_while_progressing(healthy, pid, "the container's /health", poll=1.0)
        assert health["status"] == "UP" and health["trained"] is True
        check = podman("healthcheck", "run", name, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        ps = podman("top", name, "user", "args").stdout
        assert "gunicorn" in ps and "root" not in ps, ps

        # /predict: brush regions from the mounted model, for a task as Label Studio sends it.
        rng = np.random.default_rng(11)
        findings = [blob_image(rng, (96, 96), 1) for _ in range(6)]
        body = {"tasks": [{"id": i, "data": {"image": png_data_uri(img)}} for i, (img, _) in
                          enumerate(findings)], "label_config": CONFIG}  # fmt: skip
        answer = requests.post(f"{url}/predict", json=body, timeout=300).json()
        ious = []
        for result, (_, truth) in zip(answer["results"], findings, strict=True):
            brush = {r["type"]: r for r in result["result"]}.get("brushlabels")
            mask = rle_to_mask(brush["value"]["rle"], 96, 96) if brush else np.zeros_like(truth)
            ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
        assert np.mean(ious) >= 0.4, (ious, answer)

        # A training job inside the container, on a real Label Studio project's annotations.
        project = ls.api(
            "POST", "/api/projects", json={"title": "container", "label_config": CONFIG}
        )
        assert project.status_code == 201, project.text
        pid_ls = project.json()["id"]
        rng, files = np.random.default_rng(12), {}
        for i in range(8):
            label = "finding" if i % 2 == 0 else "normal"
            pixels, _ = blob_image(rng, (96, 96), 1 if label == "finding" else 0)
            path = tmp_path / f"c{i}_{label}.png"
            Image.fromarray(pixels).save(path)
            files[path.name] = (path.name, path.open("rb"), "image/png")
        assert ls.api("POST", f"/api/projects/{pid_ls}/import", files=files).status_code == 201
        tasks = ls.api("GET", "/api/tasks", params={"project": pid_ls}).json()["tasks"]
        connect = podman("exec", name, "camlabel", "connect", "--project", str(pid_ls),
                         "--backend-url", url, check=False)  # fmt: skip
        assert connect.returncode == 0, connect.stderr[-2000:]
        for task in tasks:
            label = "finding" if "finding" in task["data"]["image"] else "normal"
            choice = {"from_name": "diagnosis", "to_name": "image", "type": "choices",
                      "value": {"choices": [label]}}  # fmt: skip
            r = ls.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [choice]})
            assert r.status_code == 201, r.text
        (ml,) = ls.api("GET", "/api/ml", params={"project": pid_ls}).json()
        assert ls.api("POST", f"/api/ml/{ml['id']}/train").status_code in (200, 201)

        def trained():
            job = requests.get(f"{url}/health", timeout=10).json()["jobs"].get(str(pid_ls), {})
            if job.get("state") == "failed":
                raise AssertionError(f"the job failed in the container: {job}")
            return (job["version"] if job.get("state") == "done" else None), job.get("state")

        version = wait_while_progressing(trained, pid, "training in the container", poll=2.0)
        line = models / "projects" / str(pid_ls)
        assert (line / "versions" / version / "manifest.json").is_file()  # on the volume
        assert {p.stat().st_uid for p in line.rglob("*")} == {UID}
    finally:
        logs = podman("logs", name, check=False).stdout[-3000:]
        podman("stop", "-t", "70", name, check=False, timeout=120)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, logs  # gunicorn and the worker stopped on SIGTERM, cleanly
    podman("rm", name)
    assert not Path(f"/proc/{pid}").exists()
    assert podman("ps", "-a", "--filter", f"name={name}", "-q").stdout.strip() == ""
    assert podman("volume", "ls", "-q").stdout.split() == volumes_before
