"""Native Sparse Attention (the "nsa" mixer) is the function its spelled-out reference computes.

No Hugging Face class exists, so the oracle is internal: the efficient path (gathering only each
query's selected blocks and window) equals the dense, T x T-masked reference in outputs, gradients
and the selected blocks; eq. 9's O(N) sliding sum equals its matrix definition (the overlap count,
which is the paper's printed double sum shifted by l' - d tokens), and the forward pass never
allocates that matrix, nor a T x T one, in a prefill or a decoding step; parallel forward equals
token-by-token and chunked decoding with the cache, and a decoding step writes less than one key per
token of history (it copies no history); each branch reads its own keys and values; no output
depends on a later token (checked at every position); the initial and local blocks are always
selected; with a window and a selection covering everything, the selected and window branches are
full causal attention; a model made of it trains, MTP depths included; bad settings and positions
the blocks cannot honour are refused.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scratchlm.config import ConfigError
from scratchlm.generate import generate
from scratchlm.generate.kv_cache import KVCache
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models.blocks import sparse_attention
from scratchlm.models.blocks.mtp import mtp_acceptance
from scratchlm.models.blocks.sparse_attention import (
    BRANCHES,
    NativeSparseAttention,
    NSAConfig,
    overlap_matrix,
    selection_scores,
)
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.layers import rope_tables

TOL = {"atol": 1e-5, "rtol": 0}


def small(n_head=4, n_kv_head=2, gate="sigmoid", block_size=48, mtp=None, **nsa) -> GPTConfig:
    settings = {
        "compress_block": 4,
        "compress_stride": 2,
        "select_block": 4,
        "select_count": 3,
        "window": 5,
        "gate": gate,
    }
    settings.update(nsa)
    return GPTConfig(
        vocab_size=97,
        n_layer=2,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=32,
        block_size=block_size,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        layers=["nsa"],
        nsa=NSAConfig(**settings),
        mtp=mtp,
    )


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


@pytest.mark.parametrize(
    "heads,gate,nsa",
    [
        ((4, 2), "sigmoid", {}),  # GQA 2:1, overlapping compressed blocks (l = 2d), l' = l
        (
            (4, 1),
            "softmax",
            {"compress_block": 4, "compress_stride": 2, "select_block": 6, "select_count": 4},
        ),  # MQA, l' != l
        (
            (2, 2),
            "sigmoid",
            {
                "compress_block": 3,
                "compress_stride": 3,
                "select_block": 3,
                "select_count": 2,
                "initial_blocks": 0,
                "local_blocks": 1,
                "window": 1,
            },
        ),  # l = d = l': eq. 9 is the identity
        (
            (4, 2),
            "sigmoid",
            {
                "compress_block": 2,
                "compress_stride": 2,
                "select_block": 2,
                "select_count": 3,
                "initial_blocks": 0,
                "local_blocks": 1,
            },
        ),  # many free picks: chunks' block unions differ in size
    ],
)
@pytest.mark.parametrize(
    "union_limit", [1000, 0]
)  # each chunk loads its blocks' union / each query gathers its own
def test_reference_equals_efficient_forward_gradients_and_selection(
    heads, gate, nsa, union_limit, monkeypatch
):
    monkeypatch.setattr(
        sparse_attention, "_QUERY_CHUNK", 8
    )  # several query chunks, each with its own block union
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
    assert all(
        g.abs().sum() > 0 for g in grads_fast
    )  # every parameter, the compressors included, gets gradient


def test_overlap_matrix_counts_shared_tokens_in_units_of_d():
    # l = 4, d = 2, l' = 4: compressed block i covers [2i, 2i + 4); it shares 2 tokens (1 unit of d)
    # with each of two selection blocks when it straddles them, and all 4 (2 units) when aligned.
    M = overlap_matrix(4, 3, 4, 2, 4)
    assert M.tolist() == [[2, 0, 0], [1, 1, 0], [0, 2, 0], [0, 1, 1]]
    assert torch.equal(overlap_matrix(5, 5, 3, 3, 3), torch.eye(5))  # l = d = l': p_slc = p_cmp


@pytest.mark.parametrize("l,d,ls", [(4, 2, 4), (8, 2, 4), (4, 2, 8), (6, 3, 3), (3, 3, 3)])
def test_printed_eq_9_is_the_overlap_shifted_by_l_sel_minus_d(l, d, ls):
    # The paper prints p_slc[j] = sum over m < l'/d, n < l/d of p_cmp[(l'/d) j - m - n]. Those
    # weights are the overlap's, given to the compressed block l'/d - 1 indices (l' - d tokens)
    # earlier: with l = 4, d = 2, l' = 4 the printed sum credits selection block 1 (tokens 4-7) with
    # p[0] + 2 p[1] + p[2], and block 0 = tokens 0-3 shares none of them. The code keeps the overlap.
    N, S = 12, 5
    printed = torch.zeros(N, S)
    for j in range(S):
        for m in range(ls // d):
            for n in range(l // d):
                if 0 <= (ls // d) * j - m - n < N:
                    printed[(ls // d) * j - m - n, j] += 1
    shift = ls // d - 1
    overlap = overlap_matrix(N + shift, S, l, d, ls)[shift:]
    assert torch.equal(printed, overlap)
    assert shift == 0 or not torch.equal(printed, overlap_matrix(N, S, l, d, ls))


@pytest.mark.parametrize(
    "l,d,ls,N,S",
    [
        (4, 2, 4, 9, 5),
        (8, 2, 4, 9, 5),
        (4, 2, 8, 13, 4),
        (6, 3, 3, 7, 9),
        (3, 3, 3, 6, 6),
        (4, 2, 4, 0, 2),
        (4, 2, 4, 9, 2),
    ],
)
def test_selection_scores_equal_the_overlap_matrix(l, d, ls, N, S):
    # Eq. 9 as a sliding sum in units of d, against its matrix definition; N = 0 (no complete
    # compressed block yet) and N beyond the S blocks (blocks past the last unit) included.
    torch.manual_seed(0)
    p = torch.rand(2, 3, 7, N, dtype=torch.float64)
    expected = p @ overlap_matrix(N, S, l, d, ls).double()
    torch.testing.assert_close(selection_scores(p, S, l, d, ls), expected, atol=1e-12, rtol=0)


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
    # The store is what the docstring says: every position for the selected branch (in whole blocks
    # of l' = 4: 40 >= 37), the last w - 1 for the window, one compressed pair per block that can
    # complete within max_len = 37 (all complete now), and the raw tail of the open block.
    state, c = cache.state(0), config.nsa
    assert state["k_slc"].shape[2] == 40 and state["k_win"].shape[2] == c.window - 1
    assert state["k_cmp"].shape[2] == (37 - c.compress_block) // c.compress_stride + 1 == 17
    assert state["k_raw"].shape[2] < c.compress_block
    assert cache.length == 37 and not cache.states.get(1)  # the plain attention layer uses the k, v rows


class Dispatched(TorchDispatchMode):
    """Counts what each tensor operation does: the bytes and shapes of every new tensor it makes
    (views and in-place writes, whose result shares an input's storage, excluded) and the calls per op."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls, self.shapes = 0, collections.Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls[str(func)] += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.numel() * t.element_size()
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@torch.no_grad()
def test_the_efficient_path_builds_no_n_by_s_or_t_by_t_matrix():
    # Eq. 9 as a product with the N x S overlap matrix (N compressed blocks, S selection blocks)
    # costs t^2 / (d l') per decoded token and T^3 / (d l') in a prefill (docs/sparse-attention.md:
    # 112 ms of a 147 ms step at t = 64k); a T x T score or mask is what the efficient path exists
    # to avoid. Every tensor the forward pass allocates is recorded, in a prefill and in a decoding
    # step. H = 1, so the largest legitimate tensors, the compressed branch's (T, N) scores, hold T^2 / d.
    config = small(n_head=1, n_kv_head=1, block_size=512)  # l = 4, d = 2, l' = 4, D = 32
    m = mixer(config)
    T = 400
    x = torch.randn(1, T + 1, 32)
    cos, sin = rope_for(config, T + 1)

    def forbidden(shapes, N, S, most):  # (N, S) in any layout, or anything of `most` values or more
        return [(op, s) for op, s in shapes if (N in s and S in s) or math.prod(s) >= most]

    N, S = (T - 4) // 2 + 1, T // 4  # 199 complete compressed blocks, 100 selection blocks
    with Dispatched() as prefill:
        m(x[:, :T], rope=(cos[:T], sin[:T]))
    assert not forbidden(prefill.shapes, N, S, T * T)
    assert max(math.prod(s) for _, s in prefill.shapes) >= T * N  # the recording sees the (T, N) scores

    # A decoding step after T tokens: N x S (199 x 101) dwarfs the O(t) a step may allocate.
    cache = KVCache(0, 1, 1, T + 1, 32, layers=[])
    m(x[:, :T], rope=(cos[:T], sin[:T]), cache=cache)
    cache.advance(T)
    N, S = (T + 1 - 4) // 2 + 1, math.ceil((T + 1) / 4)
    with Dispatched() as step:
        m(x[:, T:], rope=(cos[T:], sin[T:]), cache=cache)
    assert not forbidden(step.shapes, N, S, N * S)

    # The checks can fail: the matrix itself, and the reference's T x T masks, are caught.
    with Dispatched() as matrix:
        overlap_matrix(N, S, 4, 2, 4)
    assert forbidden(matrix.shapes, N, S, N * S)
    with Dispatched() as dense:
        m.reference(x[:, :T], rope=(cos[:T], sin[:T]))
    assert forbidden(dense.shapes, N, S, T * T)


@torch.no_grad()
def test_a_decoding_step_copies_no_history_and_syncs_nothing():
    # Hkv = 1, D = 32, float32, l = 4, d = 2, l' = 4. Copying the selected store at each step writes
    # 2 keys (k, v) per token of history, copying the compressed one 2/d = 1: a step must write less
    # than one key's bytes per token of history (what may grow is a few scalars per compressed block).
    config = small(n_head=1, n_kv_head=1, block_size=128)
    m = mixer(config)
    x = torch.randn(1, 121, 32)
    cos, sin = rope_for(config, 121)

    def one_step(t):  # bytes written by the step after t tokens of history
        cache = KVCache(0, 1, 1, 121, 32, layers=[])
        m(x[:, :t], rope=(cos[:t], sin[:t]), cache=cache)
        cache.advance(t)
        stores = {name: cache.state(0)[name].data_ptr() for name in ("k_slc", "v_slc", "k_cmp", "v_cmp")}
        with Dispatched() as seen:
            m(x[:, t : t + 1], rope=(cos[t : t + 1], sin[t : t + 1]), cache=cache)
        assert stores == {name: cache.state(0)[name].data_ptr() for name in stores}  # written in place
        # No host sync (int(), .item()): a decoding step can queue on an accelerator without waiting.
        assert seen.calls["aten._local_scalar_dense.default"] == 0
        return seen.bytes

    per_token = (one_step(120) - one_step(40)) / 80
    assert per_token < 32 * 4, f"a decoding step writes {per_token:.0f} bytes per token of history"


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
    config = small(
        compress_block=4, compress_stride=2, select_block=4, select_count=2, window=3, local_blocks=1
    )
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


@torch.no_grad()
def test_each_branch_reads_its_own_keys_and_values():
    # The projection's rows: q (H·D), then k, v of compressed, selected, window (Hkv·D each).
    # Perturbing one branch's k, v rows must change that branch and leave the others exactly as
    # they were — shared k, v would change all three, or none.
    config = small()
    H, Hkv, D = config.n_head, config.kv_heads, config.head_dim
    x = torch.randn(2, 30, 32)
    rope = rope_for(config, 30)
    base = mixer(config).branches(x, rope=rope)
    for i, name in enumerate(BRANCHES):
        m = mixer(config)
        first = (H + 2 * i * Hkv) * D
        m.qkv.weight[first : first + 2 * Hkv * D] += torch.randn(2 * Hkv * D, 32)
        out = m.branches(x, rope=rope)
        assert not torch.allclose(out[name], base[name], atol=1e-3), name
        unchanged = {
            "compressed": ["window", "gates"],  # the selection may follow the compressed scores
            "selected": ["compressed", "window", "gates", "blocks", "chosen"],
            "window": ["compressed", "selected", "gates", "blocks", "chosen"],
        }[name]
        for other in unchanged:
            assert torch.equal(out[other], base[other]), (
                f"perturbing the {name} branch's k, v changed {other}"
            )


def test_positions_the_blocks_cannot_honour_are_refused():
    model = GPT(small()).eval()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, max_len=16)
        model(ids, cache=cache)
        with pytest.raises(
            ValueError,
            match="2 contiguous positions starting at cache.length = 8; got "
            r"positions of shape \(2,\) beginning \[3, 4\]",
        ):
            model(ids[:, :2], cache=cache, positions=torch.tensor([3, 4]))
        with pytest.raises(ValueError, match=r"8 contiguous positions \(any first one\)"):
            model(ids, positions=torch.tensor([0, 1, 2, 3, 5, 6, 7, 8]))
        with pytest.raises(ValueError, match="contiguous positions"):
            model.blocks[0].attn(
                torch.randn(1, 4, 32), positions=torch.arange(4)[None]
            )  # (B, T): packed rows
        model(ids[:, :2], cache=cache, positions=torch.tensor([8, 9]))  # what the model itself would pass


def test_an_mtp_depth_made_of_nsa_trains_and_drafts():
    # A sequential MTP depth k runs its block without a cache on positions k, k + 1, ...: a sequence
    # of its own, whose blocks count from its first token (RoPE carries the offset).
    torch.manual_seed(6)
    model = GPT(small(mtp={"depth": 2}))
    ids = torch.randint(0, 97, (2, 25))
    loss = model(ids[:, :-1], ids[:, 1:])[1]
    assert torch.isfinite(loss) and model.mtp.metrics()["mtp/loss"] > 0
    loss.backward()
    assert model.mtp.depths[1].block.attn.compress_k.up.weight.grad.abs().sum() > 0
    result = mtp_acceptance(model.eval(), [[5, 17, 3, 88, 41]], 6)
    assert len(result["tokens"][0]) == 6


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
    with pytest.raises(
        ConfigError,
        match="model.nsa.compress_block = 64 exceeds model.block_size = 48: no "
        "compressed block could ever be complete",
    ):
        GPT(small(compress_block=64))
    with pytest.raises(
        ConfigError,
        match="model.nsa.select_block = 64 exceeds model.block_size = 48: the first "
        "selection block would hold the whole context",
    ):
        GPT(small(select_block=64))
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


def test_the_reference_builds_its_masks_on_the_inputs_device():
    # On the meta device (shapes only) a mask made on the CPU would meet a meta tensor and fail.
    m = NativeSparseAttention(small(), 0).to("meta")
    out = m.reference(torch.empty(2, 13, 32, device="meta"))
    assert {t.device.type for t in out.values()} == {"meta"} and out["selected_blocks"].shape == (2, 2, 13, 4)
