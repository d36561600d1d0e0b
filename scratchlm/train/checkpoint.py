"""A training run's store of checkpoints: step folders, the ``last``/``best`` links, the run lock, recovery.

Each checkpoint is a folder in the format of :mod:`scratchlm.models.checkpoint` (which writes and
reads one). A run's ``out_dir`` holds them so that a kill at *any* moment leaves a complete
checkpoint to resume from (atomic by construction, see :class:`CheckpointStore`)::

    out_dir/.lock                      held (flock) while a run writes here; dies with the process
    out_dir/checkpoints/step-00000500/ immutable: written as .step-00000500.tmp-PID, renamed when complete
    out_dir/last -> checkpoints/step-00000500     symbolic links, each replaced atomically
    out_dir/best -> checkpoints/step-00000250

Optimizer state travels keyed by parameter *name* (:func:`optimizer_states`, :func:`load_optimizers`),
the form FSDP uses too, so a checkpoint resumes sharded or not.

It runs a little past 400 lines: recovery after a kill (every state a crash can leave, each
named and handled) belongs beside the save whose steps it undoes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

import torch

from scratchlm.io import FormatError, fsync_dir
from scratchlm.models.checkpoint import is_complete, load_tensors, publish_folder, read_state


def optimizer_states(model: torch.nn.Module, optimizers, sharded: bool = False) -> list[dict]:
    """Each optimizer's state keyed by parameter *name*, the form FSDP uses too."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for opt in optimizers:
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]  # state_dict numbers them so
        sd = opt.state_dict()
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
        out.append({"state": {order[i]: st for i, st in sd["state"].items()}, "param_groups": groups})
    return out


class RunLock:
    """``out_dir/.lock``, held with ``flock`` while a run writes into ``out_dir``.

    The kernel drops a flock when its process dies (even by SIGKILL), so a crashed run never
    blocks the next one; the PID written into the file is only there for the error message.
    """

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".lock"
        self._file = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open: the flock lives as long as the run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RuntimeError(
                f"{self.path.parent} is in use by another training run (process {holder} holds {self.path}); "
                "wait for it to finish, stop it, or choose another train.out_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class CheckpointStore:
    """The checkpoints of one training run, atomic by construction.

    ``save`` writes an immutable folder ``checkpoints/step-N`` under a temporary name, renames it
    once complete, then points ``last`` (and ``best``) at it by replacing a symbolic link with
    ``os.replace`` -- a single atomic step. Only then are folders no pointer names deleted (moved
    to a hidden trash name first, so a half-deleted folder never carries a valid name). A kill at
    any moment therefore leaves each pointer on a complete folder, old or new; :meth:`recover`
    (run at start-up, under the run lock) removes the leftovers of an interrupted save.
    """

    POINTERS = ("last", "best")
    # Exactly the names this class creates; recovery and garbage collection touch nothing else.
    STEP = re.compile(r"step-\d{8,}(-\d+)?")  # 8 digits, more past step 99,999,999
    LEGACY = re.compile(r"legacy-(last|best)(-\d+)?")
    TEMP_LINK = re.compile(r"\.(last|best)\.tmp-\d+")  # a pointer being replaced
    LEGACY_OLD = re.compile(r"\.last\.old-\d+")  # scratchlm < 0.2's copy of last during a save
    LEGACY_TMP = re.compile(r"\.last\.tmp-\d+")  # scratchlm < 0.2's new last being written (a folder)
    TEMP_FOLDER = re.compile(r"\.(step-\d{8,}(-\d+)?)\.tmp-\d+")  # a checkpoint being written
    TRASH = re.compile(r"\.trash-(step-\d{8,}(-\d+)?|legacy-(last|best)(-\d+)?)-\d+")  # being deleted

    def __init__(self, out_dir: str | Path):
        if not str(out_dir).strip():
            raise ValueError("the output folder is an empty string; name a folder (train.out_dir)")
        self.out = Path(out_dir)
        self.folder = self.out / "checkpoints"

    def _ours(self, folder: Path) -> bool:
        """A folder this store may delete: one of its names, a real folder (never a link to somewhere
        else), holding a checkpoint that reads."""
        return (
            not folder.is_symlink()
            and bool(self.STEP.fullmatch(folder.name) or self.LEGACY.fullmatch(folder.name))
            and is_complete(folder)
        )

    def pointer(self, name: str) -> Path:
        return self.out / name

    def save(
        self,
        names: list[str],
        weights: dict[str, torch.Tensor],
        optimizer_state: list[dict],
        state: dict,
        tokenizer=None,
        extra_files: dict[str, bytes] | None = None,
    ) -> Path:
        """Write one checkpoint and point each of ``names`` (``last``, ``best``) at it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._free_name(f"step-{int(state['step']):08d}")
        publish_folder(target, weights, optimizer_state, state, tokenizer, extra_files)
        for name in names:
            self._point(name, target)
        fsync_dir(self.out)
        self.collect_garbage()
        return target

    def _free_name(self, base: str) -> Path:
        """``step-N``, or ``step-N-2``... when a folder of that step is still referenced (a fresh run
        in an old ``out_dir`` reaches a step number the old run had saved)."""
        candidate, k = self.folder / base, 1
        while candidate.exists() or candidate.is_symlink():
            if candidate.name not in self._referenced() and self._ours(candidate):
                self._delete(candidate)
                break
            k += 1
            candidate = self.folder / f"{base}-{k}"
        return candidate

    def _point(self, name: str, target: Path) -> None:
        link = self.pointer(name)
        if link.is_dir() and not link.is_symlink():
            self._adopt_legacy(name)
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.path.relpath(target, self.out), tmp)
        os.replace(tmp, link)

    def _referenced(self) -> set[str]:
        """Names of the folders under ``checkpoints/`` that a pointer names."""
        return {
            Path(os.readlink(self.pointer(n))).name for n in self.POINTERS if self.pointer(n).is_symlink()
        }

    def _delete(self, folder: Path) -> None:
        trash = self.folder / f".trash-{folder.name}-{os.getpid()}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def collect_garbage(self) -> None:
        """Delete the complete checkpoints that no pointer names. A folder that does not read (a
        newer format, a damaged file, someone else's folder) is never deleted: it is reported."""
        if not self.folder.is_dir():
            return
        keep = self._referenced()
        for folder in self.folder.iterdir():
            if folder.name in keep or folder.is_symlink() or not folder.is_dir():
                continue
            if self._ours(folder):
                self._delete(folder)

    def unreadable(self) -> list[Path]:
        """Folders under checkpoints/ with a checkpoint name that do not read as a checkpoint."""
        if not self.folder.is_dir():
            return []
        return sorted(
            f
            for f in self.folder.iterdir()
            if (self.STEP.fullmatch(f.name) or self.LEGACY.fullmatch(f.name)) and not is_complete(f)
        )

    def run_summary(self) -> str | None:
        """What a previous run left here ("last -> step-00000500, best -> ..."), or None if nothing."""
        parts = [
            f"{n} -> {os.readlink(self.pointer(n))}" for n in self.POINTERS if self.pointer(n).is_symlink()
        ]
        if (
            not parts
            and self.folder.is_dir()
            and any(self.STEP.fullmatch(f.name) for f in self.folder.iterdir())
        ):
            parts.append(f"checkpoints in {self.folder}")
        return ", ".join(parts) or None

    def clear(self) -> None:
        """Forget the previous run (``--overwrite``): remove the pointers, then its checkpoints."""
        for name in self.POINTERS:
            if self.pointer(name).is_symlink():
                self.pointer(name).unlink()
        fsync_dir(self.out)
        self.collect_garbage()

    def _adopt_legacy(self, name: str) -> Path | None:
        """A checkpoint from scratchlm < 0.2 is a plain folder named ``last``/``best``: move it into
        ``checkpoints/`` (one atomic rename) and link it, so it is kept and replaced safely."""
        link = self.pointer(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"legacy-{name}"
        k = 1
        while target.exists():
            k += 1
            target = self.folder / f"legacy-{name}-{k}"
        os.rename(link, target)
        self._point(name, target)
        return target

    def complete_folders(self) -> list[Path]:
        """Step folders whose state.json reads and whose tensor files have the recorded sizes, oldest first."""
        found = []
        if self.folder.is_dir():
            for folder in self.folder.iterdir():
                if self._ours(folder):
                    found.append(folder)
        return sorted(found, key=lambda f: (read_state(f)["step"], f.stat().st_mtime))

    def recover(self, log=None) -> list[str]:
        """Bring ``out_dir`` back to a clean state after a crash; returns what was done.

        Removes the temporary links and folders and the trash of an interrupted save (only names
        this store creates); adopts a legacy folder; repoints a *missing or dangling* ``last`` (or
        ``best``) at the newest complete checkpoint (for ``best``: a legacy one being adopted);
        restores a legacy ``.last.old-PID`` folder (left when the old format was killed between its
        two renames); deletes complete checkpoints nothing points to. A pointer to a folder that
        exists but does not read is left alone and reported: that folder may be a newer format or
        a damaged file someone wants to rescue, and is never deleted.
        """
        done: list[str] = []
        if not self.out.is_dir():
            return done
        for leftover in sorted(self.out.iterdir()):
            name = leftover.name
            last = self.pointer("last")
            if (
                (self.LEGACY_OLD.fullmatch(name) or self.LEGACY_TMP.fullmatch(name))
                and leftover.is_dir()
                and not leftover.is_symlink()
            ):
                # scratchlm < 0.2 saved by renaming last to .last.old-PID, then .last.tmp-PID to last.
                if not last.exists() and not last.is_symlink() and is_complete(leftover):
                    os.rename(leftover, last)  # killed between the two renames: put a complete copy back
                    done.append(f"restored {last} from {name}")
                    continue
                if not is_complete(last):  # nothing better exists: keep it for a person to look at
                    done.append(
                        f"warning: kept {name}: {last.name} does not read, and this may be the only copy"
                    )
                    continue
                shutil.rmtree(leftover, ignore_errors=True)
            elif self.TEMP_LINK.fullmatch(name) and leftover.is_symlink():
                leftover.unlink()
            else:
                continue
            done.append(f"removed {name}")
        if self.folder.is_dir():
            for leftover in sorted(self.folder.iterdir()):
                if (
                    (self.TEMP_FOLDER.fullmatch(leftover.name) or self.TRASH.fullmatch(leftover.name))
                    and leftover.is_dir()
                    and not leftover.is_symlink()
                ):
                    shutil.rmtree(leftover, ignore_errors=True)
                    done.append(f"removed checkpoints/{leftover.name}")
        for name in self.POINTERS:
            link = self.pointer(name)
            if link.is_dir() and not link.is_symlink():
                self._adopt_legacy(name)
                done.append(f"moved the folder {name} into checkpoints/")
            elif link.is_symlink() and not link.exists():
                link.unlink()
                done.append(
                    f"removed {name}, which pointed at {os.readlink(link)}, a folder that does not exist"
                )
            elif link.is_symlink() and not is_complete(link):
                done.append(
                    f"warning: {name} points at {os.readlink(link)}, which does not read as a checkpoint of "
                    "this version; it is left untouched (resuming from it will say why)"
                )
        if not self.pointer("best").is_symlink():  # killed while adopting a legacy best: finish the job
            orphans = [
                f
                for f in self.complete_folders()
                if self.LEGACY.fullmatch(f.name) and "best" in f.name and f.name not in self._referenced()
            ]
            if orphans:
                self._point("best", orphans[-1])
                done.append(f"pointed best at {orphans[-1].name}")
        if not self.pointer("last").exists() and not self.pointer("last").is_symlink():
            complete = self.complete_folders()
            if complete:
                self._point("last", complete[-1])
                done.append(f"pointed last at {complete[-1].name}, the newest complete checkpoint")
        fsync_dir(self.out)
        self.collect_garbage()
        for bad in self.unreadable():
            done.append(
                f"warning: {bad} does not read as a checkpoint of this version; it is kept, not deleted"
            )
        for message in done:
            (log or (lambda m: None))(f"checkpoint recovery in {self.out}: {message}")
        return done


def load_optimizers(
    path: str | Path, model: torch.nn.Module, optimizers, state: dict, sharded: bool = False
) -> None:
    """Each optimizer's saved state into this run's optimizers, matched by parameter name.

    The names are checked first, on one process as under FSDP: the checkpoint's parameter groups
    must list exactly the parameters each optimizer of this run holds, group by group, in order
    (otherwise torch reports a size mismatch, or FSDP silently skips a name). A method migrating
    an older checkpoint lists in ``state["optimizers"][i]["dropped"]`` (in memory, never written)
    the names whose saved state and group entries are left out: a parameter it no longer trains.
    """
    tensors = load_tensors(Path(path), "optimizer.safetensors")
    if len(state["optimizers"]) != len(optimizers):
        raise FormatError(
            f"{path}: checkpoint has {len(state['optimizers'])} optimizers, this run builds {len(optimizers)}"
        )
    full = []
    for i, (meta, opt) in enumerate(zip(state["optimizers"], optimizers)):
        dropped = set(meta.get("dropped", ()))
        groups = [{**g, "params": [n for n in g["params"] if n not in dropped]} for g in meta["param_groups"]]
        per_param: dict[str, dict] = {}
        for key, value in tensors.items():
            index, name, field = key.split("/")
            if int(index) == i and name not in dropped:
                per_param.setdefault(name, {})[field] = value
        for name, scalars in meta["scalars"].items():
            if name not in dropped:
                per_param.setdefault(name, {}).update(scalars)
        _check_optimizer_names(path, i, model, opt, groups, per_param)
        full.append({"state": per_param, "param_groups": groups})
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for opt, sd in zip(optimizers, full):
            set_optimizer_state_dict(
                model, opt, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True)
            )
        return
    for opt, sd in zip(optimizers, full):
        order = [n for g in sd["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        opt.load_state_dict(
            {
                "state": {index[n]: st for n, st in sd["state"].items()},
                "param_groups": [
                    {**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]
                ],
            }
        )


def _check_optimizer_names(
    path, i: int, model: torch.nn.Module, opt, groups: list[dict], per_param: dict
) -> None:
    """The saved groups' parameter names (``optimizer_states``'s: ``model.named_parameters()``'s,
    sharded or not) against the parameters ``opt`` holds: a clear error naming what differs."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]
    saved = [list(g["params"]) for g in groups]
    stray = sorted(set(per_param) - {n for g in saved for n in g})
    if stray:
        raise FormatError(
            f"{path}: optimizer {i}'s state holds parameters no parameter group of it lists: {stray[:5]}"
        )
    if saved == current:
        return
    have, had = {n for g in current for n in g}, {n for g in saved for n in g}
    if had - set(names.values()):
        raise FormatError(
            f"{path}: optimizer state names parameters this model lacks: {sorted(had - set(names.values()))[:5]}"
        )
    if had - have:
        raise FormatError(
            f"{path}: optimizer {i}'s state covers parameters this run does not train (frozen now): "
            f"{sorted(had - have)[:5]}; resume with the settings the checkpoint was trained with"
        )
    if have - had:
        raise FormatError(
            f"{path}: this run trains parameters optimizer {i}'s saved state lacks: {sorted(have - had)[:5]}; "
            "resume with the settings the checkpoint was trained with"
        )
    raise FormatError(
        f"{path}: optimizer {i}'s parameters are grouped or ordered differently than in the checkpoint "
        f"(saved group sizes {[len(g) for g in saved]}, this run's {[len(g) for g in current]})"
    )
