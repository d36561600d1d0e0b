"""Safe file writing and versioned JSON: every file the project writes goes through here.

Two promises hold for every file scratchlm writes:

* writes are atomic: a temporary file in the same folder is written, flushed, fsynced and then
  renamed over the target, so a crash never leaves a half-written file behind (and
  :func:`fsync_dir` makes a rename itself durable);
* every JSON file carries a ``format`` name and a ``version``, and :func:`read_json` checks both
  and says what was expected, what was found and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class FormatError(ValueError):
    """A file is not what it claims to be (wrong format, version, or corrupt content)."""


class DiskFullError(OSError):
    """Not enough free space for what is being written; the message names the folder, the space
    needed and the space free (``errno`` is ENOSPC, as for the operating system's own error)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(error: BaseException) -> bool:
    """An ``OSError`` ENOSPC (or EDQUOT, a full quota), or a library's wrapped form of it: Rust's
    ``(os error 28)``, as safetensors reports it. Nothing looser (an HTTP or exit "code: 28" is not
    a full disk)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"(os error {errno.ENOSPC})" in str(error)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def current_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere reading it means setting it (and setting
    it straight back), which another thread creating a file at that instant could notice."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file that a library created with its own mode (safetensors writes 0600) the mode a
    plain ``open()`` would have given it, so a user's umask decides who can read what we write."""
    os.chmod(path, new_file_mode())


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return new_file_mode()


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers that were killed (their PID is gone).

    A temporary file is never mistaken for the real one (it has another name); this only keeps a
    folder from collecting them.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 minus umask),
        # or, when replacing a file, that file's mode.
        os.fchmod(fd, _target_mode(path))
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries durable (a file renamed into it, created or removed): fsync the folder
    itself. Without it a rename can be lost by a power cut even though the file's data was synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: dict, *, indent: int | None = 1) -> None:
    """Atomically write ``obj`` (which must carry ``format`` and ``version``) as UTF-8 JSON."""
    if "format" not in obj or "version" not in obj:
        raise ValueError("every JSON file scratchlm writes needs 'format' and 'version' keys")
    with atomic_write(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def read_json(path: str | os.PathLike, fmt: str, versions: tuple[int, ...] = (1,)) -> dict:
    """Read a JSON file written by :func:`write_json` and check its format name and version."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(
            f"{path}: expected a {fmt!r} JSON file but it does not parse ({e}); "
            "the file is corrupt or truncated: recreate it"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{path}: expected format {fmt!r}, found {found!r}; is this the right file?")
    if obj.get("version") not in versions:
        raise FormatError(
            f"{path}: {fmt!r} version {obj.get('version')!r} is not supported "
            f"(this scratchlm reads versions {list(versions)}); recreate the file with this version"
        )
    return obj


def json_sha256(obj: dict) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces, as it reads back from a file):
    the same for the object before writing and after reading, however the file was indented."""
    canonical = json.dumps(
        json.loads(json.dumps(obj)), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()
