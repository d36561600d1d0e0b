"""Sliding-window attention (the "sliding" mixer): the mask is Hugging Face's (query i sees keys
i - W < j <= i), every attention path (manual, SDPA, tiled, packed rows, ALiBi) computes the same
function, a window as long as the context is plain causal attention, the receptive field grows
by W - 1 per layer, decoding with the bounded ring-buffer cache equals decoding with a full
cache and the parallel forward (token by token, in chunks, in beam search) while its memory stops
at W - 1 positions, and HF Mistral (every layer sliding) and Ministral (sliding and full layers
alternating) import with equal logits and greedy outputs and export back."""

from __future__ import annotations

import hf_models
import pytest
import torch

from scratchlm.generate import KVCache, SamplingConfig
from scratchlm.generate.generate import beam_search, generate
from scratchlm.models.blocks.attention import Attention, attention_bias
from scratchlm.models.blocks.flash_attention import naive_attention, tiled_attention
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT

GREEDY = SamplingConfig(temperature=0)


def tiny(window: int | None = 4, **kw) -> GPTConfig:
    """A tiny Llama-block model whose layers are sliding with ``window`` ([model.attn] window)."""
    base = {
        "vocab_size": 97,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "d_model": 32,
        "block_size": 32,
        "init_std": 0.2,
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "bias": False,
        "layers": ["sliding"],
        "attn": {"window": window},
    }
    return GPTConfig(**{**base, **kw})


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(**kw)).eval()


def twin(source: GPT, window=..., **kw) -> GPT:
    """The same weights under another config (attention implementation, ``window`` if given, layers)."""
    d = source.config.to_dict()
    attn = d.get("attn", {}) if window is ... else {**d.get("attn", {}), "window": window}
    other = GPT(GPTConfig.from_dict({**d, "attn": attn, **kw})).eval()
    other.load_state_dict(source.state_dict())
    return other


# --- the mask ----------------------------------------------------------------------------------
def test_query_10_with_window_4_sees_keys_7_to_10():
    visible = attention_bias(11, 11, 0, None, "cpu", torch.float32, window=4) == 0
    assert visible[10].nonzero().flatten().tolist() == [7, 8, 9, 10]
    assert visible[2].nonzero().flatten().tolist() == [0, 1, 2]  # near the start: fewer than W keys
    # a decode step (query at position 10, keys 0..10) and keys counted from another origin agree
    assert (attention_bias(1, 11, 10, None, "cpu", torch.float32, window=4) == 0).nonzero()[
        :, 1
    ].tolist() == [7, 8, 9, 10]
    assert (attention_bias(1, 4, 3, None, "cpu", torch.float32, window=4) == 0).all()


def test_mask_is_hugging_faces_rule():
    masking = pytest.importorskip("transformers.masking_utils")
    for window in (1, 3, 4, 9):
        rule = masking.sliding_window_causal_mask_function(window)
        theirs = rule(torch.tensor(0), torch.tensor(0), torch.arange(12)[:, None], torch.arange(12)[None, :])
        ours = attention_bias(12, 12, 0, None, "cpu", torch.float32, window=window) == 0
        assert torch.equal(ours, theirs), window


# --- every path computes the same function ------------------------------------------------------
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_manual_sdpa_and_tiled_agree(position):
    sdpa = model(position=position, layers=["sliding", "attention"])
    x = torch.randint(0, 97, (2, 29))
    with torch.no_grad():
        expected = sdpa(x)[0]
        for impl in ("manual", "tiled"):
            torch.testing.assert_close(twin(sdpa, attention=impl)(x)[0], expected, atol=1e-5, rtol=0)
        # the window matters: full attention everywhere gives other logits
        assert (twin(sdpa, layers=None, window=None)(x)[0] - expected).abs().max() > 1e-2


def test_tiled_kernel_skips_old_tiles_and_equals_the_reference():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    for window in (1, 5, 16, 40):
        torch.testing.assert_close(
            tiled_attention(q, k, v, window=window, block_q=8, block_k=4),
            naive_attention(q, k, v, window=window),
            atol=1e-5,
            rtol=0,
        )
    # decode-shaped: 3 queries at positions 34..36 over 37 keys
    torch.testing.assert_close(
        tiled_attention(q[:, :, -3:], k, v, window=6, block_q=2, block_k=4),
        naive_attention(q[:, :, -3:], k, v, window=6),
        atol=1e-5,
        rtol=0,
    )


def test_window_as_long_as_the_context_is_causal_attention():
    full = model(layers=None, window=None)
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        for impl in ("sdpa", "manual"):
            wide = twin(full, layers=["sliding"], window=32, attention=impl)
            torch.testing.assert_close(wide(x)[0], full(x)[0], atol=1e-5, rtol=0)


def test_receptive_field_grows_by_window_minus_one_per_layer():
    # L layers of window W: the output at position i reads tokens i - L(W - 1) ... i, no earlier.
    for n_layer, window in ((1, 4), (3, 4), (2, 6)):
        m = model(n_layer=n_layer, window=window)
        reach = n_layer * (window - 1)
        x = torch.randint(0, 97, (1, 32))
        with torch.no_grad():
            base = m(x)[0][0, 31]
            for changed, moves in ((31 - reach - 1, False), (31 - reach, True)):
                y = x.clone()
                y[0, changed] = (y[0, changed] + 1) % 97
                assert ((m(y)[0][0, 31] - base).abs().max() > 1e-4) == moves, (n_layer, window, changed)


@pytest.mark.parametrize("position,impl", [("rope", "sdpa"), ("rope", "manual"), ("alibi", "sdpa")])
def test_packed_rows_equal_each_document_alone(position, impl):
    m = model(position=position, attention=impl, layers=["sliding", "attention"])
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 9))
    row = torch.cat([a, b], dim=1)
    documents = torch.tensor([[0] * 13 + [1] * 9])
    with torch.no_grad():
        packed = m(row, documents=documents)[0]
        torch.testing.assert_close(packed[:, :13], m(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[:, 13:], m(b)[0], atol=1e-5, rtol=0)


# --- the bounded cache ----------------------------------------------------------------------
def _decode(m: GPT, ids: torch.Tensor, cache, chunks: list[int]) -> torch.Tensor:
    """Logits of every position, fed to the model in ``chunks`` through ``cache``."""
    out, at = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(m(ids[:, at : at + n], cache=cache)[0])
            at += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "layers,impl,position",
    [
        (["sliding"], "sdpa", "rope"),
        (["sliding", "attention"], "sdpa", "rope"),
        (["sliding"], "manual", "alibi"),
        (["attention", "sliding"], "tiled", "rope"),
    ],
)
def test_ring_buffer_equals_full_cache_equals_parallel(layers, impl, position):
    m = model(layers=layers, attention=impl, position=position)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        parallel = m(ids)[0]
    for chunks in ([1] * 30, [7, 3, 1, 5, 2, 1, 11]):  # token by token; prefill then chunks longer than W
        ring = KVCache.for_model(m, 2)
        full = KVCache(m.config.n_layer, 2, m.config.kv_heads, 32, m.config.head_dim)  # rows for every layer
        torch.testing.assert_close(_decode(m, ids, ring, chunks), parallel, atol=1e-5, rtol=0)
        torch.testing.assert_close(_decode(m, ids, full, chunks), parallel, atol=1e-5, rtol=0)
        sliding = [i for i, (mixer, _) in enumerate(m.config.layer_kinds()) if mixer == "sliding"]
        assert sorted(ring.states) == sliding and full.states == {}
        assert ring.k.shape[0] == m.config.n_layer - len(sliding)  # growing rows only for full layers


def test_ring_memory_stops_at_window_minus_one_positions():
    m = model(n_layer=2, window=5)
    ring = KVCache.for_model(m, 3)
    assert ring.k.numel() == 0  # every layer sliding: no growing rows at all
    sizes = []
    with torch.no_grad():
        for token in torch.randint(0, 97, (3, 20)).unbind(1):
            m(token[:, None], cache=ring)
            sizes.append(ring.bytes)
    attn = m.blocks[0].attn
    assert attn.max_cache_positions() == 4 and attn.cache_values_per_token() == 2 * 2 * 8
    bound = 2 * 3 * 4 * attn.cache_values_per_token() * 4  # layers x batch x (W - 1) x values x fp32 bytes
    assert sizes[3:] == [bound] * 17  # full after W - 1 tokens, then constant
    assert model(layers=None, window=None).blocks[0].attn.max_cache_positions() is None


def test_window_of_one_sees_only_itself_and_keeps_nothing():
    m = model(window=1)
    ids = torch.randint(0, 97, (1, 12))
    ring = KVCache.for_model(m, 1)
    with torch.no_grad():
        torch.testing.assert_close(_decode(m, ids, ring, [5, 1, 6]), m(ids)[0], atol=1e-5, rtol=0)
    assert ring.bytes == 0


def test_generation_and_beam_search_with_the_ring_equal_no_cache():
    m = model(layers=["sliding", "attention"], block_size=24)
    prompt = torch.randint(0, 97, (2, 6)).tolist()
    # 30 new tokens on a 24-position model: the context window slides too (a fresh prefill)
    assert generate(m, prompt, 30, GREEDY, use_cache=True) == generate(m, prompt, 30, GREEDY, use_cache=False)
    # beam search reorders the ring buffers (index_select on the batch) at every step
    cached = beam_search(m, prompt[0], 12, beam_width=3, use_cache=True)
    uncached = beam_search(m, prompt[0], 12, beam_width=3, use_cache=False)
    assert [ids for ids, _ in cached] == [ids for ids, _ in uncached]
    assert [score for _, score in cached] == pytest.approx([score for _, score in uncached], abs=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match="at least 1 key"):
        Attention(tiny(), window=0)

    class Paged:
        paged = True

    with pytest.raises(ValueError, match="paged cache"):
        model().blocks[0].attn(torch.zeros(1, 1, 32), cache=Paged())


# --- Hugging Face: Mistral (every layer sliding) and Ministral (sliding / full alternating) ------------------
try:
    import transformers
except ImportError:  # only the tests marked needs_transformers skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")


@pytest.mark.parametrize("kind,layers", [("mistral", ["sliding"]), ("ministral", ["sliding", "attention"])])
@needs_transformers
def test_hf_import_logits_greedy_and_export(tmp_path, kind, layers):
    hf = hf_models.mistral(kind)
    # logits equal after import and after our export (the default architecture follows the layers)
    ours, back, x, _ = hf_models.round_trip(hf, tmp_path, rtol=0)
    assert ours.config.layers == layers and ours.config.attn.window == 4
    assert back.config.sliding_window == 4
    # greedy decoding with the ring buffer = HF generate (20 new tokens, 5 times the window)
    hf_models.assert_greedy_equal(hf, ours, x[:1, :6], 20)


def test_export_refuses_what_the_target_cannot_express(tmp_path):
    from scratchlm.models.hf import export_hf

    alternating = model(layers=["sliding", "attention"])
    with pytest.raises(ValueError, match="exports as 'ministral'"):
        export_hf(alternating, tmp_path / "a", "mistral")
    with pytest.raises(ValueError, match="llama needs every layer 'attention' with a dense MLP"):
        export_hf(alternating, tmp_path / "b", "llama")
