"""The learning-rate schedule against its formula written out by hand: linear warm-up to ``lr`` over
``warmup_steps`` (step s, 0-based, gets ``lr·(s+1)/warmup``), then cosine decay to ``min_lr`` at
``max_steps``, ``min_lr`` after it; and the ``lr`` column a real run writes to ``metrics.jsonl``."""

from __future__ import annotations

import json
import math

import pytest

from scratchlm.train.schedule import lr_at

MAX, MIN, WARMUP, TOTAL = 3e-3, 3e-4, 10, 110


def by_hand(step: int) -> float:
    if step < WARMUP:
        return MAX * (step + 1) / WARMUP
    if step >= TOTAL:
        return MIN
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return MIN + (MAX - MIN) * (1 + math.cos(math.pi * progress)) / 2


def lr(step, **kw):
    return lr_at(step, **{"max_lr": MAX, "min_lr": MIN, "warmup_steps": WARMUP, "total_steps": TOTAL, **kw})


def test_the_schedule_at_its_landmarks():
    assert lr(0) == pytest.approx(MAX / WARMUP, rel=1e-12)  # the first step already moves (not 0)
    assert lr(WARMUP - 2) == pytest.approx(MAX * (WARMUP - 1) / WARMUP, rel=1e-12)
    assert lr(WARMUP - 1) == pytest.approx(MAX, rel=1e-12)  # warm-up ends at the peak ...
    assert lr(WARMUP) == pytest.approx(MAX, rel=1e-12)  # ... and the cosine starts there (progress 0)
    assert lr(WARMUP + (TOTAL - WARMUP) // 2) == pytest.approx((MAX + MIN) / 2, rel=1e-12)  # midway
    assert lr(WARMUP + (TOTAL - WARMUP) // 4) == pytest.approx(MIN + (MAX - MIN) * (1 + 0.5**0.5) / 2)
    last = lr(TOTAL - 1)  # the last step: one cosine step above the floor
    assert last == pytest.approx(
        MIN + (MAX - MIN) * (1 - math.cos(math.pi / (TOTAL - WARMUP))) / 2, rel=1e-12
    )
    assert MIN < last < MIN * 1.01
    assert lr(TOTAL) == MIN and lr(TOTAL + 50) == MIN


def test_every_step_equals_the_formula_and_the_decay_is_monotone():
    values = [lr(s) for s in range(TOTAL + 5)]
    for step, value in enumerate(values):
        assert value == pytest.approx(by_hand(step), rel=1e-12, abs=0), step
    assert all(a < b for a, b in zip(values[: WARMUP - 1], values[1:WARMUP]))  # rising warm-up
    assert all(a > b for a, b in zip(values[WARMUP : TOTAL - 1], values[WARMUP + 1 : TOTAL]))  # decay


def test_edge_cases_no_warmup_and_warmup_to_the_end():
    assert lr(0, warmup_steps=0) == pytest.approx(MAX, rel=1e-12)  # no warm-up: cosine from step 0
    assert lr(50, warmup_steps=0, total_steps=100) == pytest.approx((MAX + MIN) / 2, rel=1e-12)
    # warm-up as long as the run: never decays (no division by zero either)
    assert [lr(s, warmup_steps=4, total_steps=4) for s in range(5)] == pytest.approx(
        [MAX / 4, MAX / 2, 3 * MAX / 4, MAX, MIN], rel=1e-12
    )
    assert lr(3, warmup_steps=2, total_steps=3) == MIN
    assert lr(2, warmup_steps=2, total_steps=3) == pytest.approx(MAX, rel=1e-12)  # progress 0 of 1


def test_the_logged_lr_of_a_real_run_follows_the_schedule(char_shards, tmp_path):
    from scratchlm.train import train

    steps, warmup, peak, floor = 12, 4, 2e-3, 2e-4
    train(
        {
            "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 16, "position": "rope"},
            "train": {
                "data": str(char_shards),
                "out_dir": str(tmp_path / "run"),
                "batch_size": 2,
                "max_steps": steps,
                "warmup_steps": warmup,
                "lr": peak,
                "min_lr": floor,
                "log_interval": 1,
                "eval_interval": 100,
                "eval_windows": 4,
                "sample_tokens": 0,
            },
        },
        progress=False,
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    # The log counts steps done (1 .. max_steps); step n ran with lr_at(n - 1), the 0-based index.
    assert sorted(logged) == list(range(1, steps + 1))
    for step, value in logged.items():
        s = step - 1
        if s < warmup:
            expected = peak * (s + 1) / warmup
        else:
            expected = floor + (peak - floor) * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) / 2
        assert value == pytest.approx(expected, rel=1e-9), (step, logged)
    assert logged[warmup] == pytest.approx(peak) and floor < logged[steps] < 1.5 * floor
