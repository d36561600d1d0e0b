"""Checkpoints: weights and optimizer state in safetensors, everything else in JSON, crash-safe.

A checkpoint is a folder:

* ``model.safetensors``: the weights (a tied output matrix stored once);
* ``optimizer.safetensors``: every optimizer's state tensors (Adam moments, Muon momentum);
* ``state.json``: format and version, model config, training config, tokenizer fingerprint, step,
  every rank's RNG states, the data loader's position, best validation loss, optimizer
  hyperparameters, and the size and sha256 of the two tensor files (checked on load, so a
  truncated or bit-flipped file is refused by name instead of loading garbage).

A training run's ``out_dir`` holds them so that a kill at *any* moment leaves a complete
checkpoint to resume from (atomic by construction, see :class:`CheckpointStore`)::

    out_dir/.lock                      held (flock) while a run writes here; dies with the process
    out_dir/checkpoints/step-00000500/ immutable: written as .step-00000500.tmp-PID, renamed when complete
    out_dir/last -> checkpoints/step-00000500     symbolic links, each replaced atomically
    out_dir/best -> checkpoints/step-00000250

No pickle anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratchlm.io import FormatError, sha256_file, write_json
from scratchlm.models.checkpoint import (  # noqa: F401  (re-exported: the trainer and old imports)
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, READABLE_VERSIONS, REQUIRED_KEYS, RESUME_KEYS, TENSOR_FILES, is_complete,
    load_model_from_checkpoint, load_tensors, load_weights, read_state)

def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def model_state(model: torch.nn.Module, sharded: bool = False) -> dict[str, torch.Tensor]:
    """Full weights on the CPU; a tied output matrix is stored once (as ``tok_emb.weight``).

    With FSDP (``sharded``) this gathers the shards: every rank must call it.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in sd.items()}


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


def _split_optimizer_states(states: list[dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = {}, []
    for i, sd in enumerate(states):
        scalars: dict[str, dict] = {}
        for name, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{i}/{name}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_folder(target: Path, weights: dict[str, torch.Tensor], optimizer_state: list[dict], state: dict,
                    tokenizer=None, extra_files: dict[str, bytes] | None = None) -> None:
    """Write the checkpoint into a hidden temporary sibling, then rename it to ``target`` (which must
    not exist): a folder under its real name is always complete."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(tmp, weights, optimizer_state, state, tokenizer, extra_files)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_folder(folder: Path, weights: dict[str, torch.Tensor], optimizer_state: list[dict], state: dict,
                  tokenizer=None, extra_files: dict[str, bytes] | None = None) -> None:
    """Fill a new folder with the three files (and the tokenizer, when it is not the training
    data's: a chat model's, say), each fsynced, then the folder itself."""
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tensors, meta = _split_optimizer_states(optimizer_state)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    names = list(TENSOR_FILES)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
        names.append("tokenizer.json")
        state = {**state, "tokenizer_fingerprint": tokenizer.fingerprint}
    for name, data in (extra_files or {}).items():  # e.g. LoRA adapters
        if name in names or name == "state.json" or "/" in name:
            raise ValueError(f"{name!r} cannot be an extra checkpoint file")
        (folder / name).write_bytes(data)
        names.append(name)
    files = {}
    for name in names:
        with open(folder / name, "rb") as handle:
            os.fsync(handle.fileno())
        # Hashing reads the file back once: ~1-2 s for GPT-2 small's 0.5 GB of weights, a small price
        # next to loading garbage from a bit-flipped or truncated file without knowing it.
        files[name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    write_json(folder / "state.json", {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                       **state, "optimizers": meta, "files": files})
    _fsync_dir(folder)


def save_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], optimizer_state: list[dict], state: dict,
                    tokenizer=None) -> Path:
    """Write a stand-alone checkpoint folder (an imported model, say) that must not exist yet.

    It is written under a temporary name and renamed when complete, so ``path`` either does not
    exist or is whole. Training runs use :class:`CheckpointStore`, which also replaces checkpoints.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} already exists; remove it or choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    _publish_folder(path, weights, optimizer_state, state, tokenizer)
    return path


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
        f = open(self.path, "a+", encoding="utf-8")
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
        return not folder.is_symlink() and bool(self.STEP.fullmatch(folder.name) or self.LEGACY.fullmatch(folder.name)) and is_complete(folder)

    def pointer(self, name: str) -> Path:
        return self.out / name

    def save(self, names: list[str], weights: dict[str, torch.Tensor], optimizer_state: list[dict],
             state: dict, tokenizer=None, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write one checkpoint and point each of ``names`` (``last``, ``best``) at it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._free_name(f"step-{int(state['step']):08d}")
        _publish_folder(target, weights, optimizer_state, state, tokenizer, extra_files)
        for name in names:
            self._point(name, target)
        _fsync_dir(self.out)
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
        return {Path(os.readlink(self.pointer(n))).name for n in self.POINTERS if self.pointer(n).is_symlink()}

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
        return sorted(f for f in self.folder.iterdir()
                      if (self.STEP.fullmatch(f.name) or self.LEGACY.fullmatch(f.name)) and not is_complete(f))

    def run_summary(self) -> str | None:
        """What a previous run left here ("last -> step-00000500, best -> ..."), or None if nothing."""
        parts = [f"{n} -> {os.readlink(self.pointer(n))}" for n in self.POINTERS if self.pointer(n).is_symlink()]
        if not parts and self.folder.is_dir() and any(self.STEP.fullmatch(f.name) for f in self.folder.iterdir()):
            parts.append(f"checkpoints in {self.folder}")
        return ", ".join(parts) or None

    def clear(self) -> None:
        """Forget the previous run (``--overwrite``): remove the pointers, then its checkpoints."""
        for name in self.POINTERS:
            if self.pointer(name).is_symlink():
                self.pointer(name).unlink()
        _fsync_dir(self.out)
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
            if (self.LEGACY_OLD.fullmatch(name) or self.LEGACY_TMP.fullmatch(name)) and leftover.is_dir() \
                    and not leftover.is_symlink():
                # scratchlm < 0.2 saved by renaming last to .last.old-PID, then .last.tmp-PID to last.
                if not last.exists() and not last.is_symlink() and is_complete(leftover):
                    os.rename(leftover, last)  # killed between the two renames: put a complete copy back
                    done.append(f"restored {last} from {name}")
                    continue
                if not is_complete(last):  # nothing better exists: keep it for a person to look at
                    done.append(f"warning: kept {name}: {last.name} does not read, and this may be the only copy")
                    continue
                shutil.rmtree(leftover, ignore_errors=True)
            elif self.TEMP_LINK.fullmatch(name) and leftover.is_symlink():
                leftover.unlink()
            else:
                continue
            done.append(f"removed {name}")
        if self.folder.is_dir():
            for leftover in sorted(self.folder.iterdir()):
                if (self.TEMP_FOLDER.fullmatch(leftover.name) or self.TRASH.fullmatch(leftover.name)) \
                        and leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                    done.append(f"removed checkpoints/{leftover.name}")
        for name in self.POINTERS:
            link = self.pointer(name)
            if link.is_dir() and not link.is_symlink():
                self._adopt_legacy(name)
                done.append(f"moved the folder {name} into checkpoints/")
            elif link.is_symlink() and not link.exists():
                link.unlink()
                done.append(f"removed {name}, which pointed at {os.readlink(link)}, a folder that does not exist")
            elif link.is_symlink() and not is_complete(link):
                done.append(f"warning: {name} points at {os.readlink(link)}, which does not read as a checkpoint of "
                            "this version; it is left untouched (resuming from it will say why)")
        if not self.pointer("best").is_symlink():  # killed while adopting a legacy best: finish the job
            orphans = [f for f in self.complete_folders() if self.LEGACY.fullmatch(f.name) and "best" in f.name
                       and f.name not in self._referenced()]
            if orphans:
                self._point("best", orphans[-1])
                done.append(f"pointed best at {orphans[-1].name}")
        if not self.pointer("last").exists() and not self.pointer("last").is_symlink():
            complete = self.complete_folders()
            if complete:
                self._point("last", complete[-1])
                done.append(f"pointed last at {complete[-1].name}, the newest complete checkpoint")
        _fsync_dir(self.out)
        self.collect_garbage()
        for bad in self.unreadable():
            done.append(f"warning: {bad} does not read as a checkpoint of this version; it is kept, not deleted")
        for message in done:
            (log or (lambda m: None))(f"checkpoint recovery in {self.out}: {message}")
        return done


def save_model_only(path: str | Path, model: torch.nn.Module, tokenizer=None, **info) -> Path:
    """A checkpoint with weights and config but no optimizer (imported or exported models); with
    ``tokenizer``, it is saved inside the folder and is the checkpoint's tokenizer."""
    state = {"model": model.config.to_dict(), "step": 0, "tokenizer_fingerprint": None, "train": None,
             "vocab_size": model.config.vocab_size, **info}
    return save_checkpoint(path, model_state(model), [], state, tokenizer)


def load_optimizers(path: str | Path, model: torch.nn.Module, optimizers, state: dict, sharded: bool = False) -> None:
    """Each optimizer's saved state into this run's optimizers, matched by parameter name.

    The names are checked first, on one process as under FSDP: the checkpoint's parameter groups
    must list exactly the parameters each optimizer of this run holds, group by group, in order
    (otherwise torch reports a size mismatch, or FSDP silently skips a name). A method migrating
    an older checkpoint lists in ``state["optimizers"][i]["dropped"]`` (in memory, never written)
    the names whose saved state and group entries are left out: a parameter it no longer trains.
    """
    tensors = load_tensors(Path(path), "optimizer.safetensors")
    if len(state["optimizers"]) != len(optimizers):
        raise FormatError(f"{path}: checkpoint has {len(state['optimizers'])} optimizers, this run builds {len(optimizers)}")
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
            set_optimizer_state_dict(model, opt, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True))
        return
    for opt, sd in zip(optimizers, full):
        order = [n for g in sd["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        opt.load_state_dict({
            "state": {index[n]: st for n, st in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
        })


def _check_optimizer_names(path, i: int, model: torch.nn.Module, opt, groups: list[dict], per_param: dict) -> None:
    """The saved groups' parameter names (``optimizer_states``'s: ``model.named_parameters()``'s,
    sharded or not) against the parameters ``opt`` holds: a clear error naming what differs."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]
    saved = [list(g["params"]) for g in groups]
    stray = sorted(set(per_param) - {n for g in saved for n in g})
    if stray:
        raise FormatError(f"{path}: optimizer {i}'s state holds parameters no parameter group of it lists: {stray[:5]}")
    if saved == current:
        return
    have, had = {n for g in current for n in g}, {n for g in saved for n in g}
    if had - set(names.values()):
        raise FormatError(f"{path}: optimizer state names parameters this model lacks: {sorted(had - set(names.values()))[:5]}")
    if had - have:
        raise FormatError(f"{path}: optimizer {i}'s state covers parameters this run does not train (frozen now): "
                          f"{sorted(had - have)[:5]}; resume with the settings the checkpoint was trained with")
    if have - had:
        raise FormatError(f"{path}: this run trains parameters optimizer {i}'s saved state lacks: {sorted(have - had)[:5]}; "
                          "resume with the settings the checkpoint was trained with")
    raise FormatError(f"{path}: optimizer {i}'s parameters are grouped or ordered differently than in the checkpoint "
                      f"(saved group sizes {[len(g) for g in saved]}, this run's {[len(g) for g in current]})")
