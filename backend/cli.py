"""The one console command, ``camlabel``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from backend import demo
from backend.ls_api import TrainingError
from wsl_models.cli import add_commands
from wsl_models.data import DatasetError
from wsl_models.images import ImageError
from wsl_models.members import UnknownMemberError, WeightsError
from wsl_models.versions import VersionError

# Errors a user can fix: one clear line, exit status 2, no traceback.
USER_ERRORS = (
    DatasetError,
    ImageError,
    UnknownMemberError,
    WeightsError,
    VersionError,
    ValueError,
    TrainingError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camlabel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    s = sub.add_parser("serve", help="serve the Label Studio ML backend with gunicorn")
    s.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    s.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    s.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    s.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "4")))
    s.add_argument("--timeout", type=int, default=int(os.environ.get("TIMEOUT", "120")))
    s.set_defaults(func=cmd_serve)
    r = sub.add_parser(
        "rank",
        help="score every task of a Label Studio project and serve the most uncertain first",
        description="Uses LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and MODEL_DIR from the "
        "environment: predicts every task with the current version, stores the predictions in "
        "bulk (score = 1 - acquisition value), sets the project's model_version and "
        "'Uncertainty sampling', and saves a Data Manager tab sorted most uncertain first.",
    )
    r.add_argument("--project", type=int, required=True, help="Label Studio project id")
    r.add_argument(
        "--acquisition",
        default=os.environ.get("ACQUISITION", "entropy"),
        help="entropy | bald | margin | random (default: ACQUISITION or entropy)",
    )
    r.add_argument(
        "--diversity",
        type=int,
        default=None,
        metavar="K",
        help="make the first K tasks a diverse batch (default: RANK_DIVERSITY or 0 = off)",
    )
    r.add_argument("--page-size", type=int, default=100, help="tasks per API page and batch")
    r.set_defaults(func=cmd_rank)
    c = sub.add_parser(
        "connect",
        help="connect the backend to a Label Studio project (basic auth, webhook secret)",
        description="Uses LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/PASS and "
        "WEBHOOK_SECRET from the environment: adds the backend to the project as its ML "
        "backend (with basic auth when set) and puts the secret header on the webhook Label "
        "Studio creates for it.",
    )
    c.add_argument("--project", type=int, required=True, help="Label Studio project id")
    c.add_argument(
        "--backend-url", required=True, help="the backend's URL as Label Studio reaches it"
    )
    c.add_argument("--title", default="camlabel")
    c.add_argument(
        "--interactive",
        action="store_true",
        help="switch on interactive pre-annotations: smart rectangles and keypoints re-segment",
    )
    c.set_defaults(func=cmd_connect)
    w = sub.add_parser("worker", help="run the training queue (started by serve)")
    w.add_argument("--parent", type=int, default=None, help="exit when this process is gone")
    w.set_defaults(func=cmd_worker)
    demo.add_parser(sub)
    return parser


def cmd_rank(args: argparse.Namespace) -> int:
    from backend.ranking import rank_project
    from backend.settings import Settings

    report = rank_project(
        Settings.from_env(), args.project, args.acquisition, args.diversity, args.page_size
    )
    print(
        f"project {report.project}: {report.ranked} of {report.tasks} tasks ranked by "
        f"{report.acquisition} with version {report.model_version} ({report.failed} failed) in "
        f"{report.seconds:.1f} s, {report.images_per_second:.1f} images/s; "
        f"Data Manager tab {report.view_id}"
    )
    return 0 if report.failed == 0 else 1


def cmd_connect(args: argparse.Namespace) -> int:
    from backend.connect import connect_project
    from backend.settings import Settings

    c = connect_project(
        Settings.from_env(), args.project, args.backend_url, args.title, args.interactive
    )
    print(
        f"project {c.project}: ML backend {c.ml_backend} at {args.backend_url}"
        f"{' (interactive)' if c.interactive else ''}, webhook "
        f"{c.webhook} {'with the secret header' if c.secured else 'without a secret'}"
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from backend.jobs import TrainingQueue
    from backend.settings import Settings

    if args.parent:
        _exit_with_parent(args.parent)
    TrainingQueue(Settings.from_env()).run_consumer()
    return 0


def _exit_with_parent(parent: int) -> None:
    """If gunicorn's master dies (even by SIGKILL), the training worker must not linger."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def cmd_serve(args: argparse.Namespace) -> int:
    """Become gunicorn: each worker builds the app and loads the model once; the master starts
    and stops the training worker (backend/gunicorn_conf.py)."""
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:backend.gunicorn_conf",
        "--bind", f"{args.host}:{args.port}",
        "--workers", str(args.workers),
        "--threads", str(args.threads),
        "--timeout", str(args.timeout),
        "--access-logfile", "-",
        "backend.app:create_app()",
    ]  # fmt: skip
    os.execv(sys.executable, argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"camlabel {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
