"""Tiled online-softmax attention equals SDPA and the spelled-out version, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.models.blocks.flash_attention import attention_bytes, naive_attention, tiled_attention
from scratchlm.models.layers import alibi_slopes


@pytest.mark.parametrize(
    "B,H,Hkv,T,S,D,causal",
    [
        (2, 4, 4, 37, 37, 16, True),  # sizes that are not multiples of the blocks
        (1, 4, 2, 64, 64, 8, True),  # grouped-query attention
        (2, 2, 2, 5, 70, 16, True),  # queries after a cache of 65 positions (decode with a prefix)
        (1, 2, 1, 1, 33, 8, True),  # one decode step, multi-query
        (2, 3, 3, 20, 29, 8, False),  # no mask
    ],
)
def test_tiled_equals_sdpa_and_naive(B, H, Hkv, T, S, D, causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    tiled = tiled_attention(q, k, v, causal=causal, block_q=16, block_k=8)
    naive = naive_attention(q, k, v, causal=causal)
    mask = None
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
    torch.testing.assert_close(tiled, sdpa, atol=1e-5, rtol=0)
    torch.testing.assert_close(naive, sdpa, atol=1e-5, rtol=0)


def test_alibi_bias_is_applied_per_tile():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8)
    slopes = alibi_slopes(4)
    torch.testing.assert_close(
        tiled_attention(q, k, v, alibi=slopes, block_q=8, block_k=16),
        naive_attention(q, k, v, alibi=slopes),
        atol=1e-5,
        rtol=0,
    )


def test_autograd_through_the_tiles_gives_sdpas_gradients():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, 30, 8, dtype=torch.float64)
    tiled = torch.autograd.grad(tiled_attention(q, k, v, block_q=7, block_k=11), (q, k, v), grad_out)
    sdpa = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)
    for a, b in zip(tiled, sdpa):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_model_with_tiled_attention_matches_sdpa_and_cached_decoding():
    from scratchlm.generate import KVCache
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    for position in ("rope", "alibi"):
        torch.manual_seed(3)
        base = dict(
            vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=48, position=position
        )
        sdpa = GPT(GPTConfig(**base)).eval()
        tiled = GPT(GPTConfig(**base, attention="tiled"))
        tiled.load_state_dict(sdpa.state_dict())
        tiled.eval()
        ids = torch.randint(0, 50, (2, 40))
        with torch.no_grad():
            torch.testing.assert_close(tiled(ids)[0], sdpa(ids)[0], atol=1e-5, rtol=0)
            cache = KVCache.for_model(tiled, 2)
            tiled(ids[:, :30], cache=cache)
            step = tiled(ids[:, 30:31], cache=cache)[0][:, -1]
            torch.testing.assert_close(step, sdpa(ids[:, :31])[0][:, -1], atol=1e-5, rtol=0)


def test_bytes_moved_calculator():
    # Standard: (T + 2S + T) d + 4 T S values per head; tiled: 2 T d + 2 S d ceil(T / block_q).
    b = attention_bytes(1024, head_dim=64, bytes_per_value=1, block_q=128)
    assert b["standard"] == 4 * 1024 * 64 + 4 * 1024 * 1024
    assert b["tiled"] == 2 * 1024 * 64 + 2 * 1024 * 64 * 8
    big = attention_bytes(16_384, head_dim=64, block_q=128)
    assert big["standard"] / big["tiled"] == pytest.approx(2 * 128 / 64, rel=0.01)
    assert math.isclose(attention_bytes(8, heads=3, batch=2)["tiled"], 6 * attention_bytes(8)["tiled"])
