"""The test helpers that start processes (``processes.run_in_own_group``, ``processes.torchrun``) leave
none behind: a launcher and the two children it started (as torchrun starts two ranks) are all gone
after a timeout, and after any exception in the test (pytest-timeout's alarm, Ctrl-C)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import run_in_own_group

# A launcher that starts two children, each writing its pid, then waits on them forever.
LAUNCHER = """
import subprocess, sys
child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(3600)"
# each child in a session of its own, as torchrun starts its ranks
kids = [subprocess.Popen([sys.executable, "-c", child, sys.argv[1] + f"/rank{r}.pid"], start_new_session=True)
        for r in range(2)]
for k in kids:
    k.wait()
"""


def _pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("rank*.pid")) if p.read_text()]


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _all_gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within  # SIGKILL is immediate; reaping by init may lag a little
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_a_timeout_kills_the_launcher_and_its_children(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    # 5 s: two bare interpreters start in well under a second even on a loaded machine.
    with pytest.raises(pytest.fail.Exception, match=r"ran past 5 s; its process group was killed"):
        run_in_own_group([sys.executable, str(script), str(tmp_path)], timeout=5)
    pids = _pids(tmp_path)
    assert len(pids) == 2, "the children had not started within the timeout"
    assert _all_gone(pids), [p for p in pids if _alive(p)]


class Interrupted(Exception):
    pass


def test_an_exception_in_the_test_kills_the_launcher_and_its_children(tmp_path):
    """The exception arrives as pytest-timeout's does: a signal handler raising in the main thread,
    here sent once both children have written their pids (no clock decides)."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    main = threading.get_ident()

    def watch():
        deadline = time.monotonic() + 120
        while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGUSR1)

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        with pytest.raises(Interrupted):
            run_in_own_group([sys.executable, str(script), str(tmp_path)], timeout=300)
    finally:
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
    pids = _pids(tmp_path)
    assert len(pids) == 2 and _all_gone(pids), [p for p in pids if _alive(p)]
