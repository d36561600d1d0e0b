"""What every Hugging Face family module shares: renaming by a declarative name map, and small checks.

A family keeps its tensor names as one dict from Hugging Face's names to ours, with ``{}`` standing
for the layer number (the template of torchtitan's ``state_dict_adapter.py``); :func:`rename`
applies it in either direction, the other direction being the dict's inverse. Tensors that are not
a plain rename (q, k, v fused into one projection, experts stacked, norms folded) are handled by
named functions in the family's module.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"\.(\d+)\.")


def inverse(names: dict[str, str]) -> dict[str, str]:
    """The name map the other way round (our names -> Hugging Face's)."""
    return {ours: theirs for theirs, ours in names.items()}


def rename(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors whose names the map knows, renamed (``{}`` carries the first layer number over);
    the others are left out for the family's own functions."""
    out = {}
    for key, value in tensors.items():
        if key in names:
            out[names[key]] = value
            continue
        layer = _LAYER.search(key)
        if layer is not None:
            pattern = key[: layer.start()] + ".{}." + key[layer.end() :]
            if pattern in names:
                out[names[pattern].format(layer.group(1))] = value
    return out


def cpu_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict, detached, on the CPU, each tensor contiguous (safetensors needs that)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def shortest_period(items: list[str]) -> list[str]:
    """The shortest prefix that repeats to ``items`` (our layer pattern repeats to ``n_layer``)."""
    n = len(items)
    for period in range(1, n + 1):
        if n % period == 0 and items == items[:period] * (n // period):
            return items[:period]
    return items


def rope_theta(hf: dict, family: str | None = None) -> float:
    """RoPE's theta from a config.json, refusing any RoPE scaling (only the default imports)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        prefix = f"{family}: " if family else ""
        raise ValueError(f"{prefix}RoPE scaling {kind!r} is not supported (only the default)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
