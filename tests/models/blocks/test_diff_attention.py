"""Differential attention (mixer kind "diff") is right.

V1 is proven against Hugging Face's DiffLlamaForCausalLM (random weights, large init, random λ):
logits within 1e-4, greedy decoding with our KV cache equal token for token, and our export loads
back in transformers with the same logits. The "adjacent" head layout equals the official code's
formula (spelled out here) and the "halves" layout after :func:`permute_heads`. V2 has no external
oracle: shapes, causality, cache decoding equal to the parallel forward, packed rows equal to
separate rows, and a few training steps lower the loss. The spelled-out and SDPA paths agree.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import hf_models
import pytest
import torch

from scratchlm.config import ConfigError
from scratchlm.generate.kv_cache import KVCache
from scratchlm.models.blocks.diff_attention import DiffAttention, DiffConfig, lambda_init, permute_heads
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT


def _config(version: int = 1, layout: str = "halves", attention: str = "sdpa", **overrides) -> GPTConfig:
    fields = {
        "vocab_size": 61,
        "n_layer": 2,
        "n_head": 8,
        "n_kv_head": 4,
        "d_model": 64,
        "block_size": 32,
        "position": "rope",
        "norm": "rmsnorm",
        "norm_eps": 1e-6,
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": False,
        "layers": ["diff"],
        "attention": attention,
        "init_std": 0.3,
        "diff": DiffConfig(version=version, layout=layout, lambda_std=0.5),
    }
    return GPTConfig(**{**fields, **overrides})


def _model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def _with_impl(model: GPT, impl: str) -> GPT:
    for block in model.blocks:
        block.attn.impl = impl
    return model


# --- V1 against Hugging Face ------------------------------------------------------------------
def test_lambda_init_is_eq3_with_a_zero_based_layer():
    from transformers.models.diffllama.modeling_diffllama import lambda_init_fn

    assert lambda_init(0) == pytest.approx(0.2)  # l = 1 in the paper: 0.8 - 0.6
    for layer in range(6):
        paper_l = layer + 1
        assert lambda_init(layer) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * (paper_l - 1)), abs=1e-12)
        assert lambda_init(layer) == pytest.approx(lambda_init_fn(layer), abs=1e-12)
    model = _model(_config(n_layer=3))
    assert [b.attn.lambda_init for b in model.blocks] == [lambda_init(i) for i in range(3)]


@pytest.mark.parametrize("heads,kv_heads,tied", [(8, 4, False), (4, 4, True)], ids=["gqa", "mha-tied"])
def test_matches_hf_diffllama(tmp_path, heads, kv_heads, tied):
    from scratchlm.models.hf import export_hf, import_hf

    hf = hf_models.diffllama(heads, kv_heads, tied)  # λ large and different in every layer
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    # logits within 1e-4 after import and after our export (which picks DiffLlama by itself)
    ours, _, _, expected = hf_models.round_trip(hf, tmp_path, x, rtol=0, large=3.0)
    assert ours.config.layer_kinds() == [("diff", "dense")] * 3 and ours.config.diff.layout == "halves"
    lambdas = [b.attn.lambda_full().item() for b in ours.blocks]
    assert max(abs(a - b) for a, b in itertools.pairwise(lambdas)) > 0.05  # λ really differs per layer
    with torch.no_grad():
        manual, _ = _with_impl(import_hf(tmp_path / "hf"), "manual")(x)
    torch.testing.assert_close(manual, expected, atol=1e-4, rtol=0)
    hf_models.assert_greedy_equal(hf, ours, x[:1, :6], 12)

    # A model stored in the official (adjacent) layout exports to the same DiffLlama.
    adjacent_config = dataclasses.replace(
        ours.config, diff=dataclasses.replace(ours.config.diff, layout="adjacent")
    )
    adjacent = GPT(adjacent_config).eval()
    adjacent.load_state_dict(permute_heads(ours.state_dict(), ours.config, "adjacent"))
    export_hf(adjacent, tmp_path / "from-adjacent")
    back = type(hf).from_pretrained(tmp_path / "from-adjacent").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=1e-4, rtol=0)


# --- head layouts -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_layouts_compute_the_same_function_after_the_permutation(version):
    halves = _model(_config(version))
    adjacent = GPT(_config(version, layout="adjacent")).eval()
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = halves(x)
        adjacent.load_state_dict(
            halves.state_dict()
        )  # same tensors read in the other layout: a different model
        assert (adjacent(x)[0] - expected).abs().max() > 1e-2
        permuted = permute_heads(halves.state_dict(), halves.config, "adjacent")
        adjacent.load_state_dict(permuted)
        torch.testing.assert_close(adjacent(x)[0], expected, atol=2e-5, rtol=1e-5)
    back = permute_heads(permuted, adjacent.config, "halves")
    assert all(torch.equal(back[k], v) for k, v in halves.state_dict().items())

    # The documented permutation: adjacent query head 1 is halves' query head n/2 (the partner of head 0).
    D, H, Hkv = 8, 8, 4
    n_query = H if version == 1 else 2 * H
    q_halves = halves.state_dict()["blocks.0.attn.qkv.weight"][: n_query * D]
    q_adjacent = permuted["blocks.0.attn.qkv.weight"][: n_query * D]
    assert torch.equal(q_adjacent[D : 2 * D], q_halves[n_query // 2 * D : (n_query // 2 + 1) * D])
    if version == 1:  # the value's second half of head group 0 is halves' value head n_kv/2
        v_halves = halves.state_dict()["blocks.0.attn.qkv.weight"][(n_query + Hkv) * D :]
        v_adjacent = permuted["blocks.0.attn.qkv.weight"][(n_query + Hkv) * D :]
        assert torch.equal(v_adjacent[D : 2 * D], v_halves[Hkv // 2 * D : (Hkv // 2 + 1) * D])


def test_adjacent_v1_is_the_official_formula():
    """The official code (microsoft/unilm Diff-Transformer, MHA): q viewed as 2h heads of d, k as 2h
    heads, v as h heads of 2d; the maps of heads 2i and 2i+1 subtracted; RMSNorm; ×(1 − λ_init)."""
    config = _config(1, "adjacent", n_head=4, n_kv_head=4, d_model=32, position="none")
    torch.manual_seed(3)
    mixer = DiffAttention(config, layer=2)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.4)
    x = torch.randn(2, 7, 32)
    h, d, B, T = 2, 8, 2, 7  # h differential heads of 2d
    with torch.no_grad():
        q, k, v = mixer.qkv(x).split([32, 32, 32], dim=-1)
        q = q.view(B, T, 2 * h, d).transpose(1, 2)
        k = k.view(B, T, 2 * h, d).transpose(1, 2)
        v = v.view(B, T, h, 2 * d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * d**-0.5 + torch.full((T, T), float("-inf")).triu(1)
        maps = torch.softmax(scores, dim=-1).view(B, h, 2, T, T)
        lam = math.exp(float(mixer.lambda_q1 @ mixer.lambda_k1)) - math.exp(
            float(mixer.lambda_q2 @ mixer.lambda_k2)
        )
        lam += 0.8 - 0.6 * math.exp(-0.3 * 2)
        out = (maps[:, :, 0] - lam * maps[:, :, 1]) @ v
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + config.norm_eps) * (1 - mixer.lambda_init)
        expected = mixer.proj(out.transpose(1, 2).reshape(B, T, 32))
        torch.testing.assert_close(mixer(x), expected, atol=2e-5, rtol=1e-5)


def test_adjacent_v2_is_the_official_formula():
    """The official V2 code (Diff-Transformer-V2/multihead_flashdiffv2.py) with GQA: 2h query heads
    of d, h_kv key/value heads (query head m reads kv head m // (2h / h_kv)), attention outputs of
    heads 2i and 2i+1 subtracted with σ(λ(x)), no norm."""
    config = _config(2, "adjacent", n_head=4, n_kv_head=2, d_model=32, position="none")
    torch.manual_seed(4)
    mixer = DiffAttention(config, layer=0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.4)
    x = torch.randn(2, 7, 32)
    h, h_kv, d, B, T = 4, 2, 8, 2, 7
    with torch.no_grad():
        q, k, v = mixer.qkv(x).split([2 * h * d, h_kv * d, h_kv * d], dim=-1)
        q = q.view(B, T, 2 * h, d).transpose(1, 2)
        k = k.view(B, T, h_kv, d).transpose(1, 2).repeat_interleave(2 * h // h_kv, dim=1)
        v = v.view(B, T, h_kv, d).transpose(1, 2).repeat_interleave(2 * h // h_kv, dim=1)
        scores = q @ k.transpose(-1, -2) * d**-0.5 + torch.full((T, T), float("-inf")).triu(1)
        attn = torch.softmax(scores, dim=-1) @ v  # (B, 2h, T, d)
        lam = torch.sigmoid(mixer.lambda_proj(x)).transpose(1, 2)[..., None]  # (B, h, T, 1)
        out = attn[:, 0::2] - lam * attn[:, 1::2]
        expected = mixer.proj(out.transpose(1, 2).reshape(B, T, h * d))
        torch.testing.assert_close(mixer(x), expected, atol=2e-5, rtol=1e-5)


# --- paths, cache, causality ------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_manual_and_sdpa_agree(version):
    model = _model(_config(version))
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused, _ = model(x)
        manual, _ = _with_impl(model, "manual")(x)
    assert fused.abs().max() > 1.0
    torch.testing.assert_close(manual, fused, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("version", [1, 2])
def test_cached_decoding_equals_the_parallel_forward(version, impl):
    model = _model(_config(version, attention=impl))
    x = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(5))
    cache = KVCache.for_model(model, batch=2)
    assert cache.k.shape == (2, 2, 4, 32, 8)  # the baseline's cache: n_kv_head heads of width D per layer
    with torch.no_grad():
        full, _ = model(x)
        pieces = [model(x[:, :5], cache=cache)[0], model(x[:, 5:9], cache=cache)[0]]  # prefill, then a chunk
        pieces += [model(x[:, t : t + 1], cache=cache)[0] for t in range(9, 14)]  # then one token at a time
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_a_future_token_changes_no_earlier_output(version):
    model = _model(_config(version))
    x = torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(6))
    changed = x.clone()
    changed[0, 9] = (x[0, 9] + 7) % 61
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("version", [1, 2])
def test_packed_rows_equal_separate_rows(version, impl):
    model = _model(_config(version, attention=impl))
    x = torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(7))
    documents = torch.tensor([[0] * 6 + [1] * 10])
    with torch.no_grad():
        packed, _ = model(x, documents=documents)
        first, _ = model(x[:, :6])
        second, _ = model(x[:, 6:])
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), atol=2e-5, rtol=1e-5)


# --- V2 ----------------------------------------------------------------------------------------
def test_v2_shapes_parameters_and_cache_size():
    config = GPTConfig.from_dict(_config(2).to_dict())  # the [model.diff] table round-trips
    assert config.diff == DiffConfig(version=2, layout="halves", lambda_std=0.5)
    model = _model(config)
    attn = model.blocks[0].attn
    H, Hkv, D, C = 8, 4, 8, 64
    assert attn.qkv.weight.shape == ((2 * H + 2 * Hkv) * D, C)  # twice the baseline's queries
    assert attn.lambda_proj.weight.shape == (H, C)  # λ per token and head
    assert attn.proj.weight.shape == (C, H * D)
    assert not hasattr(attn, "lambda_q1")
    baseline = _model(dataclasses.replace(_config(), layers=None, diff=None))
    assert model.kv_cache_bytes_per_token() == baseline.kv_cache_bytes_per_token() == 2 * 2 * 2 * Hkv * D
    x = torch.randint(0, 61, (3, 11))
    assert model(x)[0].shape == (3, 11, 61)
    # Twice the baseline's maps over the context; V1 costs the baseline's (two maps of D, one 2D value).
    assert attn.context_flops(32) == 2 * baseline.blocks[0].attn.n_head * D * 4 * 32
    v1_flops, baseline_flops = _model(_config(1)).flops_per_token(), baseline.flops_per_token()
    assert v1_flops["forward"] - baseline_flops["forward"] == pytest.approx(
        2 * 2 * 4 * D
    )  # only the λ vectors
    # V1 keeps the baseline's parameter count (eq. 1 splits its heads), plus 4·D λ values per layer.
    v1 = _model(_config(1))
    assert v1.parameter_counts()["total"] == baseline.parameter_counts()["total"] + 2 * 4 * D


@pytest.mark.parametrize("version", [1, 2])
def test_a_few_training_steps_lower_the_loss(version):
    model = _model(_config(version, init_std=0.02)).train()
    x = torch.randint(0, 61, (4, 17), generator=torch.Generator().manual_seed(8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(61) - 0.3  # starts near uniform
    assert losses[-1] < losses[0] - 1.5, losses


# --- what it refuses ---------------------------------------------------------------------------
def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="model.diff.version"):
        DiffConfig(version=3)
    with pytest.raises(ConfigError, match="model.diff.layout"):
        DiffConfig(layout="pairs")
    with pytest.raises(ValueError, match="must both be even"):
        GPT(_config(1, n_head=4, n_kv_head=1, d_model=32))
    GPT(_config(2, n_head=4, n_kv_head=1, d_model=32))  # V2 pairs queries only: any GQA works
    with pytest.raises(ValueError, match="'manual' and 'sdpa' paths"):
        GPT(_config(1, attention="tiled"))
    with pytest.raises(ValueError, match="ALiBi"):
        GPT(_config(1, position="alibi"))(torch.zeros(1, 4, dtype=torch.long))

    class Paged:
        paged = True

    with pytest.raises(ValueError, match="paged cache"):
        _model(_config(1)).blocks[0].attn(torch.zeros(1, 3, 64), cache=Paged())
    with pytest.raises(ValueError, match="layout must be"):
        permute_heads({}, _config(1), "pairs")

    from scratchlm.models.hf import export_hf

    with pytest.raises(ValueError, match="V2 has no"):
        export_hf(_model(_config(2)), tmp_path / "v2")
    with pytest.raises(ValueError, match="diffllama needs every layer 'diff'"):
        export_hf(_model(_config(1, layers=["diff", "attention"])), tmp_path / "mixed")
