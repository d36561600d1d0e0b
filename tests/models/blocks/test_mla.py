"""Multi-head latent attention (scratchlm/models/blocks/mla.py) and DeepSeek-V2/V3 interchange
(scratchlm/models/hf/deepseek.py).

Proves: the cache holds only the latent and the shared RoPE key (kv_lora_rank + rope dim values
per token: 576 x 61 layers for DeepSeek-V3 at full shape, built on the meta device); the readable
decode path (rebuild k, v) and the weight-absorbed one (attend over the latent) both equal the
parallel forward within 1e-5, through multi-token chunks, single-token steps and a beam reorder;
with absorption on, a prefill from an empty cache rebuilds k, v and decoding absorbs (the cheaper
path by multiply-adds), and a decoding step attends with no mask at all;
packed rows and the spelled-out attention agree with the fused one; and randomly initialised
transformers DeepseekV2/V3ForCausalLM models (dense, low-rank query, MoE with V2's group-limited
softmax and V3's sigmoid router with a random correction bias) give the same logits (<= 1e-4)
and the same greedy tokens with our latent cache, and load back in transformers after export; a
V2 config with an unknown ``topk_method`` is refused and one with ``norm_topk_prob`` warned about.
"""

from __future__ import annotations

import hf_models
import pytest
import torch

from scratchlm.config import ConfigError
from scratchlm.generate.generate import generate
from scratchlm.generate.kv_cache import KVCache
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models.blocks.mla import MLA, MLAConfig, mla_rope
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT


def _config(q_lora_rank=None, **overrides) -> GPTConfig:
    mla = MLAConfig(
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12
    )
    base = {
        "vocab_size": 61,
        "n_layer": 2,
        "n_head": 4,
        "d_model": 32,
        "block_size": 32,
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": False,
        "layers": ["mla"],
        "mla": mla,
        "init_std": 0.3,
    }
    return GPTConfig(**{**base, **overrides})


def test_config_is_checked():
    with pytest.raises(ConfigError, match="qk_rope_head_dim = 7: must be even"):
        MLAConfig(qk_rope_head_dim=7)
    with pytest.raises(ConfigError, match="model.mla.kv_lora_rank"):
        MLAConfig(kv_lora_rank=0)
    assert (
        GPTConfig.from_dict(_config(24).to_dict()).mla == _config(24).mla
    )  # a [model.mla] table round-trips


def test_the_cache_holds_only_the_latent():
    torch.manual_seed(0)
    model = GPT(_config(24)).eval()
    mla = model.blocks[0].attn
    assert isinstance(mla, MLA) and not MLA.kv_cache
    assert mla.cache_values_per_token() == 16 + 8
    assert model.kv_cache_bytes_per_token(bytes_per_value=2) == 2 * 2 * (16 + 8)
    cache = KVCache.for_model(model, batch=3, max_len=10)
    assert cache.k.shape[0] == 0  # no per-head k, v rows for MLA layers
    with torch.no_grad():
        model(torch.randint(0, 61, (3, 7)), cache=cache)
    for layer in range(2):
        state = cache.state(layer)
        assert set(state) == {"latent", "k_rope"}
        assert state["latent"].shape == (3, 10, 16) and state["k_rope"].shape == (3, 10, 8)
    assert cache.bytes == 2 * 3 * 10 * (16 + 8) * 4  # two layers, float32: nothing else is kept


def test_deepseek_v3_shape_on_meta_device():
    """DeepSeek-V3 at published shape (no memory): 576 cached values per token in each of 61 layers."""
    from scratchlm.models.blocks.moe import MoEConfig

    config = GPTConfig(
        vocab_size=129280,
        n_layer=61,
        n_head=128,
        d_model=7168,
        d_ff=18432,
        block_size=4096,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        layers=["mla"] * 3 + ["mla+moe"] * 58,
        mla=MLAConfig(
            q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
        ),
        moe=MoEConfig(
            n_experts=256,
            top_k=8,
            d_expert=2048,
            n_shared=1,
            router="sigmoid",
            n_groups=8,
            topk_groups=4,
            group_score="top2",
            routed_scale=2.5,
            balance="bias",
        ),
    )
    with torch.device("meta"):
        model = GPT(config)
    assert model.kv_cache_bytes_per_token(bytes_per_value=1) == 576 * 61
    attention = sum(p.numel() for p in model.blocks[0].attn.parameters())
    # W_DQ, q norm, W_UQ+W_QR, W_DKV+W_KR, kv norm, W_UK+W_UV, W_O
    assert (
        attention
        == 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168
    )


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["plain-query", "low-rank-query"])
@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_decoding_with_the_latent_cache_equals_the_full_forward(q_lora_rank, absorb):
    torch.manual_seed(1)
    config = _config(q_lora_rank)
    mla = MLA(config, 0).eval()
    mla.absorb = absorb
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        full = mla(x)
        cache = KVCache(0, 2, 1, 13, 1)
        pieces = []
        for start, end in [
            (0, 5),
            (5, 9),
            *[(t, t + 1) for t in range(9, 13)],
        ]:  # prefill, a chunk, then steps
            pieces.append(mla(x[:, start:end], cache=cache))
            cache.advance(end - start)
    assert full.abs().max() > 0.5
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_absorbed_and_expanded_paths_agree_and_beam_reorder_keeps_them():
    torch.manual_seed(2)
    model = GPT(_config(24)).eval()
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full, _ = model(ids)
        swapped, _ = model(ids.flip(0))
        for absorb in (False, True):
            for block in model.blocks:
                block.attn.absorb = absorb
            cache = KVCache.for_model(model, batch=2, max_len=12)
            model(ids[:, :8], cache=cache)
            cache.reorder(torch.tensor([1, 0]))  # beam search: rows swap, their latents with them
            steps = [model(ids.flip(0)[:, t : t + 1], cache=cache)[0] for t in range(8, 12)]
            torch.testing.assert_close(torch.cat(steps, dim=1), swapped[:, 8:], atol=1e-4, rtol=1e-5)
    assert full.abs().max() > 1.0
    greedy = SamplingConfig(temperature=0)
    with_cache = generate(model, [3, 1, 4, 1, 5], 20, greedy, use_cache=True)
    assert with_cache == generate(model, [3, 1, 4, 1, 5], 20, greedy, use_cache=False)


def test_decoding_absorbs_a_prefill_rebuilds_and_a_step_builds_no_mask(monkeypatch):
    torch.manual_seed(5)
    model = GPT(_config(24)).eval()
    ids = torch.randint(0, 61, (1, 11))
    calls = []

    def spy_on(name):
        original = getattr(MLA, name)

        def spy(self, *args):
            calls.append((name, args[0].shape[2], args[4]))  # the path, the new tokens T, the mask
            return original(self, *args)

        monkeypatch.setattr(MLA, name, spy)

    spy_on("_attend_absorbed")
    spy_on("_attend_expanded")
    for absorb in (True, False):
        calls.clear()
        for block in model.blocks:
            block.attn.absorb = absorb
        cache = KVCache.for_model(model, batch=1, max_len=11)
        with torch.no_grad():
            for start, end in [(0, 8), (8, 9), (9, 11)]:  # a prefill, a step, a chunk of 2
                model(ids[:, start:end], cache=cache)
        paths = [(path, T) for path, T, _ in calls]
        chosen = "_attend_absorbed" if absorb else "_attend_expanded"
        assert paths == [("_attend_expanded", 8)] * 2 + [(chosen, 1)] * 2 + [(chosen, 2)] * 2
        assert all(mask is None for _, _, mask in calls[:4])  # from 0: causal; one new token: sees every key
        assert all(torch.is_tensor(mask) for _, _, mask in calls[4:])  # a chunk after cached tokens
    with torch.device("meta"):  # DeepSeek-V3's shapes: absorbing pays up to ~164 new tokens over 4096
        v3 = MLA(
            _config(
                None,
                n_head=128,
                d_model=7168,
                mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
            ),
            0,
        )
    assert [v3.absorb_pays(T, 4096) for T in (1, 160, 170, 4096)] == [True, True, False, False]


def test_absorbed_and_expanded_attention_agree_on_a_causal_prefill_too():
    torch.manual_seed(6)
    mla = MLA(_config(24), 0).eval()
    x = torch.randn(2, 9, 32)
    cos, sin = mla_rope(torch.arange(9), mla.d_rope, mla.theta)
    with torch.no_grad():
        q_nope, q_rope = mla._queries(x, cos, sin)
        latent, k_rope = mla._latents(x, cos, sin)
        expanded = mla._attend_expanded(q_nope, q_rope, latent, k_rope, None, True)
        absorbed = mla._attend_absorbed(q_nope, q_rope, latent, k_rope, None, True)
    assert expanded.abs().max() > 0.1
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_manual_attention_and_packed_rows_agree_with_sdpa():
    torch.manual_seed(3)
    model = GPT(_config(None)).eval()
    manual = GPT(_config(None, attention="manual")).eval()
    manual.load_state_dict(model.state_dict())
    a, b = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 9))
    packed = torch.cat([a, b], dim=1)
    documents = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        alone = torch.cat([model(a)[0], model(b)[0]], dim=1)  # each document on its own, from position 0
        for m in (model, manual):
            torch.testing.assert_close(m(packed, documents=documents)[0], alone, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(manual(packed)[0], model(packed)[0], atol=1e-4, rtol=1e-5)


def test_it_trains_and_refuses_what_it_does_not_do():
    torch.manual_seed(4)
    model = GPT(_config(24))
    ids = torch.randint(0, 61, (2, 10))
    _, loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".attn." in n
    )
    with pytest.raises(ValueError, match="ALiBi|alibi"):
        GPT(_config(None, position="alibi"))(ids)


# --- DeepSeek-V2 / V3 against transformers -------------------------------------------------------
try:
    import transformers
except ImportError:  # only the tests marked needs_transformers skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")


@pytest.mark.parametrize("version", [2, 3], ids=["v2", "v3"])
@pytest.mark.parametrize(
    "dense_layers,q_lora_rank",
    [(3, None), (3, 24), (1, 24), (0, None)],
    ids=["dense-plain-q", "dense-lowrank-q", "first1dense-moe", "all-moe"],
)
@needs_transformers
def test_deepseek_import_matches_transformers_and_exports_back(tmp_path, version, dense_layers, q_lora_rank):
    hf = hf_models.deepseek(version, dense_layers, q_lora_rank)
    # exported as the default architecture: V3 for a sigmoid router, else V2
    ours, _, x, _ = hf_models.round_trip(hf, tmp_path)
    expected_layers = {3: ["mla"], 1: ["mla", "mla+moe", "mla+moe"], 0: ["mla+moe"]}[dense_layers]
    assert ours.config.layers == expected_layers
    hf_models.assert_greedy_equal(hf, ours, x[:1, :6], 12)


@needs_transformers
def test_deepseek_v2_import_refuses_unknown_topk_methods_and_warns_on_norm_topk_prob():
    from scratchlm.models.hf import config_from_hf

    hf = hf_models.deepseek(2, 1, None).config.to_dict()
    with pytest.raises(ValueError, match="topk_method 'noaux_tc' is not supported"):
        config_from_hf({**hf, "topk_method": "noaux_tc"})
    with pytest.warns(UserWarning, match="norm_topk_prob = true is ignored, as transformers ignores it"):
        moe = config_from_hf({**hf, "norm_topk_prob": True}).moe
    assert (
        not moe.normalize and moe.routed_scale == 2.5
    )  # transformers' V2: neither renormalised nor unscaled
    assert config_from_hf({**hf, "topk_method": "greedy"}).moe.n_groups == 1  # greedy ignores the groups


@needs_transformers
def test_deepseek_import_skips_mtp_layers_and_refuses_yarn(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from scratchlm.models.hf import config_from_hf, import_hf

    hf = hf_models.deepseek(3, 1, 24)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.3.enorm.weight"] = torch.ones(32)  # an MTP module's tensors, after the last layer
    tensors["model.layers.3.eh_proj.weight"] = torch.ones(32, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="skipped 2 tensors of layers >= 3"):
        model = import_hf(tmp_path)
    assert model.config.n_layer == 3

    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    config_from_hf(config)  # an MTP entry in the config is fine
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 40, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="YaRN"):
        config_from_hf(config)
