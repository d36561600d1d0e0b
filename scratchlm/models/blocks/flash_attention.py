"""FlashAttention as a memory-traffic story: tiled attention with an online softmax (checkpoint E).

Standard attention builds the (T x S) score matrix, writes it out, reads it back for the softmax,
writes the probabilities, and reads them again to multiply by V. For long contexts those T x S
matrices dwarf Q, K and V: at T = S = 4,096, 8 heads, fp32, each is 512 MiB, while Q, K and V
together are 24 MiB. Moving them through memory is the cost, not the FLOPs.

FlashAttention (Dao et al., 2022, Algorithm 1) never builds them. Queries are processed a block at a
time; for each query block the keys and values stream past a block at a time, and the softmax is
computed *online*: for each query row keep the running maximum ``m``, the running sum of
exponentials ``l`` and the running weighted sum of values ``acc``. When a new block of scores
``s`` arrives:

    m_new = max(m, rowmax(s))
    p     = exp(s - m_new)
    l     = l * exp(m - m_new) + rowsum(p)        # rescale the old sum to the new maximum
    acc   = acc * exp(m - m_new) + p @ V_block
    m     = m_new

and at the end ``out = acc / l`` — exactly softmax(s) @ V, because every term was rescaled to the
same final maximum. Only a (block_q x block_k) tile of scores exists at any moment.

This is the algorithm in plain PyTorch, for reading and measuring; on a GPU the same loop runs in
on-chip SRAM inside one kernel (``F.scaled_dot_product_attention`` dispatches to such kernels).

A sliding window (``window = W``: query ``i`` sees keys ``i - W < j <= i``) is where tiling pays
twice: key tiles wholly older than a query block's window are never visited, so the work per query
block is O(W), not O(position).

Backward: every step above is a differentiable PyTorch operation, so autograd through the loop
computes the exact gradient of the same function (tests compare it with SDPA's); the real
FlashAttention backward recomputes the tiles instead of storing them, which this version does not.
"""

from __future__ import annotations

import math

import torch


def _expand_kv(k: torch.Tensor, v: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: query head h reads key/value head h // (H / Hkv)."""
    groups = n_head // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int | None = None,
    alibi: torch.Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """The reference: materialise the (B, H, T, S) scores, softmax, multiply by V.

    q (B, H, T, D); k, v (B, Hkv, S, D). Query i sits at position ``start + i`` (default: the last
    T of the S key positions, as when decoding with a cache). ``window``: each query sees only the
    ``window`` most recent keys, itself included (sliding-window attention; needs ``causal``).
    """
    k, v = _expand_kv(k, v, q.shape[1])
    T, S = q.shape[2], k.shape[2]
    start = S - T if start is None else start
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    query_pos = torch.arange(start, start + T, device=q.device)[:, None]
    key_pos = torch.arange(S, device=q.device)[None, :]
    if alibi is not None:
        scores = scores - alibi.to(scores.dtype)[:, None, None] * (query_pos - key_pos).clamp_min(0)
    if causal:
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    if window is not None:
        scores = scores.masked_fill(key_pos <= query_pos - window, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int | None = None,
    alibi: torch.Tensor | None = None,
    causal: bool = True,
    block_q: int = 64,
    block_k: int = 64,
    window: int | None = None,
) -> torch.Tensor:
    """Attention computed tile by tile with an online softmax; equal to :func:`naive_attention`.

    Same arguments. Peak extra memory is one (B, H, block_q, block_k) tile of scores plus the
    running statistics, instead of the full (B, H, T, S) matrix.
    """
    k, v = _expand_kv(k, v, q.shape[1])
    B, H, T, D = q.shape
    S = k.shape[2]
    start = S - T if start is None else start
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        q_blk = q[:, :, q0:q1] * scale
        query_pos = torch.arange(start + q0, start + q1, device=q.device)[:, None]
        m = torch.full((B, H, q1 - q0, 1), float("-inf"), device=q.device, dtype=q.dtype)  # running max
        l = torch.zeros((B, H, q1 - q0, 1), device=q.device, dtype=q.dtype)  # running sum of exp
        acc = torch.zeros((B, H, q1 - q0, D), device=q.device, dtype=q.dtype)  # running sum of p @ V
        last_key = min(S, start + q1) if causal else S  # causal: later keys cannot be seen by this block
        # sliding window: keys older than the first query's window cannot be seen by this block either
        first_key = 0 if window is None else max(0, start + q0 - window + 1)
        for k0 in range(first_key, last_key, block_k):
            k1 = min(k0 + block_k, last_key)
            s = q_blk @ k[:, :, k0:k1].transpose(-2, -1)  # (B, H, bq, bk): the only scores that exist
            key_pos = torch.arange(k0, k1, device=q.device)[None, :]
            if alibi is not None:
                s = s - alibi.to(s.dtype)[:, None, None] * (query_pos - key_pos).clamp_min(0)
            if causal and k1 > start + q0:  # a tile crossing the diagonal
                s = s.masked_fill(key_pos > query_pos, float("-inf"))
            if window is not None and k0 <= start + q1 - 1 - window:  # a tile crossing the window's far edge
                s = s.masked_fill(key_pos <= query_pos - window, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # A row whose keys so far are all masked has m_new = -inf: keep it finite so exp gives 0.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe)
            correction = torch.exp(m - m_safe)
            l = l * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[:, :, k0:k1]
            m = m_new
        out[:, :, q0:q1] = acc / l
    return out


def attention_bytes(
    T: int,
    S: int | None = None,
    head_dim: int = 64,
    heads: int = 1,
    batch: int = 1,
    bytes_per_value: int = 2,
    block_q: int = 128,
) -> dict[str, int]:
    """Bytes standard and tiled attention move through main memory (the FlashAttention accounting).

    * standard: read Q, K, V; write the T x S scores, read them for the softmax, write the
      probabilities, read them for ``P @ V``; write O.
    * tiled: read Q once and write O once; K and V stream past once per query block
      (``ceil(T / block_q)`` times); the score tiles never leave on-chip memory.

    Both grow with T x S: standard as ``4 T S``, tiled as ``2 T S head_dim / block_q``. The ratio is
    ``2 block_q / head_dim``: the larger the query block that fits on chip, the less K and V are
    re-read (4x less at block 128, head width 64; the FlashAttention paper's Theta(N^2 d^2 / M)).
    """
    S = T if S is None else S
    per_head_standard = (T + 2 * S + T) * head_dim + 4 * T * S
    per_head_tiled = 2 * T * head_dim + 2 * S * head_dim * math.ceil(T / block_q)
    scale = batch * heads * bytes_per_value
    return {"standard": per_head_standard * scale, "tiled": per_head_tiled * scale}
