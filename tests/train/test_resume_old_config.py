"""A run started before the attention settings moved into ``[model.attn]`` resumes after the move.

Its checkpoints' ``state.json`` spell the settings at the top of the model dict (``sliding_window``,
``qk_norm``, ...). Resuming compares configs, not dicts: the old spelling and the new one are the
same model, and the resumed run's losses equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scratchlm.train import train

MODEL = {
    "n_layer": 2,
    "n_head": 2,
    "d_model": 32,
    "block_size": 32,
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "relu2",
    "bias": False,
    "layers": ["sliding", "attention"],
    "attn": {"window": 8, "qk_norm": True},
}


def config(shards, out, max_steps):
    return {
        "model": json.loads(json.dumps(MODEL)),
        "train": {
            "data": str(shards),
            "out_dir": str(out),
            "batch_size": 4,
            "max_steps": max_steps,
            "eval_interval": 2,
            "eval_windows": 8,
            "warmup_steps": 1,
            "sample_tokens": 0,
            "lr": 3e-3,
            "log_interval": 1,
        },
    }


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_checkpoint_with_the_old_attention_keys_resumes_exactly(char_shards, tmp_path):
    straight = tmp_path / "straight"
    train(config(char_shards, straight, 4), progress=False)
    run = tmp_path / "run"
    train(config(char_shards, run, 2), progress=False)
    # Rewrite the checkpoint's model config as the code before the move wrote it.
    state_path = (run / os.readlink(run / "last")).resolve() / "state.json"
    state = json.loads(state_path.read_text())
    attn = state["model"].pop("attn")
    state["model"].update(sliding_window=attn["window"], qk_norm=attn["qk_norm"])
    state["version"] = 2  # that code wrote version 2: no checksum of state.json itself
    del state["state_sha256"]
    state_path.write_text(json.dumps(state))
    train(config(char_shards, run, 4), resume=True, progress=False)
    assert losses(run) == losses(straight)
