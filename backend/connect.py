"""Connect the backend to a Label Studio project, with its basic auth and webhook secret.

Label Studio creates the backend's webhook itself when the backend is connected, but without
headers; with WEBHOOK_SECRET set the backend refuses that webhook until the secret header is
added to it. Doing both here keeps a secured deployment one command away.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ls_api import LabelStudioAPI, TrainingError
from .settings import WEBHOOK_SECRET_HEADER, Settings

SSRF_HINT = (
    "Label Studio refuses backends on loopback or private networks by default: start it with "
    "ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false"
)


@dataclass(frozen=True)
class Connection:
    project: int
    ml_backend: int
    webhook: int
    secured: bool
    interactive: bool = False


def connect_project(
    settings: Settings,
    project_id: int,
    backend_url: str,
    title: str = "camlabel",
    interactive: bool = False,
) -> Connection:
    """Create (or update) the project's ML backend at ``backend_url`` and secure its webhook.

    ``interactive``: Label Studio's "Interactive preannotations" switch: smart tools
    (smart="true" rectangles and keypoints, label_config/interactive.xml) then ask the backend
    to re-segment."""
    api = LabelStudioAPI(settings)
    url = backend_url.rstrip("/")
    body: dict = {"project": project_id, "url": url, "title": title,
                  "is_interactive": interactive}  # fmt: skip
    if settings.basic_auth_user:
        body |= {
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": settings.basic_auth_user,
            "basic_auth_pass": settings.basic_auth_pass,
        }
    existing = [m for m in api.ml_backends(project_id) if m["url"].rstrip("/") == url]
    try:
        if existing:
            ml = api.call("PATCH", f"/api/ml/{existing[0]['id']}", json=body)
        else:
            ml = api.call("POST", "/api/ml", json=body)
    except TrainingError as exc:
        hint = f" ({SSRF_HINT})" if "403" in str(exc) else ""
        raise TrainingError(
            f"connecting {url} to project {project_id} failed: {exc}{hint}"
        ) from exc
    hooks = [h for h in api.webhooks(project_id) if h["url"].rstrip("/") == f"{url}/webhook"]
    if not hooks:
        raise TrainingError(f"Label Studio created no webhook for {url}: {SSRF_HINT}")
    hook = hooks[0]
    if settings.webhook_secret:
        headers = {**(hook.get("headers") or {}), WEBHOOK_SECRET_HEADER: settings.webhook_secret}
        api.call("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": headers})
    return Connection(project_id, int(ml["id"]), int(hook["id"]), bool(settings.webhook_secret),
                      bool(ml.get("is_interactive", interactive)))  # fmt: skip
