"""The ``[train]`` section of a run config: every knob of the training loop, with its default.

Values come from a TOML file in ``configs/`` and ``--set train.key=value`` overrides
(see :mod:`scratchlm.config`). A config remembers which keys its user set (``given``), as opposed
to the defaults (this class's, or a method's own table: fine-tuning's shorter warmup), so that a
warning about a setting fires only for a setting the user chose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from scratchlm.config import ConfigError, Rule, validate

_UNIT = Rule(min=0, below=1)
_TRAIN_RULES = {
    "batch_size": Rule(min=1, why="windows per micro-batch, per process"),
    "grad_accum": Rule(min=1, why="micro-batches per step"),
    "max_steps": Rule(min=1),
    "max_minutes": Rule(above=0),
    "optimizer": Rule(choices=("adamw", "muon")),
    "lr": Rule(min=0),
    "min_lr": Rule(min=0),
    "warmup_steps": Rule(min=0),
    "weight_decay": Rule(min=0),
    "beta1": _UNIT,
    "beta2": _UNIT,
    "muon_lr": Rule(min=0),
    "muon_momentum": _UNIT,
    "grad_clip": Rule(min=0, why="0 turns clipping off"),
    "eval_interval": Rule(min=1, why="evaluate and save every N steps"),
    "eval_windows": Rule(min=1),
    "target_loss": Rule(min=0),
    "patience": Rule(min=1, why="evaluations"),
    "sample_tokens": Rule(min=0, why="0 turns samples off"),
    "log_interval": Rule(min=1),
    "seed": Rule(min=0, max=2**63 - 1, why="torch.manual_seed takes a 64-bit integer"),
    "strategy": Rule(choices=("ddp", "fsdp")),
    "peak_tflops": Rule(above=0),
}


@dataclass
class TrainConfig:
    data: str = ""  # a shards folder made by `scratchlm data tokenize`
    out_dir: str = "runs/train"
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 2000
    max_minutes: float | None = None  # stop early (and save) after this much wall time
    optimizer: str = "adamw"  # adamw | muon
    lr: float = 1e-3  # AdamW learning rate (peak)
    min_lr: float = 1e-4
    warmup_steps: int = 100
    # decoupled: each step shrinks a weight by lr x weight_decay (muon_lr x it under Muon)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    muon_lr: float = 0.02  # Muon's learning rate for the hidden matrices (AdamW's lr for the rest)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_windows: int = 256  # fixed validation windows (independent of batch size, so runs compare)
    target_loss: float | None = None  # stop once validation loss is at or below this
    patience: int | None = None  # early stopping: evaluations without improvement
    sample_tokens: int = 100
    log_interval: int = 10
    seed: int = 1337
    device: str | None = None
    # with several processes: ddp (replicate) | fsdp (shard parameters, gradients, optimizer state)
    strategy: str = "ddp"
    compile: bool = False
    activation_checkpointing: bool = False
    tensorboard: bool = False
    peak_tflops: float | None = None  # for the MFU estimate; detected for common GPUs
    # The keys the user set (file, --set, API dict); None when unknown (built directly): all count.
    given: ClassVar[frozenset[str] | None] = None

    def __post_init__(self):
        validate(self, "train", _TRAIN_RULES)
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir must name a folder, got an empty string")
        if self.device is not None and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"train.min_lr = {self.min_lr:g} is above train.lr = {self.lr:g}: the schedule decays "
                "from lr down to min_lr; lower min_lr"
            )

    @classmethod
    def from_dict(cls, d: dict, defaults: dict | None = None) -> TrainConfig:
        """``d`` (the user's settings) over ``defaults`` (a method's own table) over the class's."""
        from scratchlm.config import dataclass_from_dict

        cfg = dataclass_from_dict(cls, {**(defaults or {}), **d}, "train")
        cfg.given = frozenset(d)
        return cfg

    def warmup_warning(self) -> str | None:
        """A warmup the learning rate never finishes, when the user chose it: a smoke run's way, a
        mistake otherwise. A default warmup (100 steps; fine-tuning's 20) under a short max_steps
        is no mistake of the user's, and stays quiet."""
        if self.warmup_steps <= self.max_steps:
            return None
        if self.given is not None and "warmup_steps" not in self.given:
            return None
        return (
            f"warning: train.warmup_steps = {self.warmup_steps} is more than train.max_steps = "
            f"{self.max_steps}: the learning rate never reaches train.lr = {self.lr:g}"
        )


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for every key whose value differs between ``old`` and
    ``new`` (nested tables compared key by key; a missing key counts as None)."""
    changed = []
    for key in [*new, *(k for k in old if k not in new)]:
        value, before = new.get(key), old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            changed += changed_keys(before, value, f"{prefix}{key}.")
        elif value != before:
            changed.append((f"{prefix}{key}", before, value))
    return changed
