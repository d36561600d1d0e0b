"""Atomic writes: a failure mid-write leaves the old file and no temporary file behind."""

from __future__ import annotations

import pytest
from processes import UNSHARE, require_private_tmpfs

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


def test_is_disk_full_knows_enospc_and_safetensors_wrapping_and_nothing_looser(tmp_path):
    """Real errors from a real full disk (an unprivileged 64 kB tmpfs): Python's OSError and
    safetensors' SafetensorError ``… (os error 28)``; an error that merely mentions a code 28 is not
    a full disk."""
    import json
    import os
    import subprocess
    import sys

    from scratchlm.io import is_disk_full

    require_private_tmpfs("a real full disk")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        "import json, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from scratchlm.io import is_disk_full\n"
        "errors = []\n"
        f"for write in (lambda: open({str(disk / 'a')!r}, 'wb').write(bytes(1 << 20)),\n"
        f"              lambda: save_file({{'w': torch.zeros(1 << 18)}}, {str(disk / 'b')!r})):\n"
        "    try:\n"
        "        write()\n"
        "    except Exception as e:\n"
        "        errors.append([type(e).__name__, isinstance(e, OSError), str(e), is_disk_full(e)])\n"
        "print(json.dumps(errors))\n"
    )
    done = subprocess.run(
        [*UNSHARE, "sh", "-c",
         f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} -c \"$0\"", script],
        capture_output=True, text=True, timeout=120, env=os.environ,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (python_name, python_is_oserror, _, python_full), (st_name, st_is_oserror, st_text, st_full) = json.loads(
        done.stdout
    )
    assert python_is_oserror and python_full
    assert not st_is_oserror and "(os error 28)" in st_text and st_full  # wrapped: matched by its text
    assert not is_disk_full(RuntimeError("the server answered with error code: 28 (rate limited)"))
    assert not is_disk_full(ValueError("column 28: No space left on device expected here"))
