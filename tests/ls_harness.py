"""Start a real Label Studio 1.23 (own venv, SQLite, loopback) and get a personal access token.

Legacy `Token` auth is left disabled (the 1.23 default): the harness logs in like a browser,
creates a personal access token (a JWT refresh token), and API calls exchange it for a
short-lived access token, as the backend does.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("LABEL_STUDIO_BIN", ROOT / ".lsvenv" / "bin" / "label-studio"))
EMAIL, PASSWORD = "admin@example.com", "camlabel-test-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class LabelStudio:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files_root = workdir / "files"
        self.files_root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.pat: str | None = None
        self._access: str | None = None

    def start(self) -> LabelStudio:
        env = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.workdir / "data"),
            "LABEL_STUDIO_USERNAME": EMAIL,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "ML_BLOCK_LOCAL_IP": "false",  # the backend is on loopback
            "SSRF_PROTECTION_ENABLED": "false",  # ... and so is its webhook
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.files_root),
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        }
        for key in ("USERNAME", "PASSWORD"):  # LS also reads these plain names
            env.pop(key, None)
        log = (self.workdir / "label-studio.log").open("w")
        self.proc = subprocess.Popen(
            [str(LS_BIN), "start", "--no-browser", "--port", str(self.port),
             "--host", self.url],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http(f"{self.url}/health", 180, self.proc)
        self.pat = self._create_pat()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _create_pat(self) -> str:
        s = requests.Session()
        page = s.get(f"{self.url}/user/login/", timeout=10)
        token = s.cookies.get("csrftoken") or re.search(
            r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text
        ).group(1)
        s.post(
            f"{self.url}/user/login/",
            data={"email": EMAIL, "password": PASSWORD, "csrfmiddlewaretoken": token},
            headers={"Referer": f"{self.url}/user/login/"},
            timeout=10,
        )
        r = s.post(
            f"{self.url}/api/token/",
            headers={"X-CSRFToken": s.cookies.get("csrftoken"), "Referer": self.url},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["token"]

    # ---------------------------------------------------------------- API with the PAT
    def _headers(self, refresh: bool = False) -> dict[str, str]:
        if self._access is None or refresh:
            r = requests.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.pat}, timeout=10
            )
            r.raise_for_status()
            self._access = r.json()["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def api(self, method: str, path: str, **kw) -> requests.Response:
        r = requests.request(method, self.url + path, headers=self._headers(), timeout=120, **kw)
        if r.status_code == 401:
            r = requests.request(
                method, self.url + path, headers=self._headers(refresh=True), timeout=120, **kw
            )
        return r
