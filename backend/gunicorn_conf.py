"""gunicorn hooks: the training worker lives and dies with the gunicorn master.

TRAINER=0 starts none (a predict-only replica; exactly one replica per MODEL_DIR trains). The
master also supervises it: a trainer that dies (kill -9, out of memory) is started again,
with a growing pause, and the new one requeues the job it was running (TrainingQueue.recover).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def _start_trainer(server) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "backend.cli", "worker", "--parent", str(os.getpid())]
    trainer = subprocess.Popen(cmd)
    server.log.info("training worker started (pid %s)", trainer.pid)
    return trainer


def _supervise(server) -> None:
    pause = 1.0
    while not server.camlabel_stopping.is_set():
        started = time.monotonic()
        code = server.camlabel_trainer.wait()
        if server.camlabel_stopping.is_set():
            return
        pause = 1.0 if time.monotonic() - started > 60 else min(pause * 2, 30.0)
        server.log.error("training worker exited with %s; restarting in %.0f s", code, pause)
        if server.camlabel_stopping.wait(pause):
            return
        server.camlabel_trainer = _start_trainer(server)


def when_ready(server) -> None:
    if os.environ.get("TRAINER", "1").strip().lower() in ("0", "false", "no", "off"):
        server.log.info("no training worker here (TRAINER=0): a predict-only replica")
        return
    server.camlabel_stopping = threading.Event()
    server.camlabel_trainer = _start_trainer(server)
    threading.Thread(target=_supervise, args=(server,), daemon=True).start()


def on_exit(server) -> None:
    stopping = getattr(server, "camlabel_stopping", None)
    if stopping is not None:
        stopping.set()
    trainer = getattr(server, "camlabel_trainer", None)
    if trainer is not None and trainer.poll() is None:
        trainer.terminate()
        try:
            trainer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            trainer.kill()
