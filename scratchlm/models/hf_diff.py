"""Hugging Face interchange for one family of architectures (issue 9; being written).

``IMPORT`` maps a ``model_type`` to (config reader, tensor renamer) and ``EXPORT`` an architecture
name to an exporter, as in :mod:`scratchlm.models.hf`.
"""

from __future__ import annotations

IMPORT: dict = {}
EXPORT: dict = {}
