"""Waits that survive a busy machine: wait while the awaited work is alive and progressing.

A test never gives work whose length depends on the machine a fixed number of seconds. It
polls a check; it keeps waiting while the check's state changes or the watched processes
(and their descendants) use CPU, fails at once when the watched process dies, and fails
when for ``stall_s`` seconds nothing moved at all: a hang, not a slow machine.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import requests

T = TypeVar("T")

STALL_S = 120.0
CPU_STEP_S = 2.0  # CPU seconds that count as progress (a working trainer uses ~1 per second)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def cpu_seconds(*pids: int) -> tuple[float, bool]:
    """(CPU seconds used by ``pids`` and their descendants, whether any of ``pids`` runs)."""
    total, alive, _ = _tree(pids)
    return total, alive


def _tree(pids: Iterable[int]) -> tuple[float, bool, bool]:
    """CPU seconds of ``pids`` and their descendants, whether any of ``pids`` runs, and whether
    any of them waits for a core or the disk (state R or D: slowed by the machine, not hung)."""
    total, alive, waiting, todo = 0.0, False, False, list(pids)
    roots = set(todo)
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        alive |= p in roots and fields[0] != "Z"
        waiting |= fields[0] in ("R", "D")
        total += sum(int(f) for f in fields[11:15]) / tick  # own + reaped children's
        todo += children(p)
    return total, alive, waiting


def wait_while_progressing(
    check: Callable[[], tuple[T | None, Any]],
    pids: int | Callable[[], Iterable[int]],
    what: str,
    poll: float = 0.5,
    stall_s: float = STALL_S,
    must_live: bool = True,
) -> T:
    """Poll ``check() -> (result or None, state)`` until a result comes.

    ``pids``: the process doing the work (or a function naming the processes, for work
    that is the processes' exit). Fails when ``must_live`` and none of them runs any more,
    or when for ``stall_s`` seconds neither the state changed nor they used CPU_STEP_S nor
    was any of them seen waiting for a core or the disk (a machine busy with other work).
    """
    last_state: Any = object()
    last_cpu, since = -1.0, time.monotonic()
    while True:
        result, state = check()
        if result is not None:
            return result
        watched = [pids] if isinstance(pids, int) else list(pids())
        cpu, alive, waiting = _tree(watched)
        if must_live and not alive:
            raise AssertionError(f"{what}: the process doing it died: {state}")
        if cpu < last_cpu:  # a process exited unreaped: count from what runs now
            last_cpu = cpu
        if state != last_state or cpu - last_cpu >= CPU_STEP_S or waiting:
            last_state, last_cpu, since = state, cpu, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise TimeoutError(f"{what}: no progress for {stall_s:.0f} s: {state}")
        time.sleep(poll)


def wait_http(url: str, proc: subprocess.Popen) -> None:
    """Wait until ``url`` answers below 500 while ``proc`` (a starting server) progresses."""

    def check():
        try:
            code = requests.get(url, timeout=2).status_code
        except requests.RequestException as e:
            return None, type(e).__name__
        return (True if code < 500 else None), code

    wait_while_progressing(check, proc.pid, f"{url} to answer", poll=1.0)
