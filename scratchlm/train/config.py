"""The ``[train]`` section of a run config: every knob of the training loop, with its default.

Values come from a TOML file in ``configs/`` and ``--set train.key=value`` overrides
(see :mod:`scratchlm.config`).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    muon_lr: float = 0.02
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
    strategy: str = "ddp"  # with several processes: ddp (replicate) | fsdp (shard parameters, gradients, optimizer state)
    compile: bool = False
    activation_checkpointing: bool = False
    tensorboard: bool = False
    peak_tflops: float | None = None  # for the MFU estimate; detected for common GPUs

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        from scratchlm.config import dataclass_from_dict

        return dataclass_from_dict(cls, d, "train")
