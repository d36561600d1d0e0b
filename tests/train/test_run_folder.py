"""A run folder is self-contained: its checkpoints carry their tokenizer and the run's whole config,
so sampling needs no data folder and ``scratchlm train --resume --out DIR`` needs no config; the
header says what a run is about to do; samples and warnings fit the tokenizer and the user's settings.

Every test drives the real command line (``python -m scratchlm``) in a child process, or a real
full disk (an unprivileged tmpfs)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from processes import UNSHARE, require_private_tmpfs

from scratchlm.models.checkpoint import load_model_from_checkpoint, read_state

REPO = Path(__file__).resolve().parents[2]
TINY = """\
[model]
n_layer = 2
n_head = 2
d_model = 32
block_size = 32

[train]
data = "{data}"
out_dir = "{out}"
batch_size = 4
max_steps = 6
eval_interval = 2
eval_windows = 8
warmup_steps = 2
lr = 1e-3
min_lr = 1e-3
sample_tokens = 0
log_interval = 1
"""


def scratchlm(*args, cwd, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def tiny_config(tmp_path: Path, data, out) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(data=data, out=out))
    return path


def losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_the_tokenizer_travels_with_the_checkpoint(char_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(char_shards, data)
    out = tmp_path / "run"
    ok(
        scratchlm(
            "train", "--config", tiny_config(tmp_path, data, out), "--set", "train.max_steps=2", cwd=tmp_path
        )
    )
    folder = (out / "last").resolve()
    assert "tokenizer.json" in read_state(folder)["files"]
    shutil.rmtree(data)  # the data moved away: the checkpoint still samples, with no --tokenizer
    for checkpoint in (out / "last", out / "best"):
        sampled = ok(scratchlm("sample", "--checkpoint", checkpoint, "--max-new-tokens", 8, "--prompt", "ROMEO:",
                               cwd=tmp_path))  # fmt: skip
        assert sampled.stdout.startswith("ROMEO:")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_of_a_run_follows_the_umask(char_shards, tmp_path, umask, mode):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, char_shards, out)
    ok(scratchlm("train", "--config", config, "--set", "train.max_steps=2", cwd=tmp_path, umask=umask))
    files = [*(out / "last").resolve().iterdir(), out / "metrics.jsonl", out / "loss.png"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


def test_a_disk_that_fills_while_writing_is_reported_and_the_previous_checkpoint_survives(
    char_shards, tmp_path
):
    """The free-space check passes (its estimate is switched off here), then the writes themselves hit a
    real full tmpfs: the same message, no half folder."""
    require_private_tmpfs("a real full disk")
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    mount.mkdir()
    config = tiny_config(tmp_path, char_shards, mount / "run")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "import scratchlm.models.checkpoint as ck\n"
        "ck._bytes_needed = lambda *args: 0  # skip the check before writing: the write itself finds the disk full\n"
        "from scratchlm.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(config)!r}, '--quiet']))\n"
    )
    shell = (
        f"mount -t tmpfs -o size=600k tmpfs {mount} && {sys.executable} {script}; rc=$?; "
        f"cp -a {mount / 'run'} {copy}; exit $rc"
    )
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"scratchlm: error: {mount / 'run' / 'checkpoints'}: not enough free space" in done.stderr
    assert (
        "The previous checkpoint is intact" in done.stderr or "previous checkpoint is intact" in done.stderr
    )
    step = read_state(copy / "last")["step"]
    assert step in (2, 4)
    load_model_from_checkpoint(copy / "last")  # every checksum verified
    assert not [p.name for p in (copy / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_needs_only_the_out_dir_and_continues_exactly(char_shards, tmp_path):
    straight = tmp_path / "straight"
    ok(scratchlm("train", "--config", tiny_config(tmp_path, char_shards, straight), cwd=tmp_path))
    out = tmp_path / "run"
    config = tiny_config(tmp_path, char_shards, out)
    ok(scratchlm("train", "--config", config, "--set", "train.max_steps=4", cwd=tmp_path))
    config.unlink()  # nothing but the run folder is left of how it was started
    resumed = ok(
        scratchlm("train", "--resume", "--out", out, "--set", "train.max_steps=6", "--quiet", cwd=tmp_path)
    )
    changes = [line for line in resumed.stderr.splitlines() if line.startswith(("warning:", "note:"))]
    assert changes == ["note: train.max_steps = 6 (the run had 4): applied from step 4 on"]
    assert losses(out) == losses(straight)  # every other setting came from the run (lr = min_lr: no decay)


def test_resume_from_best_and_what_cannot_change(char_shards, tmp_path):
    out = tmp_path / "run"
    ok(scratchlm("train", "--config", tiny_config(tmp_path, char_shards, out), cwd=tmp_path))
    # Two steps at a learning rate that wrecks the model: last (step 8) is worse than best (step 6).
    ok(scratchlm("train", "--resume", "--out", out, "--set", "train.max_steps=8", "--set", "train.lr=5",
                 "--set", "train.min_lr=5", "--quiet", cwd=tmp_path))  # fmt: skip
    assert read_state(out / "last")["step"] == 8 and read_state(out / "best")["step"] == 6
    before = os.readlink(out / "last")
    refused = scratchlm("train", "--resume", "--out", out, "--set", "model.d_model=64", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "model.d_model = 64 here, 32 in the run" in refused.stderr.splitlines()[-1]
    refused = scratchlm("train", "--resume", "--out", out, "--set", "train.optimizer=muon", cwd=tmp_path)
    assert refused.returncode == 2 and "train.optimizer = 'muon' here, 'adamw' in the run" in refused.stderr
    assert os.readlink(out / "last") == before  # nothing written
    refused = scratchlm("train", "--resume-from", "best", "--out", out, cwd=tmp_path)
    assert refused.returncode == 2 and "--resume-from needs --resume" in refused.stderr
    resumed = ok(scratchlm("train", "--resume", "--resume-from", "best", "--out", out, "--set", "train.max_steps=8",
                           "--set", "train.lr=1e-3", "--set", "train.min_lr=1e-3", "--quiet", cwd=tmp_path))  # fmt: skip
    assert f"resumed from {out / 'best'}" in resumed.stderr and "at step 6" in resumed.stderr
    # compared with what best (step 6, before the wrecking lr) recorded: lr and min_lr are unchanged
    changes = [line for line in resumed.stderr.splitlines() if line.startswith(("warning:", "note:"))]
    assert changes == ["note: train.max_steps = 8 (the run had 6): applied from step 6 on"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "loss" in r and r["step"] > 6] == [
        1e-3,
        1e-3,
    ]  # not 5: the log was cut at 6
    assert read_state(out / "last")["step"] == 8


def test_a_resume_from_best_killed_before_its_first_save_leaves_last_its_log(char_shards, tmp_path):
    """Resuming from best (step 6) while last is step 8: the log keeps steps 7-8 of last's branch
    until the resumed run saves. Killed (SIGKILL) before that, a plain --resume continues from step 8
    with those rows intact, and the finished log holds each step once, last's branch's steps 7-8."""
    import signal
    import time

    out = tmp_path / "run"
    ok(scratchlm("train", "--config", tiny_config(tmp_path, char_shards, out), cwd=tmp_path))
    ok(scratchlm("train", "--resume", "--out", out, "--set", "train.max_steps=8", "--set", "train.lr=5",
                 "--set", "train.min_lr=5", "--quiet", cwd=tmp_path))  # fmt: skip
    assert read_state(out / "last")["step"] == 8 and read_state(out / "best")["step"] == 6
    before = (out / "metrics.jsonl").read_bytes()
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scratchlm", "train", "--resume", "--resume-from", "best", "--out", str(out),
             "--set", "train.max_steps=100000", "--set", "train.eval_interval=100000", "--set", "train.lr=1e-3",
             "--set", "train.min_lr=1e-3", "--quiet"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "resumed from" not in stderr.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.05)
            time.sleep(2)  # steps 7, 8, ... of the new branch run (and are logged, log_interval = 1)
            assert proc.poll() is None, stderr.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (out / "metrics.jsonl").read_bytes() == before  # no checkpoint of the new branch: no change
    assert read_state(out / "last")["step"] == 8
    kept = losses(out)
    ok(scratchlm("train", "--resume", "--out", out, "--set", "train.max_steps=10", "--quiet", cwd=tmp_path))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 11))
    assert {k: v for k, v in losses(out).items() if k <= 8} == kept
    assert [r["lr"] for r in records if "loss" in r and r["step"] in (7, 8)] == [5, 5]  # last's branch


def test_the_header_says_what_the_run_will_do(char_shards, tmp_path):
    from scratchlm.data.shards import open_shard
    from scratchlm.models.hf import export_note

    out = tmp_path / "run"
    done = ok(scratchlm("train", "--config", tiny_config(tmp_path, char_shards, out), "--json", cwd=tmp_path))
    summary = json.loads(done.stdout)  # --json: stdout is one JSON object; the header is on stderr
    model, _ = load_model_from_checkpoint(out / "last")
    train_tokens, val_tokens = (len(open_shard(Path(char_shards) / f"{s}.bin")) for s in ("train", "val"))
    header = done.stderr.splitlines()[:8]
    assert header == [
        f"parameters: {model.parameter_counts()['total']:,}",
        "device: cpu",
        "dtype: float32",
        f"data: {Path(char_shards).resolve()} (train {train_tokens:,} tokens, val {val_tokens:,} tokens)",
        "tokens per step: 128 = 4 windows x 32 context x 1 grad-accum x 1 process",
        "steps: 6, evaluating and saving every 2",
        f"writes: {out}/ (checkpoints/step-N with model.safetensors, optimizer.safetensors, tokenizer.json, "
        "state.json; last and best point at them; metrics.jsonl, loss.png)",
        export_note(model.config),
    ]
    assert header[-1].startswith("export: `scratchlm model export` writes it as ")
    assert summary["parameters"] == model.parameter_counts()["total"]


def test_a_tokenizer_with_neither_end_of_text_nor_newline_skips_the_samples(tmp_path):
    text = tmp_path / "one-line.txt"
    shakespeare = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    text.write_text(shakespeare[:200_000].replace("\n", " "), encoding="utf-8")
    ok(scratchlm("data", "prepare", text, "--out", tmp_path / "ds", cwd=tmp_path))
    ok(scratchlm("tokenizer", "train", "--kind", "char", "--no-special", "--dataset", tmp_path / "ds",
                 "--out", tmp_path / "char.json", cwd=tmp_path))  # fmt: skip
    ok(scratchlm("data", "tokenize", "--dataset", tmp_path / "ds", "--tokenizer", tmp_path / "char.json",
                 "--out", tmp_path / "shards", cwd=tmp_path))  # fmt: skip
    config = tiny_config(tmp_path, tmp_path / "shards", tmp_path / "run")
    done = ok(
        scratchlm("train", "--config", config, "--set", "train.sample_tokens=20", "--quiet", cwd=tmp_path)
    )
    notes = [line for line in done.stderr.splitlines() if "sample" in line]
    assert notes == [
        "note: no samples during training: the tokenizer has neither <|endoftext|> nor a newline to start one from"
    ]
    assert "step 6: train" in done.stderr


@pytest.mark.parametrize(
    "sets,warned",
    [
        (["train.max_steps=5"], False),  # the default warmup (100 steps) is not the user's doing
        (["train.max_steps=5", "train.warmup_steps=10"], True),
        (["train.max_steps=5", "train.warmup_steps=5"], False),  # the last step reaches train.lr
    ],
)
def test_the_warmup_warning_fires_only_for_the_users_own_warmup(char_shards, tmp_path, sets, warned):
    config = tmp_path / "no-warmup.toml"
    config.write_text(
        tiny_config(tmp_path, char_shards, tmp_path / "run").read_text().replace("warmup_steps = 2\n", "")
    )
    done = ok(scratchlm("train", "--config", config, *[a for s in sets for a in ("--set", s)], "--quiet",
                        cwd=tmp_path))  # fmt: skip
    assert ("warning: train.warmup_steps" in done.stderr) == warned, done.stderr


def test_fine_tuning_defaults_do_not_warn_about_warmup_but_a_users_warmup_does():
    """SFT, DPO and the reward model build their [train] config from their own defaults (a 20- or
    10-step warmup) under the user's values: only the user's values count."""
    from scratchlm.posttrain.base import CHAT_TRAIN_DEFAULTS
    from scratchlm.train.config import TrainConfig

    assert TrainConfig.from_dict({"max_steps": 5}, defaults=CHAT_TRAIN_DEFAULTS).warmup_warning() is None
    warning = TrainConfig.from_dict(
        {"max_steps": 5, "warmup_steps": 20}, defaults=CHAT_TRAIN_DEFAULTS
    ).warmup_warning()
    assert warning == (
        "warning: train.warmup_steps = 20 is more than train.max_steps = 5: "
        "the learning rate never reaches train.lr = 0.001"
    )


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_previous_checkpoint(char_shards, tmp_path):
    """Two real SIGINTs during a step (made slow on purpose): the first asks for a save after the
    step, the second aborts before it, with one line and no traceback; ``last`` is the step-2 one."""
    out = tmp_path / "run"
    config = tiny_config(tmp_path, char_shards, out)
    script = tmp_path / "slow.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "import scratchlm.data.loader as loader\n"
        "real, n = loader.BatchLoader.get_batch, [0]\n"
        "def get_batch(self):\n"
        "    n[0] += 1\n"
        "    if n[0] == 4:  # during step 4: Ctrl-C, then Ctrl-C again\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(5)\n"
        "    return real(self)\n"
        "loader.BatchLoader.get_batch = get_batch\n"
        "from scratchlm.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(config)!r}, '--quiet']))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        "scratchlm: aborted by a second Ctrl-C: nothing saved since the last checkpoint, which is kept"
    )
    assert read_state(out / "last")["step"] == 2
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
