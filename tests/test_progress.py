"""The tests' progress-based wait (tests/progress.py) tells work from a hang and a death."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .progress import cpu_seconds, descendants, wait_while_progressing

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 4.5: pass\n"


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_process_that_works_without_saying_so_is_waited_for():
    """No state change at all, but CPU use: the wait lasts until the work is done."""
    proc = _spawn(BURN)
    try:
        code = wait_while_progressing(
            lambda: (proc.poll(), None), proc.pid, "burn", poll=0.1, stall_s=30, must_live=False
        )
        assert code == 0
        assert cpu_seconds(proc.pid) == (0.0, False)  # reaped: nothing left to count
    finally:
        proc.kill()
        proc.wait()


def test_a_hung_process_fails_the_wait_and_a_moving_state_keeps_it():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(TimeoutError, match="no progress"):
            wait_while_progressing(lambda: (None, "same"), proc.pid, "sleep", 0.05, stall_s=0.5)
        calls = iter(range(40))  # a new state each poll: 40 polls of 0.05 s > stall_s

        def moving():
            n = next(calls)
            return (n if n == 39 else None), n

        assert wait_while_progressing(moving, proc.pid, "moving", 0.05, stall_s=0.5) == 39
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_process_fails_the_wait_at_once():
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(AssertionError, match="died"):
        wait_while_progressing(lambda: (None, None), proc.pid, "dead", poll=0.05, stall_s=60)


def _own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_descendants_and_their_cpu_are_counted():
    """The work of a server is in its children: their CPU time counts for the parent."""
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN!r}])"
    parent = _spawn(spawn)
    try:

        def burnt():
            used = cpu_seconds(parent.pid)[0]
            return (used if used >= 2.0 else None), None

        used = wait_while_progressing(burnt, parent.pid, "the burn", poll=0.05, stall_s=60)
        assert len(descendants(parent.pid)) == 1
        assert used >= 2.0 and _own_cpu(parent.pid) < 1.0  # the child's, not the parent's
    finally:
        parent.kill()
        parent.wait()


def test_a_process_waiting_for_a_core_counts_as_working_and_a_sleeping_one_does_not():
    """State R (running or waiting for a core) or D (waiting for the disk) is a machine busy
    with other work, not a hang; a process asleep in S is neither."""
    from .progress import _tree

    busy, asleep = _spawn("while True: pass"), subprocess.Popen(["sleep", "60"])
    try:
        assert any(_tree([busy.pid])[2] for _ in range(50))  # seen running at least once
        while _tree([asleep.pid])[2]:  # until it has started and gone to sleep
            time.sleep(0.01)
        assert not any(_tree([asleep.pid])[2] for _ in range(20))
    finally:
        for proc in (busy, asleep):
            proc.kill()
            proc.wait()
