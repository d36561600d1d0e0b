"""LoRA: fine-tune a low-rank update instead of every weight (Hu et al., 2021).

A fine-tuned weight matrix ``W' = W + ΔW`` differs from the pretrained ``W`` by an update that is,
in practice, close to low rank. LoRA trains that update in factored form, ``ΔW = (α / r) · B A``
with ``A`` of shape (r, in) and ``B`` of shape (out, r), and freezes ``W``::

    y = x Wᵀ + (α / r) · (x Aᵀ) Bᵀ

For a 768 × 768 projection and ``r = 8`` that is 12,288 trainable numbers instead of 589,824.
``B`` starts at zero, so the adapted model starts exactly equal to the base model; ``A`` starts
random (Kaiming-uniform, as PEFT does), so the gradient of ``B`` is not zero. ``α / r`` keeps the
update's scale comparable across ranks (changing ``r`` does not require retuning the learning rate).

After training, the update can be **merged**: ``W ← W + (α / r) B A`` makes an ordinary model with
no extra cost at inference (``merge_lora``); ``unmerge`` subtracts it again. Adapters are saved
alone, in safetensors (``save_adapters``): a few hundred kilobytes for a model of megabytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from scratchlm.io import FormatError, atomic_write

ADAPTER_FORMAT = "scratchlm.lora"
DEFAULT_TARGETS = ("qkv", "proj", "up", "gate", "down")  # every linear of attention and MLP


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # readers that expect a Linear (e.g. export) see the effective weight
        return self.base.weight if self.merged else self.base.weight + self.delta()

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """ΔW = (α / r) · B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
               dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` whose own name is in
    ``targets`` with :class:`LoRALinear`; return the wrapped modules' full names."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer named {list(targets)}; this model's are {names}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back: an ordinary
    model (for export, or the engine) whose outputs equal the adapted model's."""
    for name, m in lora_modules(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
    return model


def save_adapters(model: nn.Module, path: str | Path, **info) -> Path:
    """The adapters alone: ``lora_A`` and ``lora_B`` of every wrapped layer, in one safetensors file
    whose metadata records rank, alpha and the layers (and ``info``, e.g. the base checkpoint)."""
    from safetensors.torch import save

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    first = next(iter(modules.values()))
    tensors = {}
    for name, m in modules.items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    meta = {"format": ADAPTER_FORMAT, "version": "1", "rank": str(first.rank), "alpha": str(first.alpha),
            "targets": json.dumps(sorted({n.rsplit(".", 1)[-1] for n in modules})), "info": json.dumps(info)}
    path = Path(path)
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=meta))
    return path


def load_adapters(model: nn.Module, path: str | Path) -> dict:
    """Wrap ``model`` as the adapters in ``path`` say and load them; returns their metadata."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise FormatError(f"{path}: not a scratchlm LoRA adapter file (format {meta.get('format')!r})")
    wrapped = apply_lora(model, int(meta["rank"]), float(meta["alpha"]), json.loads(meta["targets"]))
    expected = {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    if set(tensors) != expected:
        raise FormatError(f"{path}: adapters for {sorted(set(tensors) - expected)[:3]} / missing "
                          f"{sorted(expected - set(tensors))[:3]}: they were trained on another model shape")
    modules = lora_modules(model)
    with torch.no_grad():
        for key, value in tensors.items():
            name, _, which = key.rpartition(".")
            getattr(modules[name], which).copy_(value)
    return {**meta, "info": json.loads(meta.get("info", "{}"))}
