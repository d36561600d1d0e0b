"""Gemma-2 (``Gemma2ForCausalLM``): sliding / full layers alternating on Gemma's blocks.

Proves that a Hugging Face Gemma-2 built from a config (4 layers, window 4 < 24 positions,
head_dim 24 != d_model / n_head = 16, query_pre_attn_scalar 20 != head_dim, both soft-caps on,
norm weights randomised) imports with logits equal within 1e-4, decodes greedily through our
ring-buffer cache exactly as ``generate`` does over 5x the window, and exports back to a folder
``transformers`` loads with the same logits; that every Gemma switch ([model.attn]'s head_dim,
scale and softcap; final_softcap, sandwich_norm, embed_scale, the "geglu" MLP) changes the logits when
flipped, so none is silently ignored; that soft-capped attention computes the same function on
every path (sdpa falls back to manual, packed rows, the cache); that configs without the switches
serialise exactly as before; and that what cannot be expressed is refused with a clear message.
"""

from __future__ import annotations

import hf_models
import pytest
import torch

from scratchlm.config import ConfigError
from scratchlm.generate import KVCache
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.presets import preset

SWITCHES = ("attn", "final_softcap", "sandwich_norm", "embed_scale")  # left out of a plain config's dict
ATTN = {"window": 4, "head_dim": 12, "scale": 0.3, "softcap": 8.0}  # gemma_tiny's [model.attn]


def gemma_tiny(attn: dict | None = None, **kw) -> GPTConfig:
    """The tiny Gemma config; ``attn`` updates its [model.attn] table key by key."""
    base = {
        "vocab_size": 97,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "d_model": 32,
        "block_size": 32,
        "init_std": 0.3,
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "geglu",
        "bias": False,
        "tie_embeddings": False,
        "layers": ["sliding", "attention"],
        "attn": {**ATTN, **(attn or {})},
        "final_softcap": 5.0,
        "sandwich_norm": True,
        "embed_scale": True,
    }
    return GPTConfig(**{**base, **kw})


def gemma_model(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(gemma_tiny(**kw)).eval()
    with torch.no_grad():  # norms away from 1, so a norm that is skipped shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5)
    return m


def twin(source: GPT, attn: dict | None = None, **kw) -> GPT:
    """The same weights under another config (``attn`` updates [model.attn] key by key); tensors
    the other config lacks are dropped."""
    d = source.config.to_dict()
    other = GPT(GPTConfig.from_dict({**d, "attn": {**d.get("attn", {}), **(attn or {})}, **kw})).eval()
    other.load_state_dict(source.state_dict(), strict=False)
    return other


# --- every switch is read ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "flip",
    [
        {"attn": {"scale": None}},
        {"attn": {"softcap": None}},
        {"final_softcap": None},
        {"sandwich_norm": None},
        {"embed_scale": None},
        {"mlp": "swiglu"},
    ],
)
def test_each_switch_changes_the_logits(flip):
    m = gemma_model()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert (twin(m, **flip)(x)[0] - m(x)[0]).abs().max() > 1e-2


def test_head_width_is_its_own_field():
    m = gemma_model()
    attn = m.blocks[0].attn
    assert m.config.head_dim == 12 and attn.head_dim == 12  # not d_model / n_head = 8
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 12, 32) and attn.proj.weight.shape == (32, 4 * 12)
    assert m.rope_cos.shape[-1] == 12 and KVCache.for_model(m, 1).k.shape[-1] == 12
    assert attn.cache_values_per_token() == 2 * 2 * 12
    # context FLOPs use the heads' own width: 4·H·D per key, not 4·d_model
    from scratchlm.models.gpt import context_flops

    assert context_flops(m.blocks[1].attn, 16) == 4 * 4 * 12 * 16
    assert context_flops(GPT(gemma_tiny(attn={"head_dim": None})).blocks[1].attn, 16) == 4 * 4 * 8 * 16
    # d_model need not divide by n_head once the head width is given
    assert GPTConfig(d_model=30, n_head=4, attn={"head_dim": 8}, position="rope").head_dim == 8


def test_softcap_bounds_the_logits():
    m = gemma_model(final_softcap=0.5)
    with torch.no_grad():
        logits = m(torch.randint(0, 97, (1, 16)))[0]
    assert logits.abs().max() <= 0.5 and (logits.abs() > 0.25).any()  # within the cap, not all squashed


# --- every path computes the same function ---------------------------------------------------------
def test_sdpa_falls_back_to_manual_and_tiled_takes_the_scale():
    m = gemma_model()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(twin(m, attention="manual")(x)[0], m(x)[0], atol=1e-5, rtol=0)
        # without the cap, sdpa (scale=...) and tiled (q pre-scaled) agree with manual
        uncapped = twin(m, attn={"softcap": None}, attention="manual")
        for impl in ("sdpa", "tiled"):
            torch.testing.assert_close(
                twin(uncapped, attention=impl)(x)[0], uncapped(x)[0], atol=1e-5, rtol=0
            )


def test_packed_rows_equal_each_document_alone():
    m = gemma_model()
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 9))
    documents = torch.tensor([[0] * 13 + [1] * 9])
    with torch.no_grad():
        packed = m(torch.cat([a, b], dim=1), documents=documents)[0]
        torch.testing.assert_close(packed[:, :13], m(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[:, 13:], m(b)[0], atol=1e-5, rtol=0)


def test_ring_buffer_cache_equals_parallel():
    m = gemma_model()
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        parallel = m(ids)[0]
        cache, out, at = KVCache.for_model(m, 2), [], 0
        for n in (7, 3, 1, 5, 2, 1, 11):  # prefill, then chunks shorter and longer than the window
            out.append(m(ids[:, at : at + n], cache=cache)[0])
            at += n
    torch.testing.assert_close(torch.cat(out, dim=1), parallel, atol=1e-5, rtol=0)


# --- serialisation and refusals -------------------------------------------------------------------
def test_configs_without_the_switches_serialise_as_before():
    for config in (GPTConfig(), preset("llama-tiny"), preset("gpt2")):
        d = config.to_dict()
        assert not set(SWITCHES) & set(d)
        assert GPTConfig.from_dict(d) == config
    d = gemma_tiny().to_dict()
    assert {k: d[k] for k in SWITCHES} == {
        "attn": {**ATTN, "qkv_bias": None, "qk_norm": None},
        "final_softcap": 5.0,
        "sandwich_norm": True,
        "embed_scale": True,
    }
    assert GPTConfig.from_dict(d) == gemma_tiny()
    # a plain model's tensors are unchanged: no post norms appear
    assert not any("post_norm" in k for k in GPT(GPTConfig(n_layer=1)).state_dict())


def test_refusals(tmp_path):
    from scratchlm.models.hf import export_hf

    with pytest.raises(ConfigError, match="model.attn.softcap needs every score"):
        gemma_tiny(attention="tiled")
    with pytest.raises(ConfigError, match="apply to 'attention' and 'sliding' layers only"):
        gemma_tiny(layers=["diff"], mlp="swiglu", attn={"window": None})
    with pytest.raises(ConfigError, match="needs model.prenorm"):
        gemma_tiny(prenorm=False)
    with pytest.raises(ConfigError, match=r"model.attn.softcap = 0.0: must be > 0"):
        gemma_tiny(attn={"softcap": 0.0})

    class Paged:
        paged = True

    with pytest.raises(ValueError, match="paged cache"):
        full = gemma_model(layers=["attention"], attn={"window": None})
        full.blocks[0].attn(torch.zeros(1, 1, 32), cache=Paged())
    # Llama blocks with a Gemma switch: the Llama format has no field for it, so no silent export
    llama_capped = GPT(
        GPTConfig(n_layer=1, position="rope", norm="rmsnorm", mlp="swiglu", bias=False, attn={"softcap": 5.0})
    )
    with pytest.raises(ValueError, match=r"model.attn.softcap = 5.0 \(llama cannot express it"):
        export_hf(llama_capped, tmp_path / "a", "llama")
    with pytest.raises(ValueError, match="integer query_pre_attn_scalar"):
        export_hf(gemma_model(), tmp_path / "b")  # scale 0.3 = 1/sqrt(11.1)
    with pytest.raises(ValueError, match="Gemma-2 export needs"):
        export_hf(gemma_model(mlp="swiglu", attn={"scale": 0.25}), tmp_path / "c", "gemma2")


# --- Hugging Face -------------------------------------------------------------------------------------
try:
    import transformers
except ImportError:  # only the tests marked needs_transformers skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")


@pytest.mark.parametrize("tie", [False, True])
@needs_transformers
def test_hf_import_logits_greedy_and_export(tmp_path, tie):
    hf = hf_models.gemma2(tie)  # norm weights randomised: HF's (1 + w) norms start at w = 0
    # logits within 1e-4 after import, and after our export (the Gemma switches pick the architecture)
    ours, back, x, expected = hf_models.round_trip(hf, tmp_path, rtol=0)
    c = ours.config
    assert (c.layers, c.mlp, c.tie_embeddings) == (["sliding", "attention"], "geglu", tie)
    assert (c.attn.window, c.attn.head_dim, c.attn.scale, c.attn.softcap) == (4, 24, 20**-0.5, 10.0)
    assert (c.final_softcap, c.sandwich_norm, c.embed_scale) == (5.0, True, True)
    assert (
        expected.abs().max() > 4.0 and (expected.abs() > 4.75).float().mean() < 0.05
    )  # large, mostly below the cap
    if not tie:  # (tied, an embedding scaled by 8 makes greedy repeat its input token: a weak check)
        assert len(set(hf_models.assert_greedy_equal(hf, ours, x[:1, :6], 20))) > 5

    assert back.config.query_pre_attn_scalar == 20 and back.config.layer_types == hf.config.layer_types
    for name, p in hf.named_parameters():  # the fold and unfold of the norms round-trip
        torch.testing.assert_close(back.get_parameter(name), p, atol=1e-6, rtol=0)


@needs_transformers
def test_hf_config_refusals():
    from scratchlm.models.hf import config_from_hf

    base = hf_models.gemma2(False).config.to_dict()
    with pytest.raises(ValueError, match="hidden_activation 'gelu' is not supported"):
        config_from_hf({**base, "hidden_activation": "gelu"})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        config_from_hf({**base, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types must name"):
        config_from_hf({**base, "layer_types": ["chunked_attention"] * 4})
    # a head width that matches d_model / n_head and a scalar equal to it need no switch
    plain = config_from_hf({**base, "head_dim": 16, "query_pre_attn_scalar": 16})
    assert plain.attn.head_dim is None and plain.attn.scale is None
    caps_off = config_from_hf({**base, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert caps_off.attn.softcap is None and caps_off.final_softcap is None


def test_the_engine_serves_a_model_with_a_score_scale_and_refuses_soft_capping_when_built():
    from scratchlm.generate import SamplingConfig, generate
    from scratchlm.serve import LLM, SamplingParams

    torch.manual_seed(0)
    model = gemma_model(layers=["attention"], attn={"window": None, "softcap": None, "scale": 1.0}).eval()
    prompts = [[1, 5, 9, 2], [3, 3, 7, 11, 13, 2, 4]]
    outs = LLM(model, block_size=4).generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    for prompt, out in zip(prompts, outs):
        expected = generate(model, prompt, 8, SamplingConfig(temperature=0))[0]
        assert out.outputs[0].token_ids == expected
    with pytest.raises(ValueError, match="cannot soft-cap"):
        LLM(gemma_model(layers=["attention"], attn={"window": None}), block_size=4)


def test_the_training_loss_is_computed_on_the_capped_logits():
    torch.manual_seed(0)
    model = gemma_model(final_softcap=0.5).eval()
    x = torch.randint(0, 97, (2, 12))
    logits, loss = model(x, x)
    assert logits.abs().max() <= 0.5
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.view(-1, 97), x.view(-1)))
