"""Weight formats for inference: how the runner stores the model's matrices.

Decoding one token reads every weight once, so its speed is the speed at which the matrix-vector
products stream weights from memory. On CPUs PyTorch's default path for a (1 x d) @ (d x f)
product runs on one core of this machine (~17 GB/s); oneDNN's kernels, fed weights in oneDNN's
own layout (``Tensor.to_mkldnn()``), use every core (~40 GB/s, measured in ``benchmarks/engine.py``).

* ``dense``: the model as it is (``nn.Linear``): the reference.
* ``onednn``: every ``nn.Linear`` replaced by :class:`OneDNNLinear` (CPU, float32 only; in
  bfloat16 the dense path already calls oneDNN).
* ``auto``: ``onednn`` on a CPU in float32 where PyTorch has oneDNN, else ``dense``.

The runner gets a converted *copy* of the module tree that shares every other tensor with the
original: the model object passed to the engine is never changed. Quantized formats belong here.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("auto", "dense", "onednn")


class OneDNNLinear(nn.Module):
    """``y = x W^T + b`` with W and b in oneDNN's layout; inputs and outputs are ordinary tensors."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = linear.bias.detach().to_mkldnn() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()


def resolve(fmt: str, model: nn.Module) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {FORMATS}, got {fmt!r}")
    p = next(model.parameters())
    usable = p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if fmt == "onednn" and not usable:
        raise ValueError(f"the onednn weight format needs float32 weights on a CPU with oneDNN; these are {p.dtype} "
                         f"on {p.device}: use 'dense'")
    if fmt == "auto":
        return "onednn" if usable else "dense"
    return fmt


def for_inference(model: nn.Module, fmt: str = "auto") -> nn.Module:
    """The module the runner calls: ``model`` itself (dense) or a copy with converted linears."""
    if resolve(fmt, model) == "dense":
        return model
    return _replace_linears(model)


def _replace_linears(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)  # shares parameters and buffers; gets its own table of children
    clone._modules = {name: (OneDNNLinear(child) if isinstance(child, nn.Linear) else _replace_linears(child))
                      for name, child in module._modules.items()}
    return clone
