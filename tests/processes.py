"""How tests start processes that must not outlive them: in their own process group, killed whole
when the test does not see them end, on a port the OS gave (imported as ``from processes import ...``;
``tests/`` is on the path through its conftest.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A process that mounts its own tmpfs without privileges: a new user and mount namespace in which it is
# root. The tests of a full disk and of a read-only folder run the real command inside one.
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


@functools.cache
def _private_tmpfs_missing() -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can (probed once per process)."""
    import shutil
    import tempfile

    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed, so no private tmpfs can be mounted"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(
            [*UNSHARE, "sh", "-c", f"mount -t tmpfs -o ro,size=64k tmpfs {folder}"],
            capture_output=True,
            text=True,
        )
    if probe.returncode != 0:
        return f"unprivileged user namespaces cannot mount a tmpfs here: {probe.stderr.strip()}"
    return None


def require_private_tmpfs(purpose: str) -> None:
    """Skip the calling test, saying why and what it needed, unless a private tmpfs can be mounted."""
    missing = _private_tmpfs_missing()
    if missing:
        pytest.skip(reason=f"{purpose} needs a private tmpfs: {missing}")


def free_port() -> int:
    """A TCP port the OS reports free now (bound to port 0, then released): runs at the same time on
    one machine (xdist workers, two checkouts) do not collide as they did on fixed ports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree, read from /proc (Linux; elsewhere none:
    the group kill alone remains)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile, or not ours to read
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_in_own_group(cmd: list[str], *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new session (its own process group),
    whose whole group is SIGKILLed when the test does not see it end: on ``timeout``, on
    pytest-timeout's alarm, on Ctrl-C, on any exception. Killing only the launcher left both ranks
    of a torchrun alive. A timeout fails the test with the tail of what the processes wrote."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,  # the group id is the launcher's pid, held until we reap it
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        # Not reaped yet, so the group id cannot have been reused. Freeze the group (nothing new
        # starts), then kill every descendant's group and the descendant itself: torchrun starts
        # each rank in a session of its own, which a kill of the launcher's group does not reach.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP)
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group != os.getpgid(0):
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()  # (in the group already; should the group have failed, never wait on it below)
        try:  # the pipes close once every process of the group is gone
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild that left the group still holds them
            proc.wait()
            out, err = "", "(the output pipes stayed open: a process outside the group holds them)"
        if isinstance(e, subprocess.TimeoutExpired):
            pytest.fail(
                f"{cmd[:4]}... ran past {timeout} s; its process group was killed.\n"
                f"stdout tail:\n{out[-2000:]}\nstderr tail:\n{err[-3000:]}",
                pytrace=False,
            )
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(
    script, *args: str, nproc: int = 2, timeout: float = 240, env=None
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc --master_port <free> script *args`` through
    :func:`run_in_own_group`. The port is free when chosen; should another process take it before the
    launcher binds it, the launch fails before any rank starts and is tried again on a new port."""
    for _ in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--master_port", str(free_port()), str(script), *args]
        result = run_in_own_group(cmd, timeout=timeout, env=env)
        if result.returncode == 0 or "address already in use" not in result.stderr.lower():
            return result
    return result
