"""Native Sparse Attention (the "nsa" mixer) is the function its spelled-out reference computes.

No Hugging Face class exists, so the oracle is internal: the efficient path (gathering only each
query's selected blocks and window) equals the dense, T x T-masked reference in outputs, gradients
and the selected blocks; parallel forward equals token-by-token and chunked decoding with the
cache; no output depends on a later token (checked at every position); the initial and local
blocks are always selected; with a window and a selection covering everything, the selected and
window branches are full causal attention; a model made of it trains; bad settings are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ConfigError
from scratchlm.generate import generate
from scratchlm.generate.kv_cache import KVCache
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models import sparse_attention
from scratchlm.models.gpt import GPT, GPTConfig
from scratchlm.models.layers import rope_tables
from scratchlm.models.sparse_attention import (
    NativeSparseAttention,
    NSAConfig,
    overlap_matrix,
)

TOL = {"atol": 1e-5, "rtol": 0}


def small(n_head=4, n_kv_head=2, gate="sigmoid", **nsa) -> GPTConfig:
    settings = {"compress_block": 4, "compress_stride": 2, "select_block": 4, "select_count": 3, "window": 5, "gate": gate}
    settings.update(nsa)
    return GPTConfig(vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, d_model=32, block_size=48,
                     position="rope", norm="rmsnorm", mlp="swiglu", bias=False, layers=["nsa"],
                     nsa=NSAConfig(**settings))


def mixer(config: GPTConfig, seed: int = 0, std: float = 0.3) -> NativeSparseAttention:
    torch.manual_seed(seed)
    m = NativeSparseAttention(config, 0)
    for p in m.parameters():  # large weights: no branch hides behind near-zero values
        torch.nn.init.normal_(p, 0.0, std)
    return m


def rope_for(config: GPTConfig, T: int):
    cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_theta)
    return cos[:T], sin[:T]


def as_mask(blocks, chosen, S):
    return torch.zeros(*blocks.shape[:-1], S, dtype=torch.bool).scatter(-1, blocks, chosen)


@pytest.mark.parametrize("heads,gate,nsa", [
    ((4, 2), "sigmoid", {}),  # GQA 2:1, overlapping compressed blocks (l = 2d), l' = l
    ((4, 1), "softmax", {"compress_block": 4, "compress_stride": 2, "select_block": 6, "select_count": 4}),  # MQA, l' != l
    ((2, 2), "sigmoid", {"compress_block": 3, "compress_stride": 3, "select_block": 3, "select_count": 2,
                             "initial_blocks": 0, "local_blocks": 1, "window": 1}),  # l = d = l': eq. 9 is the identity
    ((4, 2), "sigmoid", {"compress_block": 2, "compress_stride": 2, "select_block": 2, "select_count": 3,
                             "initial_blocks": 0, "local_blocks": 1}),  # many free picks: chunks' block unions differ in size
])
@pytest.mark.parametrize("union_limit", [1000, 0])  # each chunk loads its blocks' union / each query gathers its own
def test_reference_equals_efficient_forward_gradients_and_selection(heads, gate, nsa, union_limit, monkeypatch):
    monkeypatch.setattr(sparse_attention, "_QUERY_CHUNK", 8)  # several query chunks, each with its own block union
    monkeypatch.setattr(sparse_attention, "_UNION_LIMIT", union_limit)
    config = small(*heads, gate=gate, **nsa)
    m = mixer(config)
    x = torch.randn(2, 31, 32, requires_grad=True)
    rope = rope_for(config, 31)
    fast, ref = m.branches(x, rope=rope), m.reference(x, rope=rope)
    S = ref["selected_blocks"].shape[-1]
    assert torch.equal(as_mask(fast["blocks"], fast["chosen"], S), ref["selected_blocks"])
    for name in ("compressed", "selected", "window", "output"):
        torch.testing.assert_close(fast[name], ref[name], **TOL)
    # Gradients in float64: float32 rounding of these deliberately large values (sums of ~1e2
    # terms of size ~1) alone reaches 1e-5, and the claim is that the two compute the same function.
    m, x = m.double(), x.detach().double().requires_grad_()
    fast, ref = m.branches(x, rope=rope), m.reference(x, rope=rope)
    weights = torch.randn_like(fast["output"])
    grads_fast = torch.autograd.grad((fast["output"] * weights).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((ref["output"] * weights).sum(), [x, *m.parameters()])
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], grads_fast, grads_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda s, n=name: f"gradient of {n}: {s}")
    assert all(g.abs().sum() > 0 for g in grads_fast)  # every parameter, the compressors included, gets gradient


def test_overlap_matrix_is_eq_9():
    # l = 4, d = 2, l' = 4: compressed block i covers [2i, 2i + 4); it shares 2 tokens (1 unit of d)
    # with each of two selection blocks when it straddles them, and all 4 (2 units) when aligned.
    M = overlap_matrix(4, 3, 4, 2, 4)
    assert M.tolist() == [[2, 0, 0], [1, 1, 0], [0, 2, 0], [0, 1, 1]]
    assert torch.equal(overlap_matrix(5, 5, 3, 3, 3), torch.eye(5))  # l = d = l': p_slc = p_cmp


def decode_logits(model, ids, chunks):
    cache = KVCache.for_model(model, ids.shape[0], max_len=ids.shape[1])
    out, at = [], 0
    for n in chunks:
        out.append(model(ids[:, at : at + n], cache=cache)[0])
        at += n
    assert at == ids.shape[1]
    return torch.cat(out, dim=1), cache


@torch.no_grad()
@pytest.mark.parametrize("union_limit", [1000, 0])
def test_parallel_forward_equals_token_by_token_and_chunked_decoding(union_limit, monkeypatch):
    monkeypatch.setattr(sparse_attention, "_QUERY_CHUNK", 8)
    monkeypatch.setattr(sparse_attention, "_UNION_LIMIT", union_limit)
    config = small()
    config.layers = ["nsa", "attention"]
    config.__post_init__()
    torch.manual_seed(0)
    model = GPT(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    ids = torch.randint(0, 97, (2, 37))
    full = model(ids)[0]
    one_by_one, cache = decode_logits(model, ids, [1] * 37)
    torch.testing.assert_close(one_by_one, full, **TOL)
    chunked, _ = decode_logits(model, ids, [7, 1, 5, 3, 1, 12, 8])  # prefill, then mixed chunk sizes
    torch.testing.assert_close(chunked, full, **TOL)
    # The store is what the docstring says: every position for the selected branch, the last w - 1
    # for the window, one compressed pair per complete block, and the raw tail of the open block.
    state, c = cache.state(0), config.nsa
    assert state["k_slc"].shape[2] == 37 and state["k_win"].shape[2] == c.window - 1
    assert state["k_cmp"].shape[2] == (37 - c.compress_block) // c.compress_stride + 1
    assert state["k_raw"].shape[2] < c.compress_block
    assert cache.length == 37 and not cache.states.get(1)  # the plain attention layer uses the k, v rows


@torch.no_grad()
def test_cache_reorder_keeps_each_rows_history():
    config = small()
    torch.manual_seed(1)
    model = GPT(config).eval()
    ids = torch.randint(0, 97, (2, 20))
    cache = KVCache.for_model(model, 2, max_len=20)
    model(ids[:, :13], cache=cache)
    cache.reorder(torch.tensor([1, 1, 0]))  # beam search: rows are copied and swapped
    step = model(ids[[1, 1, 0], 13:], cache=cache)[0]
    torch.testing.assert_close(step, model(ids[[1, 1, 0]])[0][:, 13:], **TOL)


@torch.no_grad()
def test_generate_with_cache_equals_without():  # greedy, and sampled with one seed
    torch.manual_seed(2)
    model = GPT(small()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    prompt = [5, 17, 3, 88, 41]
    for sampling, seed in ((SamplingConfig(temperature=0), None), (SamplingConfig(temperature=1.0), 7)):
        with_cache = generate(model, prompt, 30, sampling, use_cache=True, seed=seed)
        assert with_cache == generate(model, prompt, 30, sampling, use_cache=False, seed=seed)
    assert len(set(with_cache[0])) > 10  # sampled: a varied text, not a loop any cache bug could also produce


@torch.no_grad()
def test_no_output_depends_on_a_later_token():
    config = small(compress_block=4, compress_stride=2, select_block=4, select_count=2, window=3, local_blocks=1)
    m = mixer(config, seed=3)
    T = 24
    x = torch.randn(1, T, 32)
    rope = rope_for(config, T)
    base = m(x, rope=rope)
    for p in range(T):
        changed = x.clone()
        changed[:, p] += 5.0 * torch.randn(32)
        out = m(changed, rope=rope)
        assert torch.equal(out[:, :p], base[:, :p]), f"changing position {p} changed an earlier output"
        assert not torch.allclose(out[:, p], base[:, p])  # the test can fail: position p itself does change
        ref = m.reference(changed, rope=rope)["output"]  # the reference is causal too
        torch.testing.assert_close(ref[:, :p], base[:, :p], **TOL)


def test_initial_and_local_blocks_are_always_selected():
    config = small(select_block=4, select_count=4, initial_blocks=1, local_blocks=2)
    m = mixer(config)
    T, S = 40, 10
    pos = torch.arange(T)
    # Adversarial scores: the forced blocks score lowest, future blocks highest.
    j = torch.arange(S)
    scores = torch.where((j == 0) | (j >= 8), -1.0, j.float()).expand(1, 2, T, S).clone()
    blocks, chosen = m._top_blocks(scores, pos)
    picked = as_mask(blocks, chosen, S)[0, 0]
    for t in range(T):
        current = t // 4
        expected_forced = {0, current, max(current - 1, 0)}
        got = set(torch.nonzero(picked[t]).flatten().tolist())
        assert expected_forced <= got, f"query {t}: {got} lacks {expected_forced}"
        assert max(got) <= current  # never a block that starts after the query
        assert len(got) == min(4, current + 1)
    # And in the model, on random input.
    out = m.branches(torch.randn(2, T, 32), rope=rope_for(config, T))
    picked = as_mask(out["blocks"], out["chosen"], S)
    for t in range(T):
        for block in {0, t // 4, max(t // 4 - 1, 0)}:
            assert picked[:, :, t, block].all()


@torch.no_grad()
def test_full_window_and_full_selection_are_causal_attention():
    T = 26  # 7 selection blocks of 4
    config = small(select_block=4, select_count=7, window=T)
    m = mixer(config, seed=4)
    x = torch.randn(2, T, 32)
    rope = rope_for(config, T)
    q, kv, _ = m._project(x, rope)
    out = m.branches(x, rope=rope)
    for name in ("selected", "window"):
        k, v = kv[name]
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[name], expected, **TOL)


def test_trains_loss_falls():
    torch.manual_seed(5)
    model = GPT(small())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(25):
        loss = model(ids[:, :-1], ids[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_cache_accounting():
    config = small()  # Hkv = 2, D = 8, d = 2
    m = NativeSparseAttention(config, 0)
    assert m.compressed_values_per_token() == 2 * 2 * 8 / 2
    assert m.cache_values_per_token() == 2 * 2 * 8 + 16
    assert m.state_values_per_sequence() == 2 * 2 * 8 * (5 - 1 + 4 - 1)
    assert GPT(config).kv_cache_bytes_per_token(2) == 2 * 2 * (32 + 16)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="compress_stride = 3 must divide compress_block = 4"):
        NSAConfig(compress_block=4, compress_stride=3, select_block=6)
    with pytest.raises(ConfigError, match="exceeds select_count = 2"):
        NSAConfig(select_count=2, initial_blocks=1, local_blocks=2)
    with pytest.raises(ConfigError, match="model.nsa.gate"):
        NSAConfig(gate="relu")
    model = GPT(small())
    ids = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="nsa layers do not take packed rows"):
        model(ids, documents=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))

    class Paged:
        paged = True
        length = 0

    with pytest.raises(ValueError, match="paged cache"):
        model.blocks[0].attn(torch.randn(1, 8, 32), cache=Paged())
    with pytest.raises(ValueError, match="not alibi"):
        model.blocks[0].attn(torch.randn(1, 8, 32), alibi=torch.ones(4))
