"""The Transformer: readable and fused attention agree; the KV cache changes nothing but speed."""

from __future__ import annotations

import pytest
import torch

from scratchlm.generate import KVCache, SamplingConfig, generate
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.presets import preset

VARIANTS = [
    dict(position=p, n_kv_head=kv, prenorm=pre, mlp=mlp, norm=norm)
    for p, kv, pre, mlp, norm in [
        ("learned", None, True, "gelu", "layernorm"),
        ("sinusoidal", 2, True, "gelu_tanh", "rmsnorm"),
        ("rope", 2, True, "swiglu", "rmsnorm"),
        ("rope", 1, False, "relu2", "layernorm"),
        ("alibi", None, True, "swiglu", "rmsnorm"),
        ("alibi", 1, True, "gelu", "layernorm"),
        ("none", 2, False, "gelu", "rmsnorm"),
    ]
]


def tiny(**kw) -> GPTConfig:
    return GPTConfig(
        **{**dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=24, init_std=0.2), **kw}
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_sdpa_equals_manual_attention(variant):
    torch.manual_seed(0)
    fused = GPT(tiny(**variant)).eval()
    manual = GPT(tiny(**variant, attention="manual")).eval()
    manual.load_state_dict(fused.state_dict())
    x = torch.randint(0, 97, (3, 24))
    torch.testing.assert_close(fused(x)[0], manual(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_cached_logits_equal_full_forward(variant, attention):
    torch.manual_seed(1)
    model = GPT(tiny(**variant, attention=attention)).eval()
    x = torch.randint(0, 97, (2, 20))
    full, _ = model(x)
    cache = KVCache.for_model(model, 2)
    parts = [model(x[:, :7], cache=cache)[0]]  # prefill
    parts += [model(x[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]  # decode one by one
    parts += [model(x[:, 12:], cache=cache)[0]]  # a chunk after the cache: masked by offset
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_greedy_with_and_without_cache_is_identical(position):
    torch.manual_seed(2)
    model = GPT(tiny(position=position, n_kv_head=2, init_std=0.5))
    greedy = SamplingConfig(temperature=0)
    # 60 new tokens with a 24-token context: the window slides, and both paths must agree.
    with_cache = generate(model, [1, 2, 3], 60, greedy, use_cache=True)
    without = generate(model, [1, 2, 3], 60, greedy, use_cache=False)
    assert with_cache == without
    sampled = [
        generate(model, [[1, 2], [3, 4]], 40, SamplingConfig(temperature=1.0), use_cache=c, seed=5)
        for c in (True, False)
    ]
    assert sampled[0] == sampled[1]


def test_kv_cache_bytes_mha_gqa_mqa():
    sizes = {kv: GPT(tiny(n_kv_head=kv)).kv_cache_bytes_per_token(2) for kv in (4, 2, 1)}
    assert sizes == {4: 2 * 2 * 4 * 8 * 2, 2: 2 * 2 * 2 * 8 * 2, 1: 2 * 2 * 1 * 8 * 2}
    cache = KVCache.for_model(GPT(tiny(n_kv_head=1)), batch=1)
    assert cache.bytes == 24 * GPT(tiny(n_kv_head=1)).kv_cache_bytes_per_token(4)


def test_presets_and_accounting():
    with torch.device("meta"):
        gpt2 = GPT(preset("gpt2"))
        llama = GPT(preset("llama-tiny"))
    assert gpt2.parameter_counts()["total"] == 124_439_808  # GPT-2 small, as published
    assert gpt2.lm_head.weight is gpt2.tok_emb.weight
    assert llama.parameter_counts()["lm_head"] == 32000 * 512  # untied
    assert llama.config.kv_heads == 2 and llama.config.ff_width == 1408
    flops = gpt2.flops_per_token()
    assert flops["train"] == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match=r"model.position = .* must be one of"):
        GPTConfig(position="xpos")
    with pytest.raises(ValueError, match="exceeds the context length"):
        GPT(tiny())(torch.zeros(1, 25, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = GPT(tiny(position="rope", n_kv_head=2))
    x = torch.randint(0, 97, (2, 24))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(x, x)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_weight_decay_only_on_matrices():
    from scratchlm.train.optim import build_optimizers
    from scratchlm.train.trainer import TrainConfig

    model = GPT(tiny(bias=True))
    (adamw,) = build_optimizers(model, TrainConfig(optimizer="adamw", weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2), name
    adamw_part, muon = build_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.tok_emb.weight) not in muon_params and id(model.blocks[0].attn.qkv.weight) in muon_params
