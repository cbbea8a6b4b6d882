"""The Label Studio ML backend protocol on Flask 3 (served by gunicorn: `camlabel serve`).

Label Studio 1.23 calls GET /health (1 s timeout), POST /setup (3 s), POST /predict (100 s),
POST /webhook (1 s) and GET /versions. Every error is a JSON body with an "error" key and a
log line; nothing a client sends can take the server down.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from wsl_models.explanation import STYLES as EXPLAIN_STYLES

from .fetch import ImageFetcher
from .holder import ModelHolder
from .inference import InferenceEngine
from .jobs import TrainingQueue
from .label_config import LabelConfigError
from .lines import project_id
from .model import UNTRAINED, CamLabelModel
from .settings import WEBHOOK_SECRET_HEADER, Settings

log = logging.getLogger("camlabel.backend")

TRAINING_EVENTS = {
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",  # bulk: annotations imported with tasks
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
}


class BadRequest(ValueError):
    pass


def _basic_auth_ok(settings: Settings) -> bool:
    auth = request.authorization
    return (
        auth is not None
        and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    )


def _unauthorized(message: str, basic: bool) -> Response:
    response = jsonify(error=message)
    response.status_code = 401
    if basic:
        response.headers["WWW-Authenticate"] = 'Basic realm="camlabel"'
    return response


def create_app(settings: Settings | None = None, queue: TrainingQueue | None = None) -> Flask:
    settings = settings or Settings.from_env()
    if settings.review_label:
        settings.review_band_values  # noqa: B018  (a malformed REVIEW_BAND fails the start)
    settings.explain_level_values  # noqa: B018  (a malformed EXPLAIN_LEVELS fails the start)
    if settings.explain_style not in EXPLAIN_STYLES:
        raise ValueError(
            f"EXPLAIN_STYLE must be one of {EXPLAIN_STYLES}, not {settings.explain_style!r}"
        )
    if settings.box_prior not in ("box", "map"):
        raise ValueError(f"BOX_PRIOR must be box or map, not {settings.box_prior!r}")
    if settings.keypoints not in ("probe", "grabcut"):
        raise ValueError(f"KEYPOINTS must be probe or grabcut, not {settings.keypoints!r}")
    app = Flask("camlabel")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024
    holder = ModelHolder(settings)
    engine = InferenceEngine(
        settings.predict_batch, settings.batch_invariant
    )  # this worker's one inference thread
    fetcher = ImageFetcher(settings)
    queue_error = None
    if queue is None:
        try:
            queue = TrainingQueue(settings)
        except Exception as exc:  # e.g. a read-only MODEL_DIR on a predict-only replica
            queue_error = f"training queue unavailable in {settings.model_dir}: {exc}"
            log.error("%s; /webhook will answer 503, predictions are served", queue_error)
    app.config["camlabel"] = {
        "settings": settings,
        "holder": holder,
        "fetcher": fetcher,
        "engine": engine,
        "queue": queue,
    }
    holder.preload()  # every line's current version, once per worker, before any request
    holder.watch()  # then new versions load in the background as they appear

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    def model_for(data: dict[str, Any], config_key: str) -> CamLabelModel:
        config = data.get(config_key)
        if not isinstance(config, str):
            raise BadRequest(f"the request has no {config_key!r} (the project's label config)")
        pid = project_id(data.get("project"))
        model = CamLabelModel(holder.get(pid), engine, fetcher, settings, config, pid)
        model.setup()
        return model

    @app.before_request
    def authenticate() -> Response | None:
        """Basic auth on every route; /webhook also accepts the shared secret instead (Label
        Studio's auto-created webhook cannot send basic auth, but can send a header)."""
        if request.path == "/webhook" and settings.webhook_secret:
            sent = request.headers.get(WEBHOOK_SECRET_HEADER, "")
            if hmac.compare_digest(sent.encode(), settings.webhook_secret.encode()):
                return None
            if not settings.basic_auth_user or not _basic_auth_ok(settings):
                log.warning("webhook refused: missing or wrong %s header", WEBHOOK_SECRET_HEADER)
                return _unauthorized("webhook secret missing or wrong", basic=False)
            return None
        if not settings.basic_auth_user or _basic_auth_ok(settings):
            return None
        return _unauthorized("authentication required", basic=True)

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        _, version = holder.get()  # the base model's (what serves a project with no line yet)
        return jsonify(
            status="UP",
            model_class="CamLabelModel",
            model_version=version or UNTRAINED,
            trained=version is not None,
            # each project line's current version (a worker loads it on that project's next
            # request, in the background)
            projects={p: holder.lines.project(p).current_id() for p in holder.lines.project_ids()},
            load_error=holder.last_error,
            jobs=queue.log.read() if queue else {},
            queue_pending=queue.huey.pending_count() if queue else None,
            queue_error=queue_error,
        )

    @app.post("/setup")
    def setup() -> Response:
        model = model_for(body(), "schema")
        return jsonify(model_version=model.model_version)

    @app.post("/predict")
    def predict() -> Response:
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list")
        model = model_for(data, "label_config")
        start = time.perf_counter()
        context = (
            (data.get("params") or {}).get("context")
            if isinstance(data.get("params"), dict)
            else None
        )
        results = model.predict(tasks, context)
        log.info(
            "predict: %d tasks, %d failed, %.2f s",
            len(tasks),
            sum("error" in r for r in results),
            time.perf_counter() - start,
        )
        return jsonify(results=results, model_version=model.model_version)

    @app.post("/webhook")
    def webhook() -> Response | tuple[Response, int]:
        data = body()
        action = data.get("action")
        if not isinstance(action, str):
            raise BadRequest("the webhook has no 'action'")
        if action not in TRAINING_EVENTS:
            return jsonify(status="ignored", action=action)
        project = data.get("project")
        pid = project_id(project.get("id")) if isinstance(project, dict) else None
        if pid is None:
            raise BadRequest(f"{action} webhook without a valid project id")
        if queue is None:
            return jsonify(error=queue_error), 503
        # fit() only queues a job: no model (holder.get would mark the line used, or reload it)
        model = CamLabelModel((None, None), engine, fetcher, settings, "", pid)
        try:
            status = model.fit(action, {**data, "project": {**project, "id": pid}}, queue)
        except Exception as exc:  # e.g. the queue's disk is full: nothing was queued
            log.exception("project %s: could not queue training for %s", pid, action)
            return jsonify(error=f"training not queued: {type(exc).__name__}: {exc}"), 503
        return jsonify(status=status, action=action, project=pid)

    @app.get("/versions")
    def versions() -> Response:
        """The base model's versions and the project's (?project=ID; every project's without:
        Label Studio's GET /versions names none)."""
        pid = project_id(request.args.get("project", ""))
        return jsonify(versions=holder.lines.versions(pid))

    @app.get("/versions/<vid>")
    def version(vid: str) -> Response | tuple[Response, int]:
        store = holder.lines.find(vid)
        if store is None:
            return jsonify(error=f"no version {vid!r}"), 404
        return jsonify(store.manifest(vid))

    @app.errorhandler(BadRequest)
    @app.errorhandler(LabelConfigError)
    def bad_request(exc: Exception) -> tuple[Response, int]:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return jsonify(error=str(exc)), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.description), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"internal error: {type(exc).__name__}: {exc}"), 500

    return app
