"""Weight formats for inference: how the runner stores the model's matrices.

Decoding one token reads every weight once, so its speed is the speed at which the matrix-vector
products stream weights from memory. On this 2-core CPU PyTorch's default path for a
(1 x d) @ (d x f) product streams fp32 weights at ~17 GB/s (one core) and bf16 at ~24 GB/s;
oneDNN's kernels fed weights *pre-packed* in oneDNN's blocked layout stream ~35-40 GB/s in both
(``tests/serve/test_engine.py`` compares the outputs, ``benchmarks/engine.py`` measures the speed). The
packing is what ``torch.compile`` does for CPU linears (``torch.ops.mkldnn._reorder_linear_weight``
and ``_linear_pointwise``); here it is done once, when the engine starts, without compiling.

* ``dense``: the model as it is (``nn.Linear``): the reference.
* ``onednn``: every ``nn.Linear`` replaced by :class:`OneDNNLinear` (CPU; float32 or bfloat16).
* ``auto``: ``onednn`` on a CPU where this PyTorch's oneDNN ops pass a self-check, else ``dense``.

The runner gets a converted *copy* of the module tree that shares every other tensor with the
original: the model object passed to the engine is never changed. Quantized formats belong here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

FORMATS = ("auto", "dense", "onednn")


class OneDNNLinear(nn.Module):
    """``y = x W^T + b`` with W packed once in oneDNN's blocked layout; ordinary tensors in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach(), 1
        )  # tuned for decode (1 row)
        self.bias = linear.bias.detach() if linear.bias is not None else None
        # The original matrix, shared (no copy): a layer that reads ``.weight`` itself (an MoE
        # router computes its scores in float32 with F.linear) still finds it.
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


_CHECKED: dict[torch.dtype, bool] = {}


def _onednn_works(dtype: torch.dtype) -> bool:
    """These are PyTorch's internal oneDNN ops: check once per dtype that they exist and agree with F.linear."""
    if dtype not in _CHECKED:
        try:
            linear = nn.Linear(64, 48).to(dtype)
            x = torch.randn(3, 5, 64, dtype=dtype)
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            ok = torch.allclose(
                OneDNNLinear(linear)(x).float(), linear(x).float(), atol=tolerance, rtol=tolerance
            )
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _CHECKED[dtype] = ok
    return _CHECKED[dtype]


def resolve(fmt: str, model: nn.Module) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {FORMATS}, got {fmt!r}")
    p = next(model.parameters())
    usable = (
        p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and _onednn_works(p.dtype)
    )
    if fmt == "onednn" and not usable:
        raise ValueError(
            f"the onednn weight format needs float32 or bfloat16 weights on a CPU whose PyTorch has "
            f"working oneDNN linear ops; these are {p.dtype} on {p.device}: use 'dense'"
        )
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
    clone._modules = {
        name: (OneDNNLinear(child) if isinstance(child, nn.Linear) else _replace_linears(child))
        for name, child in module._modules.items()
    }
    return clone
