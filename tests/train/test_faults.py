"""Training under faults: kills at every point of a checkpoint save, SIGTERM, a second trainer on
the same folder, corrupt checkpoint files, a full disk, a torn log line.

Every test drives the real failure: a child process killed with SIGKILL between two filesystem
operations, a real signal, a real second process, real damaged bytes on disk.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.io import FormatError
from scratchlm.models.checkpoint import is_complete, load_model_from_checkpoint, read_state
from scratchlm.train import train
from scratchlm.train.checkpoint import CheckpointStore

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "n_layer": 2,
    "n_head": 2,
    "d_model": 32,
    "block_size": 32,
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "relu2",
    "bias": False,
    "dropout": 0.1,
}


def config(shards, out, **train_overrides):
    return {
        "model": dict(TINY_MODEL),
        "train": {
            "data": str(shards),
            "out_dir": str(out),
            "batch_size": 4,
            "max_steps": 6,
            "eval_interval": 2,
            "eval_windows": 8,
            "warmup_steps": 2,
            "sample_tokens": 0,
            "lr": 3e-3,
            "log_interval": 5,
            **train_overrides,
        },
    }


def losses(out) -> dict[int, float]:
    records = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(char_shards, tmp_path_factory):
    """An uninterrupted run: what every interrupted-and-resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(config(char_shards, out), progress=False)
    return out


# --- a child that dies at the N-th filesystem operation of its k-th checkpoint save ----------------
KILLER = r"""
import json, os, signal, sys
sys.path.insert(0, {repo!r})
import scratchlm.models.checkpoint as fmt
import scratchlm.train.checkpoint as ck
from scratchlm.train import train

kill_at, target_save = {kill_at}, {target_save}
count = {{"saves": 0, "ops": 0, "active": False}}

def counted(module, name):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        if count["active"]:
            count["ops"] += 1
            if count["ops"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)

# Every call that changes the file system, or makes a change durable, during a save.
for name in ("mkdir", "open", "fchmod", "fsync", "rename", "replace", "symlink", "unlink", "rmdir"):
    counted(os, name)
counted(fmt, "save_file")  # safetensors writes each tensor file in one call

real_save = ck.CheckpointStore.save
def save(self, *args, **kwargs):
    count["saves"] += 1
    count["active"] = count["saves"] == target_save
    try:
        return real_save(self, *args, **kwargs)
    finally:
        count["active"] = False
ck.CheckpointStore.save = save

train(json.loads({cfg!r}), progress=False)
print(json.dumps({{"ops_in_target_save": count["ops"]}}))
"""


def run_killer(tmp_path, cfg, kill_at: int, target_save: int) -> subprocess.CompletedProcess:
    script = tmp_path / f"killer-{kill_at}.py"
    script.write_text(
        KILLER.format(repo=str(REPO), kill_at=kill_at, target_save=target_save, cfg=json.dumps(cfg))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow  # ~78 s (67-200 s on 2 shared cores): a child process per kill point
def test_kill_at_every_point_of_a_checkpoint_save_then_resume_is_exact(char_shards, reference, tmp_path):
    """SIGKILL before each filesystem operation of the 2nd save (step 4): resume always finds a complete
    checkpoint, and the finished run equals the uninterrupted one bit for bit."""
    dry = run_killer(tmp_path, config(char_shards, tmp_path / "dry"), kill_at=0, target_save=2)
    assert dry.returncode == 0, dry.stderr[-2000:]
    n_ops = json.loads(dry.stdout.strip().splitlines()[-1])["ops_in_target_save"]
    assert n_ops >= 20  # write 3 files, fsync them, rename, switch two links, delete the old folder...
    expected, final = losses(reference), weights(reference / "last")
    for kill_at in range(1, n_ops + 1):
        out = tmp_path / f"run-{kill_at}"
        killed = run_killer(tmp_path, config(char_shards, out), kill_at=kill_at, target_save=2)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
        # What a user finds after the crash: `last` reads, whole, at step 2 or 4.
        step = read_state(out / "last")["step"]
        assert step in (2, 4), kill_at
        assert (out / "best").is_symlink() and is_complete(out / "best"), kill_at
        train(config(char_shards, out), resume=True, progress=False)
        assert losses(out) == expected, f"resume after a kill at operation {kill_at} of {n_ops} diverged"
        resumed = weights(out / "last")
        assert all(torch.equal(resumed[k], final[k]) for k in final), kill_at
        # Recovery left only complete folders that a pointer names, and no temporary files.
        leftovers = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert len(leftovers) <= 2 and all(p.startswith("step-") for p in leftovers), (kill_at, leftovers)
        assert not list(out.glob(".*.tmp-*")), kill_at


def test_interrupted_save_of_the_old_layout_is_recovered(char_shards, reference, tmp_path):
    """scratchlm 0.1 renamed `last` away before renaming the new copy in; a kill between the two left
    only `.last.old-PID`. Start-up recovery puts it back, and resume continues exactly."""
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=6), progress=False)
    # Rebuild the old layout at step 6 from the new one: a plain folder with a version-1 state.json
    # (rank 0's RNG states only, no file checksums), then the crash state.
    step_folder = (out / os.readlink(out / "last")).resolve()
    state = json.loads((step_folder / "state.json").read_text())
    rank0 = state["rng"]["ranks"][0]
    state.update(version=1, rng={"torch": rank0["torch"], "loader": rank0["loader"], "cuda": []})
    del state["files"], state["world_size"]
    (step_folder / "state.json").write_text(json.dumps(state))
    for link in ("last", "best"):
        (out / link).unlink()
    os.rename(step_folder, out / ".last.old-12345")
    (out / ".last.tmp-12345").mkdir()  # the half-written new copy
    train(config(char_shards, out, max_steps=8), resume=True, progress=False)
    assert read_state(out / "last")["step"] == 8
    same_history = tmp_path / "new-layout"  # the same 6 + 2 steps, never in the old layout
    train(config(char_shards, same_history, max_steps=6), progress=False)
    train(config(char_shards, same_history, max_steps=8), resume=True, progress=False)
    assert losses(out) == losses(same_history)  # the version-1 RNG states were restored exactly
    assert not (out / ".last.old-12345").exists() and not (out / ".last.tmp-12345").exists()


def test_sigterm_saves_last_and_resume_is_exact(char_shards, reference, tmp_path):
    out = tmp_path / "run"
    cfg = config(char_shards, out, max_steps=6, eval_interval=100)  # no save except the one SIGTERM asks for
    script = tmp_path / "term.py"
    script.write_text(
        "import json, os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import scratchlm.data.loader as loader\n"
        "real, n = loader.BatchLoader.get_batch, [0]\n"
        "def get_batch(self):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler asks the run to stop, during step 3\n"
        "    return real(self)\n"
        "loader.BatchLoader.get_batch = get_batch\n"
        "from scratchlm.train import train\n"
        f"print(json.dumps(train(json.loads({json.dumps(cfg)!r}), progress=False)))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stop_reason"] == "signal" and summary["steps"] == 3
    assert read_state(out / "last")["step"] == 3
    train(config(char_shards, out, max_steps=6, eval_interval=100), resume=True, progress=False)
    uninterrupted = tmp_path / "straight"
    train(config(char_shards, uninterrupted, max_steps=6, eval_interval=100), progress=False)
    assert losses(out) == losses(uninterrupted)


def test_a_second_trainer_on_the_same_out_dir_is_refused_until_the_first_dies(char_shards, tmp_path):
    out = tmp_path / "run"
    cfg = config(char_shards, out, max_steps=100_000, eval_interval=100_000)
    script = tmp_path / "long.py"
    script.write_text(
        f"import json, sys\nsys.path.insert(0, {str(REPO)!r})\nfrom scratchlm.train import train\n"
        f"train(json.loads({json.dumps(cfg)!r}), progress=False)\n"
    )
    first = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        with pytest.raises(
            RuntimeError, match=rf"in use by another training run \(process {first.pid} holds"
        ):
            train(config(char_shards, out), progress=False)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The dead process's lock went with it: a new run may use the folder.
    summary = train(config(char_shards, out, max_steps=2), progress=False)
    assert summary["steps"] == 2


# --- damaged checkpoint files are refused by name --------------------------------------------------
def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) - 7] ^= 0x10  # one bit in the last tensor's bytes
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "file,how,message",
    [
        ("model.safetensors", "truncate", r"model\.safetensors: \d+ bytes, but the checkpoint recorded \d+"),
        ("model.safetensors", "flip", r"model\.safetensors: sha256 differs"),
        (
            "state.json",
            "truncate",
            r"state\.json: expected a 'scratchlm\.checkpoint' JSON file but it does not parse",
        ),
    ],
)
def test_damaged_checkpoint_files_are_refused_by_name(char_shards, reference, tmp_path, file, how, message):

    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree((reference / "last").resolve(), copy)
    damage(copy / file, how)
    with pytest.raises(FormatError, match=message):
        load_model_from_checkpoint(copy)
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm", "eval", "--checkpoint", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(copy / file) in result.stderr


def test_wrong_version_and_missing_keys_in_state_json(reference, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree((reference / "last").resolve(), copy)
    state = json.loads((copy / "state.json").read_text())
    (copy / "state.json").write_text(json.dumps({**state, "version": 99}))
    with pytest.raises(
        FormatError, match=r"state\.json: 'scratchlm\.checkpoint' version 99 is not supported"
    ):
        read_state(copy)
    del state["model"]
    (copy / "state.json").write_text(json.dumps(state))
    with pytest.raises(FormatError, match=r"state\.json: missing \['model'\]"):
        load_model_from_checkpoint(copy)


def test_bit_flip_in_optimizer_state_is_refused_on_resume(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=2), progress=False)
    damage((out / "last").resolve() / "optimizer.safetensors", "flip")
    with pytest.raises(FormatError, match=r"optimizer\.safetensors: sha256 differs"):
        train(config(char_shards, out, max_steps=4), resume=True, progress=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(char_shards, tmp_path, monkeypatch):
    import scratchlm.models.checkpoint as ck  # the checkpoint format writes the tensor files

    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=2), progress=False)
    before = read_state(out / "last")["step"]
    real = ck.save_file

    def full_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the device filled up halfway through the file
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(
        OSError, match=r"checkpoints: not enough free space to save the checkpoint step-00000004"
    ):
        train(config(char_shards, out, max_steps=4), resume=True, progress=False)
    monkeypatch.setattr(ck, "save_file", real)
    assert read_state(out / "last")["step"] == before and is_complete((out / "last").resolve())
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half folder left
    train(config(char_shards, out, max_steps=4), resume=True, progress=False)
    assert read_state(out / "last")["step"] == 4


def test_torn_last_line_of_the_metrics_log_is_tolerated_on_resume(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=4), progress=False)
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "loss": 2.1, "lr"')  # killed mid-write
    train(config(char_shards, out, max_steps=6), resume=True, progress=False)
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    # A damaged line that is not the last one is corruption, reported with its line number.
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(FormatError, match=r"metrics\.jsonl, line 3: not a JSON record"):
        train(config(char_shards, out, max_steps=8), resume=True, progress=False)


def test_store_points_last_and_best_at_immutable_step_folders(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=6), progress=False)
    assert (out / "last").is_symlink() and os.readlink(out / "last").startswith("checkpoints/step-")
    store = CheckpointStore(out)
    assert all(is_complete(f) for f in store.complete_folders())
    assert {p.name for p in (out / "checkpoints").iterdir()} == {
        Path(os.readlink(out / n)).name for n in ("last", "best")
    }


def test_sampling_from_a_checkpoint_does_not_import_the_trainer(reference):
    """Inference reads checkpoints through scratchlm.models.checkpoint; scratchlm.train stays unloaded."""
    code = (
        "import sys\nfrom scratchlm.cli import main\n"
        f"assert main(['sample', '--checkpoint', {str(reference / 'last')!r}, '--max-new-tokens', '5', '--json']) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('scratchlm.train'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


# --- review findings: recovery never destroys what it cannot read; names it does not own stay --------
def test_an_unreadable_checkpoint_is_never_deleted_and_a_fresh_run_needs_overwrite(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=2), progress=False)
    folder = (out / "last").resolve()
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "version": 99}))  # a newer scratchlm wrote it
    done = CheckpointStore(out).recover()
    assert folder.is_dir() and (out / "last").resolve() == folder, done
    assert any("left untouched" in m for m in done)
    with pytest.raises(FormatError, match="version 99 is not supported"):
        train(config(char_shards, out, max_steps=4), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run .*--resume.*--overwrite"):
        train(config(char_shards, out, max_steps=2), progress=False)
    assert folder.is_dir()
    train(config(char_shards, out, max_steps=2), progress=False, overwrite=True)
    assert (
        folder.is_dir() and (folder / "model.safetensors").is_file()
    )  # still there, still not ours to delete
    assert (out / "last").resolve() != folder and read_state(out / "last")["step"] == 2


def test_a_fresh_run_with_overwrite_does_not_keep_the_old_runs_best(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=6, eval_interval=2), progress=False)
    old_best = read_state(out / "best")["best_val"]
    train(
        config(char_shards, out, max_steps=2, eval_interval=2, lr=0.0, min_lr=0.0),
        progress=False,
        overwrite=True,
    )
    assert read_state(out / "best")["step"] == 2  # the new run's, although the old best had a lower loss
    assert read_state(out / "best")["best_val"] > old_best
    assert len(list((out / "checkpoints").iterdir())) == 1


def test_recovery_and_garbage_collection_touch_only_names_they_create(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=2), progress=False)
    mine = [
        out / ".notes.tmp-1",
        out / ".cache.old-5",
        out / "checkpoints" / "notes.txt",
        out / "checkpoints" / ".hidden",
        out / "checkpoints" / "step-final",
        out / "checkpoints" / "step-00000099",
    ]
    for path in mine:
        if path.suffix == ".txt" or path.name.startswith(".notes"):
            path.write_text("a user's file")
        else:
            path.mkdir()
            (path / "data").write_text("a user's file")
    train(config(char_shards, out, max_steps=4), resume=True, progress=False)
    CheckpointStore(out).recover()
    assert all(path.exists() for path in mine), [p for p in mine if not p.exists()]
    with pytest.raises(ValueError, match="empty string"):
        CheckpointStore("")


def test_readers_never_mix_two_checkpoints_while_last_is_repointed(char_shards, tmp_path):
    """A sampler or server loads `last` while training re-points it: every load must give the state
    and weights of one folder, never a false checksum error from reading across the switch."""
    import shutil
    import threading

    a, b = tmp_path / "a", tmp_path / "b"
    train(config(char_shards, a, max_steps=2), progress=False)
    train(config(char_shards, b, max_steps=4), progress=False)
    folder_a = (a / "last").resolve()
    folder_b = a / "checkpoints" / "step-00000004"
    shutil.copytree((b / "last").resolve(), folder_b)
    expected = {2: weights(folder_a), 4: weights(folder_b)}
    store, stop, errors = CheckpointStore(a), threading.Event(), []

    def flip():
        while not stop.is_set():
            store._point("last", folder_b)
            store._point("last", folder_a)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for _ in range(300):
            try:
                model, state = load_model_from_checkpoint(a / "last")
            except (FormatError, OSError) as e:
                errors.append(repr(e))
                continue
            got = model.state_dict()
            assert all(torch.equal(got[k], v) for k, v in expected[state["step"]].items() if k in got)
    finally:
        stop.set()
        flipper.join()
    assert not errors, errors[:3]


def test_sigterm_on_an_eval_step_saves_at_once_and_the_resumed_run_evaluates_first(char_shards, tmp_path):
    out = tmp_path / "run"
    cfg = config(char_shards, out, max_steps=6, eval_interval=3)
    script = tmp_path / "term.py"
    script.write_text(
        "import json, os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import scratchlm.data.loader as loader\n"
        "real, n = loader.BatchLoader.get_batch, [0]\n"
        "def get_batch(self):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # during step 3, which ends with a scheduled eval\n"
        "    return real(self)\n"
        "loader.BatchLoader.get_batch = get_batch\n"
        "from scratchlm.train import train\n"
        f"print(json.dumps(train(json.loads({json.dumps(cfg)!r}), progress=False)))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stop_reason"] == "signal" and summary["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == []  # no evaluation: a fast stop
    state = read_state(out / "last", resumable=True)
    assert state["step"] == 3 and state["eval_pending"] is True
    train(config(char_shards, out, max_steps=6, eval_interval=3), resume=True, progress=False)
    straight = tmp_path / "straight"
    train(config(char_shards, straight, max_steps=6, eval_interval=3), progress=False)

    def val(o):
        records = map(json.loads, (o / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]

    assert losses(out) == losses(straight) and val(out) == val(straight)


def test_a_time_limit_eval_off_the_schedule_does_not_count_towards_patience(char_shards, tmp_path):
    out = tmp_path / "run"
    frozen = dict(lr=0.0, min_lr=0.0, warmup_steps=0, eval_interval=100, patience=2, max_steps=20)
    train(
        config(char_shards, out, max_minutes=1e-9, **frozen), progress=False
    )  # stops after step 1, evaluates
    train(
        config(char_shards, out, max_minutes=1e-9, **frozen), resume=True, progress=False
    )  # step 2, same val
    state = read_state(out / "last", resumable=True)
    assert state["step"] == 2 and state["evals_without_improvement"] == 0


def test_an_improving_eval_off_the_schedule_does_not_reset_patience(char_shards, tmp_path):
    """Frozen weights: every evaluation gives the same loss. An uninterrupted run improves at its
    first scheduled eval (step 4) and stops early at the second (step 8). A run stopped by a time
    limit at step 1 evaluates there (off the schedule, an "improvement" from nothing); resumed, it
    must still stop at step 8, not at 4."""
    frozen = dict(lr=0.0, min_lr=0.0, warmup_steps=0, eval_interval=4, patience=1, max_steps=12)
    straight = train(config(char_shards, tmp_path / "straight", **frozen), progress=False)
    assert straight["stop_reason"] == "early_stopping" and straight["steps"] == 8
    out = tmp_path / "run"
    first = train(config(char_shards, out, max_minutes=1e-9, **frozen), progress=False)
    assert first["stop_reason"] == "max_minutes" and first["steps"] == 1
    resumed = train(config(char_shards, out, **frozen), resume=True, progress=False)
    assert resumed["stop_reason"] == "early_stopping" and resumed["steps"] == 8


def test_version_1_cuda_rng_states_map_to_this_process_device():
    from scratchlm.train.distributed import rng_states_by_rank

    v1 = {"torch": "t", "loader": "l", "cuda": ["gpu0", "gpu1"]}
    assert rng_states_by_rank(v1, torch.device("cuda", 1))[0]["cuda"] == "gpu1"
    assert rng_states_by_rank(v1, torch.device("cuda"))[0]["cuda"] == "gpu0"
    assert rng_states_by_rank(v1, torch.device("cpu"))[0]["cuda"] is None
    assert rng_states_by_rank({"ranks": [{"torch": "x"}]}, torch.device("cpu")) == [{"torch": "x"}]


def test_a_kill_while_adopting_a_legacy_best_keeps_it(char_shards, tmp_path):
    """scratchlm < 0.2 kept `best` as a plain folder; adopting it is a rename then a link. A kill
    between the two leaves checkpoints/legacy-best unnamed: recovery must point `best` at it, not
    collect it as garbage."""
    import shutil

    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=4, eval_interval=2), progress=False)
    best = (out / "best").resolve()
    (out / "best").unlink()
    shutil.copytree(best, out / "checkpoints" / "legacy-best")  # renamed, then killed before the link
    if best != (out / "last").resolve():
        shutil.rmtree(best)
    CheckpointStore(out).recover()
    assert (out / "best").is_symlink() and os.readlink(out / "best") == "checkpoints/legacy-best"
    assert is_complete(out / "best")


def test_store_edge_cases_symlinks_long_step_names_odd_files_and_legacy_leftovers(char_shards, tmp_path):
    """GC never deletes a link's target, handles 9-digit step names, odd 'files' records read as
    incomplete (not a crash), and a legacy leftover is kept while last does not read."""
    import shutil

    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=2), progress=False)
    store = CheckpointStore(out)
    done = store.complete_folders()[-1]
    foreign = tmp_path / "someone-elses"  # a complete checkpoint elsewhere, linked under a step name
    shutil.copytree(done, foreign)
    (out / "checkpoints" / "step-00000077").symlink_to(foreign)
    big = out / "checkpoints" / "step-123456789"  # past 99,999,999 steps: a name of ours, unreferenced
    shutil.copytree(done, big)
    store.collect_garbage()
    assert foreign.is_dir() and (foreign / "state.json").exists() and not big.exists()
    odd = tmp_path / "odd"
    shutil.copytree(done, odd)
    state = json.loads((odd / "state.json").read_text())
    for files in ([1, 2], {"model.safetensors": 5}, {"model.safetensors": {"size": 1}}):
        (odd / "state.json").write_text(json.dumps({**state, "files": files}))
        assert is_complete(odd) is False
    # scratchlm < 0.2 left .last.old-PID; last does not read: the old copy is the one to keep
    (out / "checkpoints" / "step-00000077").unlink()
    legacy = out / ".last.old-4242"
    shutil.copytree(done, legacy)
    (out / "last").unlink()
    (out / "last").symlink_to(odd)  # odd does not read
    notes = CheckpointStore(out).recover()
    assert legacy.is_dir() and any("kept .last.old-4242" in n for n in notes)


def test_resuming_from_an_unreadable_last_names_the_complete_checkpoints(char_shards, tmp_path):
    out = tmp_path / "run"
    import shutil

    train(config(char_shards, out, max_steps=4, eval_interval=2), progress=False)
    damaged = out / "checkpoints" / "step-00000005"  # last points at a damaged folder; best is whole
    shutil.copytree((out / "last").resolve(), damaged)
    (damaged / "state.json").write_text("{not json")
    (out / "last").unlink()
    (out / "last").symlink_to("checkpoints/step-00000005")
    best = (out / "best").resolve().name
    with pytest.raises(FormatError, match=rf"ln -sfn checkpoints/{best} .*last"):
        train(config(char_shards, out, max_steps=6, eval_interval=2), resume=True, progress=False)


def test_overwrite_removes_the_old_runs_tensorboard_logs(char_shards, tmp_path):
    out = tmp_path / "run"
    train(config(char_shards, out, max_steps=2), progress=False)
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1").write_text("old curves")
    train(config(char_shards, out, max_steps=2), overwrite=True, progress=False)
    assert not (out / "tensorboard" / "events.out.tfevents.1").exists()


def test_eval_refuses_an_unfinished_or_damaged_shards_folder(char_shards, reference, tmp_path):
    import shutil

    from scratchlm.data.shards import ShardError
    from scratchlm.eval import evaluate_checkpoint

    data = tmp_path / "shards"
    shutil.copytree(char_shards, data)
    raw = bytearray((data / "val.bin").read_bytes())
    raw[-1] ^= 1  # one flipped bit in the ids
    (data / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="sha256 differs"):
        evaluate_checkpoint(reference / "last", data, splits=["val"])
    (data / "shards.json").unlink()
    with pytest.raises(ShardError, match="no shards.json"):
        evaluate_checkpoint(reference / "last", data, splits=["val"])
