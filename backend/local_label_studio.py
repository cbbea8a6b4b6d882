"""Start a real Label Studio 1.23 (its own venv, SQLite, loopback) and get a personal access token.

Used by `camlabel demo` and by the end-to-end tests. Label Studio runs from `.lsvenv` (made by
`make labelstudio`) or from LABEL_STUDIO_BIN, with the settings a backend on loopback needs
(ML_BLOCK_LOCAL_IP=false, SSRF_PROTECTION_ENABLED=false). Legacy `Token` auth is left
disabled (the 1.23 default): we log in like a browser, create a personal access token (a JWT
refresh token), and API calls exchange it for a short-lived access token, as the backend does.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import requests

from .ls_client import LabelStudioClient

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("LABEL_STUDIO_BIN", ROOT / ".lsvenv" / "bin" / "label-studio"))
EMAIL, PASSWORD = "admin@example.com", "camlabel-test-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


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


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def login_session(url: str, email: str = EMAIL, password: str = PASSWORD) -> requests.Session:
    """A requests session logged in like a browser (Django session + csrftoken cookies)."""
    s = requests.Session()
    page = s.get(f"{url}/user/login/", timeout=10)
    token = s.cookies.get("csrftoken") or re.search(
        r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text
    ).group(1)
    r = s.post(
        f"{url}/user/login/",
        data={"email": email, "password": password, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{url}/user/login/"},
        timeout=10,
    )
    if "sessionid" not in s.cookies:
        raise RuntimeError(f"could not log in to {url} as {email}: HTTP {r.status_code}")
    return s


class LabelStudio:
    """One Label Studio server: ``LabelStudio(workdir).start()``, ``.api(...)``, ``.stop()``.

    ``port=None`` picks a free port. ``detach=True`` starts it in its own session, so a Ctrl-C
    in the terminal reaches only our process, which then stops it in order.
    """

    def __init__(self, workdir: Path, port: int | None = None, detach: bool = False) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files_root = self.workdir / "files"
        self.files_root.mkdir(parents=True, exist_ok=True)
        self.detach = detach
        self.log_path = self.workdir / "label-studio.log"
        self.proc: subprocess.Popen | None = None
        self.pat: str | None = None
        self._client: LabelStudioClient | None = None

    def start(
        self,
        timeout: float = 300,
        wait: Callable[[str, subprocess.Popen], None] | None = None,
    ) -> LabelStudio:
        """Start and wait for /health: ``timeout`` seconds, or however ``wait(url, proc)``
        waits (the tests wait while the server progresses, not for a fixed time)."""
        if not LS_BIN.exists():
            raise FileNotFoundError(
                f"Label Studio not installed at {LS_BIN}: run `make labelstudio` "
                "(or set LABEL_STUDIO_BIN)"
            )
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
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [str(LS_BIN), "start", "--no-browser", "--port", str(self.port),
                 "--host", self.url],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=self.detach,
            )  # fmt: skip
        try:
            if wait is None:
                wait_http(f"{self.url}/health", timeout, self.proc)
            else:
                wait(f"{self.url}/health", self.proc)
            self.pat = self._create_pat()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def login(self) -> requests.Session:
        return login_session(self.url)

    def _create_pat(self) -> str:
        s = self.login()
        r = s.post(
            f"{self.url}/api/token/",
            headers={"X-CSRFToken": s.cookies.get("csrftoken"), "Referer": self.url},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["token"]

    # ---------------------------------------------------------------- API with the PAT
    def api(self, method: str, path: str, **kw) -> requests.Response:
        if self._client is None:
            self._client = LabelStudioClient(self.url, self.pat, timeout=120)
        return self._client.request(method, path, **kw)
