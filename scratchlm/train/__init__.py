"""Training: the loop, optimizers, schedules, checkpoints."""

from scratchlm.train.trainer import NonFiniteLoss, TrainConfig, Trainer, train

__all__ = ["NonFiniteLoss", "TrainConfig", "Trainer", "train"]
