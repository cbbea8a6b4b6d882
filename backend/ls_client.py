"""The one Label Studio client: authentication and JSON calls, for every caller.

Label Studio 1.23 refuses legacy tokens by default; a personal access token (a JWT refresh
token) is exchanged for a short-lived access token at /api/token/refresh/, and again when a
call answers 401 (the access token expired). The image fetcher takes only the header from
here (and sends it only to Label Studio's host), the trainer's API and the local Label Studio
harness make their calls through ``request``.

Why not label-studio-sdk's client for this: its PAT refresh is reachable only through private
attributes, and its typed calls return pydantic models where our code passes tasks on to
/predict as Label Studio sends them; the SDK stays our reference for brush RLE and label
configs.
"""

from __future__ import annotations

import threading
from typing import Any

import requests


class LabelStudioAuthError(ValueError):
    """Label Studio is unreachable or refused the key; the message carries no secret."""


def is_personal_access_token(key: str) -> bool:
    return key.count(".") == 2 and key.startswith("ey")


class LabelStudioClient:
    def __init__(self, url: str, key: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._access: str | None = None
        self._lock = threading.Lock()
        self._session = requests.Session()

    def header(self, refresh: bool = False) -> dict[str, str]:
        """The Authorization header; ``refresh`` exchanges the PAT again."""
        if not self.key:
            return {}
        if not is_personal_access_token(self.key):
            return {"Authorization": f"Token {self.key}"}
        with self._lock:
            if self._access is None or refresh:
                self._access = self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """``path`` below the server's URL; one retry with a fresh access token on 401."""
        kw.setdefault("timeout", self.timeout)
        url = self.url + path
        r = self._session.request(method, url, headers=self.header(), **kw)
        if r.status_code == 401 and is_personal_access_token(self.key):
            r = self._session.request(method, url, headers=self.header(refresh=True), **kw)
        return r

    def _exchange(self) -> str:
        try:
            r = requests.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.key}, timeout=10
            )
        except requests.RequestException as exc:
            raise LabelStudioAuthError(f"Label Studio at {self.url} is unreachable: {exc}") from exc
        access = r.json().get("access") if r.status_code == 200 else None
        if not access:
            raise LabelStudioAuthError(
                f"Label Studio refused the personal access token (HTTP {r.status_code})"
            )
        return access
