"""Fetching task images: Label Studio uploads and local files, http(s) URLs, data: URIs.

The Label Studio key (ls_client.py turns it into a header) is only sent to the Label Studio
host, never to other hosts.
"""

from __future__ import annotations

import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from urllib.parse import urljoin

import requests
from PIL import Image

from wsl_models.images import ImageError, open_image

from .ls_client import LabelStudioAuthError, LabelStudioClient
from .settings import Settings
from .url_policy import UrlPolicy, UrlRefused

log = logging.getLogger(__name__)


class FetchError(ValueError):
    """An image that could not be fetched; the message is safe to show (no secrets)."""


MAX_REDIRECTS = 3


class ImageFetcher:
    def __init__(self, settings: Settings, policy: UrlPolicy | None = None) -> None:
        self.settings = settings
        self.label_studio = LabelStudioClient(
            settings.label_studio_url, settings.label_studio_api_key
        )
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc credentials from the environment
        self.policy = policy or UrlPolicy.from_settings(
            settings.label_studio_url, settings.allowed_image_hosts
        )
        self._pool = ThreadPoolExecutor(
            max(1, settings.fetch_threads), thread_name_prefix="camlabel-fetch"
        )

    def fetch_all(self, urls: list[str], deadline: float) -> list[Image.Image | FetchError]:
        """Fetch in parallel; what is not in by ``deadline`` (time.monotonic()) gets its own
        FetchError, so one slow host cannot push a whole /predict past Label Studio's 100 s."""
        futures = [self._pool.submit(self.fetch, url) for url in urls]
        done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        out: list[Image.Image | FetchError] = []
        for url, future in zip(urls, futures, strict=True):
            if future not in done:
                future.cancel()  # a download already running ends at its own FETCH_TIMEOUT
                out.append(FetchError(f"{_short(str(url))}: not fetched within this request's "
                                      f"deadline (FETCH_DEADLINE {self.settings.fetch_deadline:g} s)"))  # fmt: skip
            elif future.exception() is None:
                out.append(future.result())
            elif isinstance(future.exception(), FetchError):
                out.append(future.exception())
            else:  # a bug, not the image: logged with its trace, reported for this task only
                exc = future.exception()
                log.error("fetching %s failed", _short(str(url)), exc_info=exc)
                out.append(FetchError(f"{_short(str(url))}: {type(exc).__name__}: {exc}"))
        return out

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
            headers = self._label_studio_header() if to_ls else {}
            response = self._get(url, headers)
            if response.status_code == 401 and to_ls and headers:
                response.close()
                response = self._get(url, self._label_studio_header(refresh=True))
            if not response.is_redirect:
                return response
            target = response.headers.get("Location", "")
            response.close()
            url = urljoin(url, target)
        raise FetchError(f"image URL {_short(url)}: more than {MAX_REDIRECTS} redirects")

    def _label_studio_header(self, refresh: bool = False) -> dict[str, str]:
        try:
            return self.label_studio.header(refresh)
        except LabelStudioAuthError as exc:
            raise FetchError(str(exc)) from exc

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
