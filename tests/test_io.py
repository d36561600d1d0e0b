"""Atomic writes: a failure mid-write leaves the old file and no temporary file behind."""

from __future__ import annotations

import pytest

from scratchlm.io import atomic_write, read_json, write_json


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_json_requires_and_checks_format_and_version(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_json(tmp_path / "x.json", {"a": 1})
    write_json(tmp_path / "x.json", {"format": "demo", "version": 2, "a": 1})
    assert read_json(tmp_path / "x.json", "demo", (2,))["a"] == 1
    with pytest.raises(ValueError, match="version 2 is not supported"):
        read_json(tmp_path / "x.json", "demo", (1,))
