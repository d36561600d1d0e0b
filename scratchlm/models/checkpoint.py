"""The checkpoint format, read and write: one folder that sampling, evaluation and serving load.

A checkpoint is a folder:

* ``model.safetensors``: the weights (a tied output matrix stored once);
* ``optimizer.safetensors``: every optimizer's state tensors (Adam moments, Muon momentum), keyed
  ``optimizer-index/parameter-name/field``; their scalars and parameter groups sit in state.json;
* ``state.json``: format and version, model config, training config, tokenizer fingerprint, step,
  every rank's RNG states, the data loader's position, best validation loss, optimizer
  hyperparameters, the size and sha256 of every other file (checked on load, so a truncated or
  bit-flipped file is refused by name instead of loading garbage), and ``state_sha256``, the sha256
  of its own canonical JSON without that field (a flipped digit in the JSON is refused too);
* ``tokenizer.json``: the tokenizer, so the folder is self-contained (a checkpoint written before
  it travelled along finds its training data's copy by path) and extra files (LoRA adapters).

Every file gets the mode a plain ``open()`` gives (0666 minus the umask). Before writing, the free
space is checked against what the files need; a full disk is reported with both figures.

A folder is written under a hidden temporary name and renamed when complete (:func:`publish_folder`),
so a folder under its real name is always whole. Everything here checks what it reads and names the
file when something is wrong: a missing key, a wrong version, a truncated or bit-flipped tensor file.
Loading or saving a plain model imports this module, never :mod:`scratchlm.train`; a training run's
store of checkpoints (step folders, ``last``/``best`` links, lock, recovery) is
``scratchlm/train/checkpoint.py``. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.io import (
    DiskFullError,
    FormatError,
    follow_umask,
    fsync_dir,
    human_bytes,
    is_disk_full,
    json_sha256,
    read_json,
    sha256_file,
    write_json,
)

CHECKPOINT_FORMAT = "scratchlm.checkpoint"
# 2: tensor-file checksums, per-rank RNG states; 3: state_sha256 (a checksum of state.json itself)
CHECKPOINT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
STATE_CHECKSUM = "state_sha256"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
# Keys every checkpoint's state.json has (a resumable one has more: see RESUME_KEYS).
REQUIRED_KEYS = ("model", "step", "tokenizer_fingerprint", "train", "vocab_size")
RESUME_KEYS = ("rng", "best_val", "evals_without_improvement", "optimizers")


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a checkpoint that reads: valid state.json, tensor files of the recorded size."""
    try:
        state = read_state(folder)
    except (OSError, FormatError):
        return False
    try:
        for name, info in state.get("files", {}).items():
            path = Path(folder) / name
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                return False
    except (AttributeError, KeyError, TypeError, OSError):  # a "files" record of the wrong shape
        return False
    return True


def read_state(path: str | Path, *, resumable: bool = False) -> dict:
    """The checkpoint's ``state.json``, checked: format, version, and the keys a reader needs."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(
            f"{path} points at {os.readlink(path)}, which does not exist. If {path.name} was copied "
            "out of its run folder, copy the folder it points to instead (cp -rL); otherwise pass "
            "one of the complete folders under checkpoints/ itself (`scratchlm train --resume` "
            "would repoint last at the newest of them, and continue training)"
        )
    if not (path / "state.json").exists():
        raise FileNotFoundError(
            f"{path}: not a checkpoint folder (no state.json); train one with `scratchlm train`"
        )
    state = read_json(path / "state.json", CHECKPOINT_FORMAT, READABLE_VERSIONS)
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if resumable else ()) if k not in state]
    if missing:
        raise FormatError(
            f"{path / 'state.json'}: missing {missing}; the file is damaged or was not written by "
            "`scratchlm train`: use another checkpoint (e.g. best instead of last)"
        )
    _check_state_checksum(path / "state.json", state)
    return state


def _check_state_checksum(file: Path, state: dict) -> None:
    """From version 3 on, state.json carries the sha256 of its own canonical JSON: a flipped digit
    (rope_theta 10000 -> 90000) would otherwise load a different model without a word."""
    if state["version"] < 3:
        return  # written before the checksum existed: read as it always was
    recorded = state.get(STATE_CHECKSUM)
    actual = json_sha256({k: v for k, v in state.items() if k != STATE_CHECKSUM})
    if recorded != actual:
        why = "has no checksum" if recorded is None else "differs from the sha256 recorded at save time"
        raise FormatError(
            f"{file}: its content {why}; the file was edited or damaged (disk or copy error) after "
            "it was saved: use another checkpoint (e.g. best instead of last)"
        )


def _verified(path: Path, name: str) -> Path:
    """``path/name`` after checking its size and sha256 against state.json (checkpoints from version 2)."""
    file = path / name
    if not file.exists():
        raise FormatError(f"{file}: missing; the checkpoint is incomplete: use another checkpoint")
    info = read_state(path).get("files", {}).get(name)
    if info is not None:
        size = file.stat().st_size
        if size != info["bytes"]:
            raise FormatError(
                f"{file}: {size} bytes, but the checkpoint recorded {info['bytes']}; the file is "
                "truncated or was replaced: use another checkpoint (e.g. best instead of last)"
            )
        if sha256_file(file) != info["sha256"]:
            raise FormatError(
                f"{file}: sha256 differs from the one recorded at save time; the file is corrupt "
                "(disk or copy error): use another checkpoint (e.g. best instead of last)"
            )
    return file


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    file = _verified(path, name)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise FormatError(
            f"{file}: not a readable safetensors file ({e}); it is truncated or corrupt: "
            "use another checkpoint"
        ) from None


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load weights into an unsharded model (before any FSDP sharding)."""
    weights = load_tensors(Path(path), "model.safetensors")
    if model.config.tie_embeddings and "tok_emb.weight" in weights:
        weights["lm_head.weight"] = weights["tok_emb.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise FormatError(
            f"{path}: weights do not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, state) from a checkpoint folder, model in eval mode on ``device``.

    ``path`` may be a pointer (``out_dir/last``) that a running training re-points at any moment.
    It is resolved *once*, and every file is read from that one folder, so the state, the weights
    and their checksums always belong together. If training deletes that folder mid-read (it
    saved twice meanwhile), the pointer is resolved again, once.
    """
    for attempt in (1, 2):
        folder = Path(path).resolve()
        try:
            return _load_model(folder, device)
        except (FileNotFoundError, FormatError):
            if attempt == 2 or not Path(path).is_symlink() or Path(path).resolve() == folder:
                if Path(path).is_symlink() and not Path(path).exists():
                    read_state(path)  # the clear "points at ..., which does not exist" message
                raise
    raise AssertionError("unreachable")


def _load_model(folder: Path, device):
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    state = read_state(folder)
    try:
        config = GPTConfig.from_dict(state["model"])
    except (TypeError, ValueError) as e:
        raise FormatError(f"{folder / 'state.json'}: the model config does not validate ({e})") from None
    model = GPT(config)
    load_weights(folder, model)
    return model.to(device).eval(), state


def load_checkpoint_tokenizer(checkpoint: str | Path, state: dict, name: str | Path | None = None):
    """The tokenizer for a checkpoint: ``name`` (a JSON path or ``gpt2``) if given, else the
    checkpoint's own (``tokenizer.json`` in its folder: a chat model's), else the one it was trained
    with (the shards folder's copy); checked by fingerprint."""
    from scratchlm.tokenizers import gpt2_tokenizer, load_tokenizer

    if name is not None:
        if str(name) == "gpt2":
            return gpt2_tokenizer()
        if not Path(name).exists():
            raise FileNotFoundError(
                f"tokenizer file {str(name)!r} does not exist (a tokenizer JSON file, or 'gpt2')"
            )
        return load_tokenizer(Path(name))
    own = Path(checkpoint) / "tokenizer.json"
    if own.exists():
        tokenizer = load_tokenizer(own)
        if tokenizer.fingerprint != state["tokenizer_fingerprint"]:
            raise FormatError(
                f"{own} is not the tokenizer recorded in {checkpoint}'s state.json (fingerprints differ)"
            )
        return tokenizer
    if not state.get("train"):
        raise ValueError(
            f"{checkpoint} was imported, not trained here: pass a tokenizer (a JSON file, or gpt2)"
        )
    path = Path(state["train"]["data"]) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(
            f"the tokenizer of {checkpoint} was {path}, which no longer exists; pass a tokenizer"
        )
    tokenizer = load_tokenizer(path)
    if tokenizer.fingerprint != state["tokenizer_fingerprint"]:
        raise ValueError(
            f"{path} is not the tokenizer {checkpoint} was trained with (fingerprints differ); "
            "pass a tokenizer"
        )
    return tokenizer


# --- writing ---------------------------------------------------------------------------------
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


def publish_folder(
    target: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: list[dict],
    state: dict,
    tokenizer=None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write the checkpoint into a hidden temporary sibling ``.NAME.tmp-PID``, then rename it to
    ``target`` (which must not exist): a folder under its real name is always complete. (A run's
    store knows that temporary name, and removes one that a kill left behind.)"""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = _bytes_needed(weights, optimizer_state, state, tokenizer, extra_files)
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise _disk_full(target, needed, free)
    try:
        _write_folder(tmp, weights, optimizer_state, state, tokenizer, extra_files)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):  # filled up meanwhile, or the estimate was short
            raise _disk_full(target, needed, shutil.disk_usage(target.parent).free) from None
        raise


def _bytes_needed(weights, optimizer_state, state, tokenizer, extra_files) -> int:
    """What the folder's files take, roughly from above: tensor bytes, a safetensors header entry per
    tensor, the JSON files, a file-system block per file."""
    tensors = [*weights.values()] + [
        v for sd in optimizer_state for st in sd["state"].values() for v in st.values() if torch.is_tensor(v)
    ]
    data = sum(t.numel() * t.element_size() for t in tensors) + 200 * len(tensors)
    data += 2 * len(json.dumps(state, default=str)) + sum(len(b) for b in (extra_files or {}).values())
    if tokenizer is not None:
        data += len(json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode("utf-8"))
    return data + 4096 * (4 + len(extra_files or {}))


def _disk_full(target: Path, needed: int, free: int) -> DiskFullError:
    return DiskFullError(
        f"{target.parent}: not enough free space to save the checkpoint {target.name}: it needs about "
        f"{human_bytes(needed)} and {human_bytes(free)} is free. Nothing was changed (any previous "
        "checkpoint is intact): free some space or choose another folder, then try again (a training "
        "run continues with --resume)"
    )


def _write_folder(
    folder: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: list[dict],
    state: dict,
    tokenizer=None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Fill a new folder with the tensor files, the tokenizer (when given) and any extra files, then
    state.json, each fsynced, then the folder itself."""
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    follow_umask(folder / "model.safetensors")  # safetensors creates its files 0600
    tensors, meta = _split_optimizer_states(optimizer_state)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    follow_umask(folder / "optimizer.safetensors")
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
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        # a state read from an older checkpoint (a merge, a migration) is written in this version
        **{k: v for k, v in state.items() if k not in ("format", "version", STATE_CHECKSUM)},
        "optimizers": meta,
        "files": files,
    }
    write_json(folder / "state.json", {**record, STATE_CHECKSUM: json_sha256(record)})
    fsync_dir(folder)


def save_checkpoint(
    path: str | Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: list[dict],
    state: dict,
    tokenizer=None,
) -> Path:
    """Write a stand-alone checkpoint folder (an imported model, say) that must not exist yet.

    It is written under a temporary name and renamed when complete, so ``path`` either does not
    exist or is whole. Training runs use ``scratchlm.train.checkpoint.CheckpointStore``, which also
    replaces checkpoints.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} already exists; remove it or choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    publish_folder(path, weights, optimizer_state, state, tokenizer)
    return path


def save_model_only(path: str | Path, model: torch.nn.Module, tokenizer=None, **info) -> Path:
    """A checkpoint with weights and config but no optimizer (imported or exported models); with
    ``tokenizer``, it is saved inside the folder and is the checkpoint's tokenizer."""
    state = {
        "model": model.config.to_dict(),
        "step": 0,
        "tokenizer_fingerprint": None,
        "train": None,
        "vocab_size": model.config.vocab_size,
        **info,
    }
    return save_checkpoint(path, model_state(model), [], state, tokenizer)
