"""The parts of a decoder block: norms, positions, attention, MLPs (checkpoint C).

Shapes used throughout: ``B`` batch, ``T`` new positions, ``S`` positions attended to (``T`` plus
whatever the KV cache already holds), ``H`` query heads, ``Hkv`` key/value heads, ``D`` head width,
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


# --- attention ----------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal multi-head self-attention with grouped key/value heads (MHA, GQA, MQA).

    One fused projection makes ``H`` query heads and ``Hkv`` key and value heads; each group of
    ``H / Hkv`` query heads shares one key/value head, which divides the KV cache by that factor.
    ``impl="manual"`` spells attention out (scores, mask, softmax, weighted sum) for reading;
    ``impl="sdpa"`` calls PyTorch's fused kernel (FlashAttention on GPUs that support it). The two
    agree to 1e-5, which the tests check.
    """

    kv_cache = True  # keeps k, v of every past position in the KV cache

    def __init__(self, config, window: int | None = None):
        super().__init__()
        self.window = window  # sliding-window attention: each query sees its last ``window`` keys
        if window is not None:
            raise NotImplementedError("sliding-window attention is being written")
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.d_model // config.n_head
        self.impl = config.attention
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None,
                positions=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cache.paged:  # the engine's paged cache stores k, v in its blocks and attends
            y = cache.attend(layer, q, k, v, alibi=alibi)  # (1, H, N, D) for N packed tokens
            return self.proj(y.transpose(1, 2).reshape(B, T, H * D))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D): everything so far
        dropout = self.dropout if self.training else 0.0
        if packed_mask is not None:  # packed rows: causal *within* each document only
            if self.impl == "tiled":
                raise ValueError("attention = 'tiled' does not take packed rows; use 'sdpa' or 'manual'")
            return self.proj(self._packed(q, k, v, packed_mask, dropout).transpose(1, 2).reshape(B, T, H * D))
        if self.impl == "manual":
            y = self._manual(q, k, v, start, alibi, dropout)
        elif self.impl == "tiled":  # FlashAttention's algorithm, spelled out (models/flash_attention.py)
            if dropout:
                raise ValueError("attention = 'tiled' has no dropout; set model.dropout = 0 or use 'sdpa'")
            from scratchlm.models.flash_attention import tiled_attention

            y = tiled_attention(q, k, v, start=start, alibi=alibi)
        else:
            y = self._sdpa(q, k, v, start, alibi, dropout)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.proj(y)

    def cache_values_per_token(self) -> int:
        """Values this layer keeps in the KV cache per token: k and v of every KV head."""
        return 2 * self.n_kv_head * self.head_dim

    def _manual(self, q, k, v, start, alibi, dropout):
        groups = self.n_head // self.n_kv_head
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D): query head h reads kv head h // groups
        v = v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        scores = scores + attention_bias(q.shape[2], k.shape[2], start, alibi, q.device, scores.dtype)
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        weights = F.dropout(weights, dropout, self.training)
        return weights @ v  # (B, H, T, D)

    def _packed(self, q, k, v, mask, dropout):
        """Attention over packed rows with the mask of :func:`scratchlm.models.gpt.packing`
        (boolean, or ALiBi's additive bias). K and V are expanded to every query head: PyTorch's
        GQA support covers only kernels that take no mask, and the memory-efficient kernel takes
        one."""
        groups = self.n_head // self.n_kv_head
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.impl == "manual":
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout, self.training)
            return weights @ v
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def _sdpa(self, q, k, v, start, alibi, dropout):
        T, S = q.shape[2], k.shape[2]
        gqa = self.n_kv_head != self.n_head
        if alibi is None and start == 0 and T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
        if alibi is None and T == 1:  # one new token sees everything cached: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
        mask = attention_bias(T, S, start, alibi, q.device, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


def attention_bias(T: int, S: int, start: int, alibi, device, dtype) -> torch.Tensor:
    """Additive (H or 1, T, S) bias for T queries at positions ``start...start+T-1`` over S keys at
    positions 0...S-1: -inf above the causal diagonal, ALiBi's distance penalty."""
    query_pos = torch.arange(start, start + T, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    bias = torch.zeros(T, S, device=device, dtype=dtype).masked_fill(key_pos > query_pos, float("-inf"))
    if alibi is not None:
        distance = (query_pos - key_pos).clamp_min(0).to(dtype)
        bias = bias - alibi.to(device=device, dtype=dtype)[:, None, None] * distance
    return bias


# --- MLPs ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Position-wise feed-forward: up-project, nonlinearity, down-project.

    ``swiglu`` gates the up-projection with a second one: ``down(silu(gate(x)) * up(x))``.
    ``relu2`` is ReLU squared (Primer, modded-nanoGPT); ``gelu_tanh`` is GPT-2's approximation.
    """

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        if self.kind not in ("gelu", "gelu_tanh", "swiglu", "relu2"):
            raise ValueError(f"mlp must be gelu | gelu_tanh | swiglu | relu2, got {self.kind!r}")
        hidden = config.ff_width
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.gate = nn.Linear(config.d_model, hidden, bias=config.bias) if self.kind == "swiglu" else None
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
        else:
            h = F.silu(self.gate(x)) * h
        return self.dropout(self.down(h))
