"""The few Label Studio endpoints the backend calls itself (verified against 1.23.2)."""

from __future__ import annotations

from typing import Any

from .ls_client import LabelStudioAuthError, LabelStudioClient
from .settings import Settings


class TrainingError(RuntimeError):
    """A Label Studio call or a training step failed; the message says which."""


class LabelStudioAPI:
    """The few Label Studio endpoints the trainer needs (verified against 1.23.2)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise TrainingError("training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        self.url = settings.label_studio_url
        self.client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.client.request(method, path, **kw)
        except (LabelStudioAuthError, OSError) as exc:  # requests' errors are OSErrors
            raise TrainingError(f"Label Studio {method} {path}: {exc}") from exc
        if r.status_code >= 400:
            raise TrainingError(
                f"Label Studio {method} {path}: HTTP {r.status_code} {r.text[:200]}"
            )
        return r.json() if r.content else None  # DELETE answers 204 with no body

    def project(self, project_id: int) -> dict:
        return self.call("GET", f"/api/projects/{project_id}")

    def annotated_tasks(self, project_id: int) -> list[dict]:
        return self.call("GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON"})

    def task_pages(self, project_id: int, page_size: int = 100):
        """The project's tasks, a page at a time. Label Studio answers the page after the last
        with 404 "Invalid page", so the total it reports ends the loop (a 404 too, should the
        project shrink meanwhile)."""
        page, seen = 1, 0
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size}
            try:
                body = self.call("GET", "/api/tasks", params=params)
            except TrainingError as exc:
                if page > 1 and "HTTP 404" in str(exc):
                    return
                raise
            tasks = body.get("tasks", [])
            seen += len(tasks)
            if tasks:
                yield tasks
            total = body.get("total")
            if len(tasks) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def import_predictions(self, project_id: int, predictions: list[dict]) -> None:
        self.call("POST", f"/api/projects/{project_id}/import/predictions", json=predictions)

    def set_model_version(self, project_id: int, version: str) -> None:
        """Label Studio accepts only a version that a prediction (or a backend title) has."""
        self.call("PATCH", f"/api/projects/{project_id}", json={"model_version": version})

    def delete_predictions(self, project_id: int, version: str) -> None:
        """Drop the project's predictions of one model version (before re-ranking with it)."""
        self.call(
            "DELETE", f"/api/projects/{project_id}/model-versions/", json={"model_version": version}
        )

    def predictions(self, project_id: int) -> list[dict]:
        return self.call("GET", "/api/predictions", params={"project": project_id})

    def delete_prediction(self, prediction_id: int) -> None:
        self.call("DELETE", f"/api/predictions/{prediction_id}")

    def set_sampling(self, project_id: int, sampling: str = "Uncertainty sampling") -> None:
        self.call("PATCH", f"/api/projects/{project_id}", json={"sampling": sampling})

    def views(self, project_id: int) -> list[dict]:
        return self.call("GET", "/api/dm/views", params={"project": project_id})

    def save_view(self, project_id: int, data: dict, view_id: int | None = None) -> dict:
        body = {"project": project_id, "data": data}
        if view_id is None:
            return self.call("POST", "/api/dm/views", json=body)
        return self.call("PATCH", f"/api/dm/views/{view_id}", json=body)

    def view_tasks(self, project_id: int, view_id: int, page_size: int = 100) -> list[dict]:
        params = {"project": project_id, "view": view_id, "page_size": page_size, "page": 1}
        return self.call("GET", "/api/tasks", params=params).get("tasks", [])

    def ml_backends(self, project_id: int) -> list[dict]:
        return self.call("GET", "/api/ml", params={"project": project_id})

    def webhooks(self, project_id: int) -> list[dict]:
        return self.call("GET", "/api/webhooks", params={"project": project_id})
