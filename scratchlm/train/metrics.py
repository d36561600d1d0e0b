"""The training log read back: ``metrics.jsonl`` holds one JSON record per logged step or evaluation."""

from __future__ import annotations

import json
from pathlib import Path


def read_evaluations(out_dir: str | Path, key: str) -> list[dict]:
    """The evaluation records of a run's ``metrics.jsonl`` that carry ``key`` (rank 0 writes the file:
    on other machines of a multi-machine run it may not be there, and then there are none)."""
    metrics = Path(out_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return [r for r in records if key in r]
