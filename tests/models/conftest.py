"""Makes ``hf_models`` (the random transformers models and the shared Hugging Face checks) importable
from every test under ``tests/models``: pytest puts only a test file's own folder on ``sys.path``,
so ``tests/models/blocks/`` would not see it otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
