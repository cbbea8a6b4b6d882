"""gunicorn hooks: the training worker lives and dies with the gunicorn master."""

from __future__ import annotations

import os
import subprocess
import sys


def when_ready(server) -> None:
    cmd = [sys.executable, "-m", "backend.cli", "worker", "--parent", str(os.getpid())]
    server.camlabel_trainer = subprocess.Popen(cmd)
    server.log.info("training worker started (pid %s)", server.camlabel_trainer.pid)


def on_exit(server) -> None:
    trainer = getattr(server, "camlabel_trainer", None)
    if trainer is not None and trainer.poll() is None:
        trainer.terminate()
        try:
            trainer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            trainer.kill()
