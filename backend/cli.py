"""The one console command, ``camlabel``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from wsl_models.cli import add_commands
from wsl_models.data import DatasetError
from wsl_models.images import ImageError
from wsl_models.members import UnknownMemberError, WeightsError
from wsl_models.versions import VersionError

# Errors a user can fix: one clear line, exit status 2, no traceback.
USER_ERRORS = (DatasetError, ImageError, UnknownMemberError, WeightsError, VersionError, ValueError)


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
    w = sub.add_parser("worker", help="run the training queue (started by serve)")
    w.set_defaults(func=cmd_worker)
    return parser


def cmd_worker(args: argparse.Namespace) -> int:
    from backend.jobs import TrainingQueue
    from backend.settings import Settings

    TrainingQueue(Settings.from_env()).run_consumer()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """gunicorn (each worker builds the app and loads the model once) plus the training worker."""
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{args.host}:{args.port}",
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--timeout",
        str(args.timeout),
        "--access-logfile",
        "-",
        "backend.app:create_app()",
    ]
    # The training consumer runs beside gunicorn, in its own process, one job at a time.
    worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"])
    try:
        return subprocess.call(argv)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


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
