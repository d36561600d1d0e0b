"""Checkpoints: weights and optimizer state in safetensors, everything else in JSON.

A checkpoint is a folder:

* ``model.safetensors``: the weights (a tied output matrix stored once);
* ``optimizer.safetensors``: every optimizer's state tensors (Adam moments, Muon momentum);
* ``state.json``: format and version, model config, training config, tokenizer fingerprint, step,
  RNG states, the data loader's position, best validation loss, optimizer hyperparameters.

It is written into a temporary folder which then replaces the old checkpoint, so a crash (even
SIGKILL) leaves either the old checkpoint or the new one, never a mix. No pickle anywhere.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from scratchlm.io import FormatError, read_json, write_json

CHECKPOINT_FORMAT = "scratchlm.checkpoint"
CHECKPOINT_VERSION = 1


def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _optimizer_tensors(optimizers) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict] = {}
        for pid, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{i}.{pid}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizers, state: dict) -> Path:
    """Write a checkpoint folder atomically (see module doc). ``state`` must be JSON-serializable."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_tensors(optimizers)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "state.json", {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                        **state, "optimizers": meta})
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_model_only(path: str | Path, model: torch.nn.Module, **info) -> Path:
    """A checkpoint with weights and config but no optimizer (imported or exported models)."""
    state = {"model": model.config.to_dict(), "step": 0, "tokenizer_fingerprint": None, "train": None,
             "vocab_size": model.config.vocab_size, **info}
    return save_checkpoint(path, model, [], state)


def read_state(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json); train one with `scratchlm train`")
    return read_json(path / "state.json", CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,))


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    missing, unexpected = load_model(model, str(Path(path) / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise FormatError(f"{path}: weights do not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_optimizers(path: str | Path, optimizers, state: dict) -> None:
    tensors = load_file(str(Path(path) / "optimizer.safetensors"))
    if len(state["optimizers"]) != len(optimizers):
        raise FormatError(f"{path}: checkpoint has {len(state['optimizers'])} optimizers, this run builds {len(optimizers)}")
    for i, (opt, meta) in enumerate(zip(optimizers, state["optimizers"])):
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            index, pid, name = key.split(".", 2)
            if int(index) == i:
                per_param.setdefault(int(pid), {})[name] = value
        for pid, scalars in meta["scalars"].items():
            per_param.setdefault(int(pid), {}).update(scalars)
        opt.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, state) from a checkpoint folder, model in eval mode on ``device``."""
    from scratchlm.models.gpt import GPT, GPTConfig

    state = read_state(path)
    model = GPT(GPTConfig.from_dict(state["model"]))
    load_weights(path, model)
    return model.to(device).eval(), state
