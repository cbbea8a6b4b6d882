"""The Docker HEALTHCHECK: exit 0 when the backend's GET /health answers 200 with status UP.

Standard library only. Reads the variables the server reads: HOST, PORT (default 9090) and,
when basic auth is on, BASIC_AUTH_USER / BASIC_AUTH_PASS (every route needs them, /health too).
An untrained backend is healthy: it serves and answers predictions without regions.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request


def health_url() -> str:
    host = os.environ.get("HOST", "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):  # bound to every interface: ask over loopback
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("PORT", "").strip() or "9090"
    return f"http://{host}:{port}/health"


def main() -> int:
    request = urllib.request.Request(health_url())
    user = os.environ.get("BASIC_AUTH_USER", "").strip()
    if user:
        password = os.environ.get("BASIC_AUTH_PASS", "").strip()
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status = json.load(response).get("status")
    except Exception as exc:  # any failure is "unhealthy", with one line for `docker inspect`
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if status != "UP":
        print(f"unhealthy: status {status!r}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
