"""What every Hugging Face family module shares: renaming by a declarative name map, and small checks.

A family keeps its tensor names as one dict from Hugging Face's names to ours, with ``{}`` standing
for the layer number (the template of torchtitan's ``state_dict_adapter.py``); :func:`rename`
applies it in either direction, the other direction being the dict's inverse. Tensors that are not
a plain rename are handled by named functions: experts stacked into one tensor per projection
(:func:`stack_experts`, :func:`unstack_experts`, here because four families share them), and in the
family's module q, k, v fused into one projection, RoPE rows permuted, norms folded.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"\.(\d+)\.")


def inverse(names: dict[str, str]) -> dict[str, str]:
    """The name map the other way round (our names -> Hugging Face's)."""
    flipped = {ours: theirs for theirs, ours in names.items()}
    if len(flipped) != len(names):
        raise ValueError("a name map must be one-to-one to be inverted")
    return flipped


def renamed(key: str, names: dict[str, str]) -> str | None:
    """``key`` under the map (``{}`` carries the first layer number over), or None if the map
    does not know it."""
    if key in names:
        return names[key]
    layer = _LAYER.search(key)
    if layer is not None:
        pattern = key[: layer.start()] + ".{}." + key[layer.end() :]
        if pattern in names:
            return names[pattern].format(layer.group(1))
    return None


def rename(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors whose names the map knows, renamed; the others are left out for the family's
    own functions."""
    return {new: value for key, value in tensors.items() if (new := renamed(key, names)) is not None}


# our stacked tensors: experts_gate (E, F, C), experts_up (E, F, C), experts_down (E, C, F)
_OUR_EXPERTS = ("gate", "up", "down")


def stack_experts(
    t: dict, theirs: str, ours: str, names: tuple[str, str, str], n: int
) -> dict[str, torch.Tensor]:
    """Our ``{ours}experts_gate/up/down`` from Hugging Face's experts under the prefix ``theirs``:
    the per-expert tensors ``save_pretrained`` writes (``{theirs}experts.{e}.{name}.weight`` with
    ``names`` the family's (gate, up, down)), or the fused in-memory layout of transformers 5.x
    (``experts.gate_up_proj`` (E, 2F, C), gate rows first, and ``experts.down_proj``)."""
    if theirs + "experts.gate_up_proj" in t:
        gate, up = t[theirs + "experts.gate_up_proj"].chunk(2, dim=1)
        return {
            ours + "experts_gate": gate.contiguous(),
            ours + "experts_up": up.contiguous(),
            ours + "experts_down": t[theirs + "experts.down_proj"],
        }
    return {
        f"{ours}experts_{p}": torch.stack([t[f"{theirs}experts.{e}.{name}.weight"] for e in range(n)])
        for p, name in zip(_OUR_EXPERTS, names)
    }


def unstack_experts(sd: dict, ours: str, theirs: str, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`stack_experts`, in the per-expert layout ``from_pretrained`` loads."""
    return {
        f"{theirs}experts.{e}.{name}.weight": weight.contiguous()
        for p, name in zip(_OUR_EXPERTS, names)
        for e, weight in enumerate(sd[f"{ours}experts_{p}"])
    }


def cpu_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict, detached, on the CPU, each tensor contiguous (safetensors needs that).
    A model on the meta device (a dry run of an export: no memory) keeps its meta tensors."""
    return {
        k: (v.detach() if v.is_meta else v.detach().cpu()).contiguous() for k, v in model.state_dict().items()
    }


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
