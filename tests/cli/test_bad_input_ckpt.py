"""Bad input around checkpoints and the training run, each through the real command line: a char
vocabulary without a newline, a full disk (a real tmpfs), Ctrl-C (a real SIGINT), a flipped digit in
state.json, the file modes a umask asks for, a value changed on resume.

Each row runs ``python -m scratchlm`` in a child process and checks its exit status and message."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import UNSHARE, require_private_tmpfs

REPO = Path(__file__).resolve().parents[2]
SHARED_TEXT = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").resolve()
TINY = """\
[model]
n_layer = 2
n_head = 2
d_model = 32
block_size = 32
position = "rope"

[train]
data = "{data}"
out_dir = "{out}"
batch_size = 4
max_steps = {max_steps}
eval_interval = 3
eval_windows = 8
warmup_steps = 2
sample_tokens = 20
log_interval = 1
"""


def scratchlm(*args, cwd, umask: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def write_config(tmp_path: Path, data, out, max_steps: int = 6) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(data=data, out=out, max_steps=max_steps))
    return path


def no_newline_shards(tmp_path: Path) -> Path:
    """Shakespeare with every newline replaced by a space, a char tokenizer trained on it (so "\\n"
    is not in its vocabulary; <|endoftext|> is), token shards: all made by the command line."""
    text = tmp_path / "one-line.txt"
    text.write_text(SHARED_TEXT.read_text(encoding="utf-8")[:300_000].replace("\n", " "), encoding="utf-8")
    for args in (
        ("data", "prepare", text, "--out", tmp_path / "ds"),
        ("tokenizer", "train", "--kind", "char", "--dataset", tmp_path / "ds", "--out", tmp_path / "char.json"),
        ("data", "tokenize", "--dataset", tmp_path / "ds", "--tokenizer", tmp_path / "char.json",
         "--out", tmp_path / "shards"),
    ):  # fmt: skip
        done = scratchlm(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert "\n" not in json.loads((tmp_path / "char.json").read_text())["chars"]
    return tmp_path / "shards"


# --- the rows ----------------------------------------------------------------------------------------
def char_tokenizer_without_newline(tmp_path, char_shards):
    out = tmp_path / "run"
    done = scratchlm("train", "--config", write_config(tmp_path, no_newline_shards(tmp_path), out), "--quiet",
                     cwd=tmp_path)  # fmt: skip
    # The samples start from <|endoftext|>: each evaluation prints one under its loss line.
    lines = done.stderr.splitlines()
    samples = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("step ")]
    return done, 0, r"step 6: train [\d.]+  val [\d.]+", lambda: len(samples) == 2 and all(samples)


def full_disk(tmp_path, char_shards):
    require_private_tmpfs("a real full disk")
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    mount.mkdir()
    out = mount / "run"
    config = write_config(tmp_path, char_shards, out)
    # 600 kB: the step-3 checkpoint (about 375 kB) fits, the step-6 one beside it does not.
    script = (
        f"mount -t tmpfs -o size=600k tmpfs {mount} && "
        f"{sys.executable} -m scratchlm train --config {config} --quiet; rc=$?; "
        f"cp -a {out} {copy}; exit $rc"
    )
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    def previous_checkpoint_intact():
        from scratchlm.models.checkpoint import load_model_from_checkpoint, read_state

        load_model_from_checkpoint(copy / "last")  # every checksum verified
        leftovers = [p.name for p in (copy / "checkpoints").iterdir() if p.name.startswith(".")]
        return read_state(copy / "last")["step"] == 3 and not leftovers

    message = (
        rf"scratchlm: error: {out / 'checkpoints'}: not enough free space to save the checkpoint "
        r"step-00000006: it needs about [\d.]+ kB and [\d.]+ kB is free"
    )
    return done, 2, message, previous_checkpoint_intact


def ctrl_c(tmp_path, char_shards):
    out = tmp_path / "run"
    config = write_config(tmp_path, char_shards, out, max_steps=100_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "train", "--config", config, "--set", "train.eval_interval=100000",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def saved_and_resumes():
        from scratchlm.models.checkpoint import read_state

        summary = json.loads(stdout)
        step = summary["steps"]
        assert summary["stop_reason"] == "signal" and read_state(out / "last")["step"] == step
        resumed = scratchlm("train", "--resume", "--out", out, "--set", f"train.max_steps={step + 2}",
                            "--quiet", cwd=tmp_path)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert f"at step {step}" in resumed.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if "loss" in r] == list(range(1, step + 3))

    return (
        done,
        0,
        r"Ctrl-C: stopping after this step.*\n(.*\n)*stopped by Ctrl-C at step \d+; saved",
        (saved_and_resumes),
    )


def tiny_base(tmp_path: Path, char_shards) -> Path:
    """A 3-step character model (context 64) trained by the command line: a base to fine-tune."""
    out = tmp_path / "base"
    done = scratchlm("train", "--config", write_config(tmp_path, char_shards, out, max_steps=3),
                     "--set", "model.block_size=64", "--quiet", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out / "last"


def conversations(path: Path, n: int = 40) -> Path:
    """Short letter-only conversations (the base's vocabulary spells them)."""
    words = ["to be", "or not", "my lord", "good night", "the king", "sweet love"]
    with path.open("w") as f:
        for i in range(n):
            prompt, reply = words[i % len(words)], words[(i * 5 + 1) % len(words)]
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": reply}]}) + "\n")  # fmt: skip
    return path


class Lines:
    """A child's stderr, read line by line as it comes (a thread), so a test can wait for one."""

    def __init__(self, stream):
        import threading

        self.lines: list[str] = []
        self.thread = threading.Thread(
            target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True
        )
        self.thread.start()

    def wait_for(self, text: str, proc, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert proc.poll() is None and time.monotonic() < deadline, f"never saw {text!r}: {self.lines}"
            time.sleep(0.005)

    def text(self) -> str:
        self.thread.join(timeout=30)
        return "".join(self.lines)


def second_ctrl_c_in_sft(tmp_path, char_shards):
    """Two real SIGINTs to `scratchlm sft`: the first once step 1 is saved (step 2 is slow: a large
    batch in 8 micro-batches), the second once the first has been acknowledged, long before step 2
    ends and its save would begin."""
    base, data, out = (
        tiny_base(tmp_path, char_shards),
        conversations(tmp_path / "chat.jsonl"),
        tmp_path / "sft",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "sft", "--checkpoint", base, "--data", data, "--out", out,
         "--set", "train.batch_size=512", "--set", "train.grad_accum=8", "--set", "train.max_steps=1000",
         "--set", "train.eval_interval=1", "--set", "train.warmup_steps=0", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        stderr = Lines(proc.stderr)
        stderr.wait_for("step 1: ", proc)  # evaluated and saved: step 2 begins
        proc.send_signal(signal.SIGINT)
        stderr.wait_for("Ctrl-C: stopping after this step", proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr.text())

    def step_1_kept_and_the_folder_clean():
        from scratchlm.models.checkpoint import load_model_from_checkpoint, read_state

        load_model_from_checkpoint(out / "last")  # every checksum verified
        assert read_state(out / "last")["step"] == 1
        return not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    return (
        done,
        130,
        r"\nscratchlm: aborted by a second Ctrl-C: nothing saved since the last checkpoint, which is kept\n\Z",
        step_1_kept_and_the_folder_clean,
    )


def ctrl_c_ignored_by_a_background_job(tmp_path, char_shards):
    """A job started with `&` by a non-interactive shell inherits SIGINT ignored: a Ctrl-C meant for
    the shell's foreground job must not stop it. A real SIGINT, to a run that ignores it."""
    out = tmp_path / "run"
    config = write_config(tmp_path, char_shards, out, max_steps=40)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "train", "--config", config, "--set", "train.eval_interval=40",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        deadline, metrics = time.monotonic() + 120, out / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return (
        done,
        0,
        r"done: 40 steps|\"stop_reason\": \"max_steps\"",
        lambda: json.loads(stdout)["steps"] == 40,
    )


def ctrl_c_outside_a_training_loop(tmp_path, char_shards):
    """A Ctrl-C that nothing takes over (here during `sample`; in training, while the model loads)
    ends the command with one line and exit 130."""
    base = tiny_base(tmp_path, char_shards)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "sample", "--checkpoint", base, "--max-new-tokens", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        proc.stdout.read(50)  # sampling has begun (streamed)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout.decode(), stderr.decode())
    return done, 130, r"\Ascratchlm: interrupted by Ctrl-C\n\Z", lambda: True


def train_out_and_set_out_dir(tmp_path, char_shards):
    """`train` refuses a `--set` of a value a flag given beside it sets, like every post-training
    command: neither value silently wins, and nothing is written."""
    config = write_config(tmp_path, char_shards, tmp_path / "C")
    done = scratchlm("train", "--config", config, "--out", tmp_path / "A", "--set", f"train.out_dir={tmp_path / 'B'}",
                     cwd=tmp_path)  # fmt: skip
    message = (
        r"scratchlm: error: --set train.out_dir conflicts with --out, which sets train.out_dir: use --out"
    )
    return done, 2, message, lambda: not any((tmp_path / name).exists() for name in "ABC")


def train_device_and_set_device(tmp_path, char_shards):
    config = write_config(tmp_path, char_shards, tmp_path / "run")
    done = scratchlm(
        "train", "--config", config, "--device", "cpu", "--set", "train.device=cuda", cwd=tmp_path
    )
    message = (
        r"scratchlm: error: --set train.device conflicts with --device, which sets train.device: use --device"
    )
    return done, 2, message, lambda: not (tmp_path / "run").exists()


def flipped_digit_in_state_json(tmp_path, char_shards):
    out = tmp_path / "run"
    trained = scratchlm("train", "--config", write_config(tmp_path, char_shards, out, max_steps=3), "--quiet",
                        cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    state = (out / "last").resolve() / "state.json"
    text = state.read_text()
    assert '"rope_theta": 10000.0' in text
    state.write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 90000.0'))
    done = scratchlm("sample", "--checkpoint", out / "last", "--max-new-tokens", 5, cwd=tmp_path)
    return done, 2, rf"scratchlm: error: {state}: its content differs from the sha256 recorded", lambda: True


def permissions_0600(tmp_path, char_shards):
    out = tmp_path / "run"
    done = scratchlm("train", "--config", write_config(tmp_path, char_shards, out, max_steps=3), "--quiet",
                     cwd=tmp_path, umask=0o022)  # fmt: skip

    def modes_follow_the_umask():
        folder = (out / "last").resolve()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*folder.iterdir(), out / "metrics.jsonl"]}
        assert set(modes) >= {"model.safetensors", "optimizer.safetensors", "state.json"}
        assert set(modes.values()) == {0o644}, modes
        return True

    return done, 0, r"done: 3 steps", modes_follow_the_umask


def changed_value_on_resume(tmp_path, char_shards):
    out = tmp_path / "run"
    trained = scratchlm("train", "--config", write_config(tmp_path, char_shards, out, max_steps=3), "--quiet",
                        cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    done = scratchlm("train", "--resume", "--out", out, "--set", "train.lr=5e-4", "--set", "train.max_steps=5",
                     "--set", "train.min_lr=5e-4", "--quiet", cwd=tmp_path)  # fmt: skip

    def one_line_per_change_and_applied():
        changes = [line for line in done.stderr.splitlines() if line.startswith(("warning:", "note:"))]
        assert changes == [
            "note: train.max_steps = 5 (the run had 3): applied from step 3 on",
            "warning: train.lr = 0.0005 (the run had 0.001): applied from step 3 on",
            "warning: train.min_lr = 0.0005 (the run had 0.0001): applied from step 3 on",
        ], changes
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["lr"] for r in records if "lr" in r and r["step"] > 3] == [5e-4, 5e-4]

    return (
        done,
        0,
        r"warning: train\.lr = 0\.0005 \(the run had 0\.001\): applied from step 3 on",
        (one_line_per_change_and_applied),
    )


ROWS = [
    char_tokenizer_without_newline,
    full_disk,
    ctrl_c,
    second_ctrl_c_in_sft,
    ctrl_c_ignored_by_a_background_job,
    ctrl_c_outside_a_training_loop,
    train_out_and_set_out_dir,
    train_device_and_set_device,
    flipped_digit_in_state_json,
    permissions_0600,
    changed_value_on_resume,
]


@pytest.mark.parametrize("row", ROWS, ids=[row.__name__ for row in ROWS])
def test_bad_input(row, tmp_path, char_shards):
    import re

    done, code, message, check = row(tmp_path, char_shards)
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(message, done.stderr + done.stdout), done.stderr[-3000:]
    assert check()
