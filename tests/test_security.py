"""Image URL policy (SSRF), webhook secret, request size limit, and secrets kept out of logs.

The HTTP servers here are real ones on loopback: one plays the Label Studio host, another an
internal service the backend must never reach.
"""

from __future__ import annotations

import base64
import http.server
import io
import logging
import threading
from pathlib import Path

import pytest
from PIL import Image

from backend.app import create_app
from backend.fetch import FetchError, ImageFetcher
from backend.settings import WEBHOOK_SECRET_HEADER, Settings
from backend.url_policy import UrlPolicy, UrlRefused, is_public_address, resolve_host


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


class _Server:
    """A loopback HTTP server that records every request it receives."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append((self.path, dict(self.headers)))
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture()
def internal():
    """An 'internal service' the backend must not be tricked into calling."""
    s = _Server({"/secret.png": (200, {"Content-Type": "image/png"}, _png())})
    yield s
    s.close()


@pytest.fixture()
def label_studio(internal):
    s = _Server(
        {
            "/data/upload/1/a.png": (200, {"Content-Type": "image/png"}, _png()),
            "/redirect-internal": (302, {"Location": f"{internal.url}/secret.png"}, b""),
            "/redirect-local": (302, {"Location": "/data/upload/1/a.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
    )
    yield s
    s.close()


def _fetcher(ls_url: str, allowed: str = "", key: str = "ls-key") -> ImageFetcher:
    settings = Settings(label_studio_url=ls_url, label_studio_api_key=key, fetch_timeout=5.0,
                        allowed_image_hosts=allowed)  # fmt: skip
    return ImageFetcher(settings)


def test_only_the_label_studio_host_is_fetched_by_default(label_studio, internal):
    fetcher = _fetcher(label_studio.url)
    assert fetcher.fetch("/data/upload/1/a.png").size == (40, 30)
    assert fetcher.fetch(f"{label_studio.url}/data/upload/1/a.png").size == (40, 30)
    for url in (
        f"{internal.url}/secret.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:6379/",
        "http://[::1]:22/",
    ):
        with pytest.raises(FetchError, match="neither the Label Studio host nor in ALLOWED"):
            fetcher.fetch(url)
    assert internal.requests == []  # refused before any connection


def test_redirects_are_checked_hop_by_hop_and_the_key_stays_home(label_studio, internal):
    fetcher = _fetcher(label_studio.url)
    assert fetcher.fetch("/redirect-local").size == (40, 30)
    with pytest.raises(FetchError, match="ALLOWED_IMAGE_HOSTS"):
        fetcher.fetch("/redirect-internal")
    assert internal.requests == []
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetcher.fetch("/loop")
    # Allow-listed, the redirect target is fetched, without the Label Studio key.
    allowed = _fetcher(label_studio.url, allowed=internal.url.removeprefix("http://"))
    assert allowed.fetch("/redirect-internal").size == (40, 30)
    ls_headers = dict(label_studio.requests[-1][1])
    internal_headers = internal.requests[-1][1]
    assert ls_headers.get("Authorization") == "Token ls-key"
    assert "Authorization" not in internal_headers


def _resolver(table: dict[str, list[str]]):
    return lambda host, port: table[host]


def test_allow_list_entries():
    policy = UrlPolicy(
        "http://ls:8080",
        ("img.example.org", "*.s3.amazonaws.com", "10.0.0.5:8000", "192.168.7.0/24"),
        _resolver({}),
    )
    allowed = [
        "http://ls:8080/data/upload/1/a.png",
        "https://img.example.org/a.png",
        "https://bucket.s3.amazonaws.com/k?X-Amz-Signature=1",
        "http://10.0.0.5:8000/a.png",
        "http://192.168.7.20/a.png",
    ]
    refused = [
        "http://ls:9090/a.png",  # other port of the Label Studio host
        "https://ls:8080/a.png",  # other scheme
        "https://s3.amazonaws.com/a.png",  # "*.domain" means subdomains only
        "https://evil-img.example.org/a.png",
        "http://10.0.0.5/a.png",  # port 80, not 8000
        "http://192.168.8.1/a.png",
        "http://user:pw@img.example.org/a.png",  # credentials in the URL
        "file:///etc/passwd",
        "gopher://img.example.org/",
    ]
    for url in allowed:
        policy.check(url)
    for url in refused:
        with pytest.raises(UrlRefused):
            policy.check(url)


def test_star_allows_public_hosts_only():
    table = {
        "public.example": ["93.184.216.34"],
        "rebind.example": ["93.184.216.34", "127.0.0.1"],
        "metadata.example": ["169.254.169.254"],
        "v6local.example": ["::1"],
        "mapped.example": ["::ffff:10.0.0.1"],
        "v6public.example": ["2606:4700:4700::1111"],
    }
    policy = UrlPolicy("", ("*",), _resolver(table))
    policy.check("https://public.example/a.png")
    policy.check("https://v6public.example/a.png")
    for host in ("rebind.example", "metadata.example", "v6local.example", "mapped.example"):
        with pytest.raises(UrlRefused, match="non-public address"):
            policy.check(f"https://{host}/a.png")
    # The real resolver: localhost is loopback, refused under "*".
    assert all(not is_public_address(a) for a in resolve_host("localhost", 80))
    with pytest.raises(UrlRefused, match="non-public"):
        UrlPolicy("", ("*",)).check("http://localhost/a.png")


@pytest.fixture()
def model_dir(tmp_path) -> str:
    return str(tmp_path / "models")


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_webhook_secret(model_dir):
    settings = Settings(model_dir=model_dir, webhook_secret="hook-s3cret")
    client = create_app(settings).test_client()
    event = {"action": "START_TRAINING", "project": {"id": 7}}
    assert client.post("/webhook", json=event).status_code == 401
    wrong = client.post("/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: "guess"})
    assert wrong.status_code == 401 and "secret" in wrong.get_json()["error"]
    ok = client.post("/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: "hook-s3cret"})
    assert ok.status_code == 200 and ok.get_json()["status"] == "queued"
    assert client.get("/health").status_code == 200  # other routes: no basic auth configured


def test_webhook_secret_with_basic_auth(model_dir):
    settings = Settings(model_dir=model_dir, webhook_secret="hook-s3cret",
                        basic_auth_user="ls", basic_auth_pass="pw")  # fmt: skip
    client = create_app(settings).test_client()
    event = {"action": "START_TRAINING", "project": {"id": 7}}
    # The secret opens /webhook only; basic auth (the "Start Training" button) opens it too.
    secret = {WEBHOOK_SECRET_HEADER: "hook-s3cret"}
    assert client.post("/webhook", json=event, headers=secret).status_code == 200
    assert client.post("/webhook", json=event, headers=_basic("ls", "pw")).status_code == 200
    assert client.post("/webhook", json=event, headers=_basic("ls", "no")).status_code == 401
    assert client.get("/health", headers=secret).status_code == 401
    assert client.get("/health", headers=_basic("ls", "pw")).status_code == 200


def test_request_bodies_above_the_limit_get_413(model_dir):
    client = create_app(Settings(model_dir=model_dir, max_request_mb=1)).test_client()
    r = client.post("/predict", data=b"{" + b" " * (2 << 20) + b"}",
                    content_type="application/json")  # fmt: skip
    assert r.status_code == 413 and r.get_json()["error"]
    assert client.get("/health").status_code == 200


def test_secrets_never_reach_logs_or_responses(model_dir, label_studio, caplog, tmp_path: Path):
    pat = "eyJhbGciOiJIUzI1NiJ9.eyJzZWNyZXQiOiJwYXQifQ.c2lnbmF0dXJlLXNlY3JldA"
    secrets = [pat, "hook-s3cret", "basic-pw-1", "sig-token-9"]
    settings = Settings(model_dir=model_dir, label_studio_url="http://127.0.0.1:9",
                        label_studio_api_key=pat, webhook_secret="hook-s3cret",
                        basic_auth_user="ls", basic_auth_pass="basic-pw-1")  # fmt: skip
    assert not any(s in repr(settings) for s in secrets)
    client = create_app(settings).test_client()
    auth = _basic("ls", "basic-pw-1")
    config = (Path(__file__).parents[1] / "label_config" / "finding_normal.xml").read_text()
    bodies = []
    with caplog.at_level(logging.DEBUG):
        tasks = [
            {"id": 1, "data": {"image": "/data/upload/1/a.png"}},  # LS unreachable: PAT exchange
            {"id": 2, "data": {"image": f"{label_studio.url}/a.png?token=sig-token-9"}},
            {"id": 3, "data": {"image": "http://10.1.2.3/x.png?X-Amz-Signature=sig-token-9"}},
        ]
        r = client.post("/predict", json={"tasks": tasks, "label_config": config}, headers=auth)
        bodies.append(r.get_data(as_text=True))
        for headers in ({WEBHOOK_SECRET_HEADER: "hook-s3cret-wrong"}, _basic("ls", "basic-pw-1x")):
            r = client.post("/webhook", json={"action": "START_TRAINING"}, headers=headers)
            bodies.append(r.get_data(as_text=True))
        fetcher = ImageFetcher(settings)
        with pytest.raises(FetchError) as info:
            fetcher.fetch("/data/upload/1/a.png")
        bodies.append(str(info.value))
    text = caplog.text + "\n".join(bodies)
    assert "unreachable" in text or "refused" in text  # the errors were produced and logged
    for secret in secrets:
        assert secret not in text, f"{secret[:6]}... leaked"
