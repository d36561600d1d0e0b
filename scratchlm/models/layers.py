"""The small pieces every block kind shares: norms, position tables, the dense MLP.

RMSNorm and LayerNorm (``make_norm``); the position encodings a model adds to its embeddings or
turns its queries and keys by (sinusoidal, RoPE, ALiBi); and the position-wise feed-forward
network. The mixers that read these live in ``models/blocks/`` (attention and its variants, MLA,
Mamba); the stack that builds the tables once per model is ``models/gpt.py``.

Shapes used throughout: ``B`` batch, ``T`` new positions, ``H`` query heads, ``D`` head width,
``C = d_model``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --- normalization ------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain. No mean, no bias.

    Computed in float32 and cast back, as Llama does. (Written out rather than ``F.rms_norm``:
    on CPUs the spelled-out form measured faster, forward and backward.)
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


# --- positions --------------------------------------------------------------------------------
def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need": (n_positions, dim)."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def rope_tables(n_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's rotation angles: (n_positions, head_dim), halves repeated.

    Pair ``i`` of a head (dimensions ``i`` and ``i + D/2``, the "rotate half" layout of Llama and
    Hugging Face) turns by ``position * theta^(-2i/D)``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by position: relative offsets then show up in every q·k.

    Pair (x1, x2) = (x[i], x[i + D/2]) becomes (x1·cos − x2·sin, x2·cos + x1·sin).
    """
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[..., : x1.shape[-1]], sin[..., : x1.shape[-1]]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence (the paper's rule for non-powers of two)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_two(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_head - closest])


# --- MLPs ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Position-wise feed-forward: up-project, nonlinearity, down-project.

    ``swiglu`` gates the up-projection with a second one: ``down(silu(gate(x)) * up(x))``;
    ``geglu`` (Shazeer 2020; Gemma) is the same gate through GELU-tanh: ``down(gelu(gate(x)) * up(x))``.
    ``relu2`` is ReLU squared (Primer, modded-nanoGPT); ``gelu_tanh`` is GPT-2's approximation.
    """

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        if self.kind not in ("gelu", "gelu_tanh", "swiglu", "geglu", "relu2"):
            raise ValueError(f"mlp must be gelu | gelu_tanh | swiglu | geglu | relu2, got {self.kind!r}")
        hidden = config.ff_width
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.gate = (
            nn.Linear(config.d_model, hidden, bias=config.bias) if self.kind in ("swiglu", "geglu") else None
        )
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "geglu":
            h = F.gelu(self.gate(x), approximate="tanh") * h
        else:
            h = F.silu(self.gate(x)) * h
        return self.dropout(self.down(h))
