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
from safetensors.torch import load_file, save_file

from scratchlm.io import FormatError, read_json, write_json

CHECKPOINT_FORMAT = "scratchlm.checkpoint"
CHECKPOINT_VERSION = 1


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


def save_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], optimizer_state: list[dict], state: dict) -> Path:
    """Write a checkpoint folder atomically (see module doc). ``state`` must be JSON-serializable."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tensors, meta = _split_optimizer_states(optimizer_state)
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
    return save_checkpoint(path, model_state(model), [], state)


def read_state(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json); train one with `scratchlm train`")
    return read_json(path / "state.json", CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,))


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load weights into an unsharded model (before any FSDP sharding)."""
    weights = load_file(str(Path(path) / "model.safetensors"))
    if model.config.tie_embeddings and "tok_emb.weight" in weights:
        weights["lm_head.weight"] = weights["tok_emb.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise FormatError(f"{path}: weights do not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_optimizers(path: str | Path, model: torch.nn.Module, optimizers, state: dict, sharded: bool = False) -> None:
    tensors = load_file(str(Path(path) / "optimizer.safetensors"))
    if len(state["optimizers"]) != len(optimizers):
        raise FormatError(f"{path}: checkpoint has {len(state['optimizers'])} optimizers, this run builds {len(optimizers)}")
    full = []
    for i, meta in enumerate(state["optimizers"]):
        per_param: dict[str, dict] = {}
        for key, value in tensors.items():
            index, name, field = key.split("/")
            if int(index) == i:
                per_param.setdefault(name, {})[field] = value
        for name, scalars in meta["scalars"].items():
            per_param.setdefault(name, {}).update(scalars)
        full.append({"state": per_param, "param_groups": meta["param_groups"]})
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for opt, sd in zip(optimizers, full):
            set_optimizer_state_dict(model, opt, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True))
        return
    params = dict(model.named_parameters())
    for opt, sd in zip(optimizers, full):
        order = [n for g in sd["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        missing = set(order) - set(params)
        if missing:
            raise FormatError(f"{path}: optimizer state names parameters this model lacks: {sorted(missing)[:5]}")
        opt.load_state_dict({
            "state": {index[n]: st for n, st in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
        })


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, state) from a checkpoint folder, model in eval mode on ``device``."""
    from scratchlm.models.gpt import GPT, GPTConfig

    state = read_state(path)
    model = GPT(GPTConfig.from_dict(state["model"]))
    load_weights(path, model)
    return model.to(device).eval(), state
