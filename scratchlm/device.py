"""Pick the compute device at run time: CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

import re

import torch


def pick_device(preference: str | None = None) -> torch.device:
    """``preference`` ("cuda", "cuda:1", "mps", "cpu") forces a device; None or "auto" picks the best available."""
    if preference and preference != "auto":
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", preference):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {preference!r}")
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps was asked for, but MPS is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
