"""Fetching task images: Label Studio uploads and local files, http(s) URLs, data: URIs.

Label Studio 1.23 refuses legacy tokens by default; a personal access token (a JWT refresh
token) must first be exchanged for an access token at /api/token/refresh/. The key is only sent
to the Label Studio host, never to other hosts.
"""

from __future__ import annotations

import base64
import logging
import threading
from urllib.parse import urljoin

import requests
from PIL import Image

from wsl_models.images import ImageError, open_image

from .settings import Settings
from .url_policy import UrlPolicy, UrlRefused

log = logging.getLogger(__name__)


class FetchError(ValueError):
    """An image that could not be fetched; the message is safe to show (no secrets)."""


def is_personal_access_token(key: str) -> bool:
    return key.count(".") == 2 and key.startswith("ey")


class LabelStudioAuth:
    """Authorization header for Label Studio, exchanging a PAT for an access token once."""

    def __init__(self, url: str, key: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._access: str | None = None
        self._lock = threading.Lock()

    def header(self, refresh: bool = False) -> dict[str, str]:
        if not self.key:
            return {}
        if not is_personal_access_token(self.key):
            return {"Authorization": f"Token {self.key}"}
        with self._lock:
            if self._access is None or refresh:
                self._access = self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self) -> str:
        try:
            r = requests.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.key}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise FetchError(f"Label Studio at {self.url} is unreachable: {exc}") from exc
        if r.status_code != 200 or "access" not in r.json():
            raise FetchError(
                f"Label Studio refused the personal access token (HTTP {r.status_code})"
            )
        return r.json()["access"]


MAX_REDIRECTS = 3


class ImageFetcher:
    def __init__(self, settings: Settings, policy: UrlPolicy | None = None) -> None:
        self.settings = settings
        self.auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc credentials from the environment
        self.policy = policy or UrlPolicy.from_settings(
            settings.label_studio_url, settings.allowed_image_hosts
        )

    def resolve(self, url: str) -> str:
        """Relative Label Studio paths (/data/upload/..., /data/local-files/?d=...) -> absolute."""
        if url.startswith("/"):
            if not self.settings.label_studio_url:
                raise FetchError(f"relative image URL {url!r} needs LABEL_STUDIO_URL to be set")
            return urljoin(self.settings.label_studio_url + "/", url.lstrip("/"))
        return url

    def fetch(self, url: str) -> Image.Image:
        if not isinstance(url, str) or not url:
            raise FetchError("the image field is empty or not a string")
        if url.startswith("data:"):
            return self._decode(_data_uri_bytes(url), "data: URI")
        # The URL policy (checked in _open) refuses other schemes, hosts and credentials.
        return self._decode(self._download(self.resolve(url)), url)

    def _open(self, url: str) -> requests.Response:
        """GET with the policy checked on the URL and on every redirect it leads to; the Label
        Studio key goes only to the Label Studio host (cloud storage answers with a redirect)."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                self.policy.check(url)
            except UrlRefused as exc:
                log.warning("refused image URL %s: %s", _short(url), exc)
                raise FetchError(f"{_short(url)}: {exc}") from exc
            to_ls = self.policy.is_label_studio(url)
            headers = self.auth.header() if to_ls else {}
            response = self._get(url, headers)
            if response.status_code == 401 and to_ls and headers:
                response.close()
                response = self._get(url, self.auth.header(refresh=True))
            if not response.is_redirect:
                return response
            target = response.headers.get("Location", "")
            response.close()
            url = urljoin(url, target)
        raise FetchError(f"image URL {_short(url)}: more than {MAX_REDIRECTS} redirects")

    def _download(self, url: str) -> bytes:
        with self._open(url) as response:
            if response.status_code != 200:
                raise FetchError(f"image URL {_short(url)} answered HTTP {response.status_code}")
            limit = self.settings.max_download_mb * 1024 * 1024
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > limit:
                raise FetchError(f"image at {_short(url)} is {declared} bytes, above {limit}")
            chunks, size = [], 0
            for chunk in response.iter_content(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"image at {_short(url)} is larger than {limit} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(
                url,
                headers=headers,
                timeout=self.settings.fetch_timeout,
                stream=True,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise FetchError(f"image URL {_short(url)} timed out") from exc
        except requests.RequestException as exc:
            raise FetchError(
                f"image URL {_short(url)} is unreachable ({type(exc).__name__})"
            ) from exc

    def _decode(self, data: bytes, name: str) -> Image.Image:
        try:
            return open_image(data, self.settings.max_image_pixels)
        except ImageError as exc:
            raise FetchError(f"{_short(name)}: {str(exc).removeprefix('<bytes>: ')}") from exc


def _data_uri_bytes(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise FetchError("only base64 data: URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise FetchError("the data: URI is not valid base64") from exc


def _short(url: str) -> str:
    """A URL for messages: no query string (it may carry a signature or token)."""
    return url.split("?", 1)[0][:200] if not url.startswith("/data/local-files") else url[:200]
