"""Shared fixtures: the files in ../shared/data (read in place, never copied into the project);
``run_in_own_group`` and ``torchrun``, the one way tests start processes that must not outlive them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def free_port() -> int:
    """A TCP port the OS reports free now (bound to port 0, then released): runs at the same time on
    one machine (xdist workers, two checkouts) do not collide as they did on fixed ports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        # Not reaped yet, so the group id cannot have been reused: kill everything in it.
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


@pytest.fixture(scope="session", autouse=True)
def _offline_sources(tmp_path_factory):
    """Named sources resolve to ../shared/data through the offline-mirror mechanism users have."""
    os.environ["SCRATCHLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    if SHARED_DATA.is_dir():
        os.environ["SCRATCHLM_LOCAL_DATA"] = str(SHARED_DATA)
    yield


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    from scratchlm.downloads import fetch

    return fetch("shakespeare").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def names() -> list[str]:
    from scratchlm.downloads import fetch

    return fetch("names").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def gpt2():
    from scratchlm.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def shakespeare_bpe(shakespeare_text):
    from scratchlm.tokenizers import train_bpe

    return train_bpe(shakespeare_text[:500_000], 1024, "gpt2", ["<|endoftext|>"])


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory):
    """Character-level tinyshakespeare shards (65 characters, no special token): the tiny training runs'
    data. Tests only read them; each run writes into its own out_dir."""
    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.tokenizers import CharTokenizer

    root = tmp_path_factory.mktemp("char")
    ds, _ = prepare_dataset("shakespeare", root / "shakespeare")
    path = CharTokenizer.train(ds.text("train")).save(root / "char.json")
    return tokenize_dataset(ds, path, root / "char")["path"]


@pytest.fixture(scope="module")
def task_base(tmp_path_factory):
    """Post-training tests' start: 1-digit addition task data and a randomly initialised base
    checkpoint with a character tokenizer (``root/tasks``, ``root/base``)."""
    import torch

    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.posttrain.data import write_task_data
    from scratchlm.tokenizers import CharTokenizer

    root = tmp_path_factory.mktemp("posttrain")
    write_task_data(root / "tasks", ["addition"], train=80, test=6, difficulty=1)
    tok = CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz", ["<|endoftext|>"])
    torch.manual_seed(0)
    base = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            d_model=64,
            block_size=48,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            dropout=0.0,
        )
    )
    save_model_only(root / "base", base, tokenizer=tok)
    return root


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``) each worker computes with one thread: two workers of two
    threads each on a 2-core machine make every small op wait for a descheduled thread (tiny
    training steps ran 10-30x slower)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the processes the tests start
        os.environ.setdefault("SCRATCHLM_THREADS", "1")
