"""The selective SSM mixer (Mamba) and the Mamba / Jamba models: the chunked scan equals the
sequential reference (forward and gradients, within 1e-5); decoding with the recurrent state
equals the parallel forward; the mixer is causal and refuses what it cannot do; and randomly
initialised Hugging Face ``MambaForCausalLM`` / ``JambaForCausalLM`` models (their pure-PyTorch
path) give the same logits and the same greedy tokens after import, and our exports load back."""

from __future__ import annotations

import hf_models
import pytest
import torch

from scratchlm.config import ConfigError
from scratchlm.generate.generate import beam_search
from scratchlm.generate.kv_cache import KVCache
from scratchlm.models.blocks.mamba import MambaConfig, selective_scan_chunked, selective_scan_sequential
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT


def _model(layers=("mamba+none",), n_layer=2, seed=0, **mamba) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=97,
        n_layer=n_layer,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        d_ff=48,
        block_size=64,
        position="none",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        layers=list(layers),
        mamba=MambaConfig(d_state=8, chunk=8, **mamba),
        init_std=0.2,
    )
    return GPT(config).eval()


def _scan_inputs(batch=2, T=37, D=12, N=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, D, generator=g, dtype=dtype)
    dt = torch.rand(batch, T, D, generator=g, dtype=dtype) * 2  # large steps: strong decays are exercised
    A = -torch.exp(torch.randn(D, N, generator=g, dtype=dtype))
    B, C = (
        torch.randn(batch, T, N, generator=g, dtype=dtype),
        torch.randn(batch, T, N, generator=g, dtype=dtype),
    )
    state = torch.randn(batch, D, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, state


# --- the scan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_scan_equals_sequential_forward_and_gradients(chunk):
    inputs = [t.requires_grad_() for t in _scan_inputs()]
    weights = torch.randn(2, 37, 12)

    def run(scan, **kw):
        y, h = scan(*inputs, **kw)
        loss = (y * weights).sum() + h.square().sum()
        return [y, h, *torch.autograd.grad(loss, inputs)]

    for ref, fast in zip(run(selective_scan_sequential), run(selective_scan_chunked, chunk=chunk)):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_scan_matches_the_recurrence_written_out():
    """y_t = C_t·h_t with h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, checked entry by entry in float64."""
    x, dt, A, B, C, state = _scan_inputs(batch=1, T=3, D=2, N=2, dtype=torch.float64)
    y, h = selective_scan_chunked(x, dt, A, B, C, state, chunk=2)
    for d in range(2):
        hd = state[0, d].clone()
        for t in range(3):
            hd = torch.exp(dt[0, t, d] * A[d]) * hd + dt[0, t, d] * B[0, t] * x[0, t, d]
            assert abs(float((C[0, t] * hd).sum()) - float(y[0, t, d])) < 1e-12
        torch.testing.assert_close(h[0, d], hd)


def test_model_sequential_and_chunked_scans_agree():
    ids = torch.randint(0, 97, (2, 29))
    outputs = []
    for scan in ("sequential", "chunked"):
        model = _model(("mamba", "attention+none"), scan=scan).train()
        logits, _ = model(ids)
        logits.square().mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (fast, fast_grads) = outputs
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# --- the model: layers, decoding, causality ------------------------------------------------------------
def test_config_defaults_and_validation():
    model = _model()
    mixer = model.blocks[0].mamba
    assert mixer.d_inner == 64 and mixer.dt_rank == 2  # expand 2; ceil(32 / 16)
    assert (
        model.blocks[0].mlp is None and model.blocks[0].norm2 is None
    )  # "mamba+none": norm → mixer → residual
    assert mixer.cache_values_per_token() == 0 and model.kv_cache_bytes_per_token() == 0
    assert mixer.state_values_per_sequence() == 64 * 3 + 64 * 8
    with pytest.raises(ConfigError, match="model.mamba.scan"):
        MambaConfig(scan="parallel")
    with pytest.raises(ConfigError, match="model.mamba.d_state"):
        MambaConfig(d_state=0)
    assert (
        GPTConfig(layers=["mamba"], position="none").mamba == MambaConfig()
    )  # the table appears with its defaults


@pytest.mark.parametrize("layers", [("mamba+none",), ("mamba", "attention")], ids=["mamba", "hybrid"])
def test_prefill_then_decode_equals_the_parallel_forward(layers):
    model = _model(layers)
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache.for_model(model, batch=2, max_len=21)
        assert cache.k.shape[0] == sum(
            m == "attention" for m, _ in model.config.layer_kinds()
        )  # no k, v rows for SSM layers
        steps = [
            model(ids[:, :9], cache=cache)[0],
            model(ids[:, 9:13], cache=cache)[0],
        ]  # prefill, then a chunk
        steps += [model(ids[:, t : t + 1], cache=cache)[0] for t in range(13, 21)]  # then token by token
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    state = cache.state(0)
    assert state["conv"].shape == (2, 64, 3) and state["ssm"].shape == (2, 64, 8)
    per_sequence = sum(t[0].numel() for t in state.values())
    assert (
        per_sequence == model.blocks[0].mamba.state_values_per_sequence()
    )  # O(1): the same after 21 tokens as after 1


def test_a_future_token_changes_no_earlier_output():
    model = _model(("mamba", "attention"))
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % 97
    with torch.no_grad():
        a, b = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_beam_search_reorders_the_state_like_recomputing():
    model = _model(("mamba", "attention"))
    prompt = torch.randint(0, 97, (5,)).tolist()
    cached = beam_search(model, prompt, 6, beam_width=3, use_cache=True)
    recomputed = beam_search(model, prompt, 6, beam_width=3, use_cache=False)
    assert [ids for ids, _ in cached] == [ids for ids, _ in recomputed]
    assert [score for _, score in cached] == pytest.approx([score for _, score in recomputed], abs=1e-5)


def test_refuses_packed_rows_and_the_paged_cache():
    model = _model()
    ids = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="packed rows"):
        model(ids, documents=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))

    class Paged:
        paged, length = True, 0

    with pytest.raises(ValueError, match="paged cache"):
        model.blocks[0].mamba(torch.randn(1, 3, 32), cache=Paged())


# --- Hugging Face ------------------------------------------------------------------------------------
try:
    import transformers
except ImportError:  # only the tests marked needs_transformers skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")

from scratchlm.models.hf import config_from_hf, export_hf  # noqa: E402

# Mamba's switches other than HF's defaults: projection biases, no conv bias, Δ rank 3, conv width 3.
UNTIED = {"use_bias": True, "use_conv_bias": False, "time_step_rank": 3, "conv_kernel": 3}


@pytest.mark.parametrize(
    "make",
    [
        lambda: hf_models.mamba(tied=True),
        lambda: hf_models.mamba(tied=False, **UNTIED),
        lambda: hf_models.jamba(1),
        lambda: hf_models.jamba(4),
    ],
    ids=["mamba-tied", "mamba", "jamba-dense", "jamba-moe"],
)
@needs_transformers
def test_hf_import_logits_greedy_decoding_and_export(tmp_path, make):
    hf = make()
    # large initial weights: nothing hides behind tiny activations
    ours, _, ids, _ = hf_models.round_trip(hf, tmp_path, rtol=0, large=3.0)
    hf_models.assert_greedy_equal(hf, ours, ids[:1, :6], 12)


@needs_transformers
def test_jamba_layer_pattern_of_the_published_config():
    """Jamba-v0.1: attention every 8th layer from layer 4, MoE every 2nd from layer 1, no renormalisation."""
    config = config_from_hf(transformers.JambaConfig(num_hidden_layers=32).to_dict())
    assert config.layers == [
        "mamba",
        "mamba+moe",
        "mamba",
        "mamba+moe",
        "attention",
        "mamba+moe",
        "mamba",
        "mamba+moe",
    ]
    assert config.layer_kinds()[12] == ("attention", "dense") and config.layer_kinds()[13] == ("mamba", "moe")
    assert (config.moe.n_experts, config.moe.top_k, config.moe.normalize, config.moe.router) == (
        16,
        2,
        False,
        "softmax",
    )
    assert config.mamba.dt_bc_norm and config.mamba.dt_rank == 256 and config.position == "none"


def test_export_refuses_what_the_target_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="Mamba export needs"):
        export_hf(_model(("mamba", "attention")), tmp_path / "a", "mamba")
    with pytest.raises(ValueError, match="Jamba export needs"):
        export_hf(_model(("mamba", "attention")), tmp_path / "b", "jamba")  # no dt/B/C norms


def test_the_ssm_vectors_get_no_weight_decay_and_no_muon():
    """A_log (log-decay rates), D and Δ's bias are not weight matrices: weight decay would pull
    every A toward -1 and Muon would orthogonalise the rates. Both optimizers leave them out."""
    from types import SimpleNamespace

    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.train.optim import build_optimizers

    model = GPT(
        GPTConfig(
            vocab_size=50, n_layer=2, d_model=32, n_head=2, position="none", layers=["mamba", "attention"]
        )
    )
    mixer = model.blocks[0].mamba
    vectors = {id(mixer.A_log), id(mixer.D), id(mixer.dt_bias)}
    cfg = SimpleNamespace(
        optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95, weight_decay=0.1, beta1=0.9, beta2=0.95
    )
    adamw, muon = build_optimizers(model, cfg, torch.device("cpu"))
    assert not vectors & {id(p) for g in muon.param_groups for p in g["params"]}
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not vectors & decayed and vectors <= {id(p) for g in adamw.param_groups for p in g["params"]}
    (adamw_only,) = build_optimizers(
        model, SimpleNamespace(**{**vars(cfg), "optimizer": "adamw"}), torch.device("cpu")
    )
    assert not vectors & {
        id(p) for g in adamw_only.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }


def test_the_chunked_scan_stays_float32_under_autocast_and_agrees_with_the_sequential_one():
    from scratchlm.models.blocks.mamba import selective_scan_chunked, selective_scan_sequential

    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 40, 8, generator=g), torch.rand(2, 40, 8, generator=g)
    A, B, C = (
        -torch.rand(8, 4, generator=g) * 4,
        torch.randn(2, 40, 4, generator=g),
        torch.randn(2, 40, 4, generator=g),
    )
    reference, _ = selective_scan_sequential(x.double(), dt.double(), A.double(), B.double(), C.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = selective_scan_chunked(x, dt, A, B, C, chunk=16)
    assert y.dtype == torch.float32
    assert (y.double() - reference).abs().max() < 1e-4


def test_the_chunked_scan_recomputes_chunks_in_backward():
    """What autograd keeps for backward is the inputs and one state per chunk, not every
    position's (batch, D, N) state log2(chunk) times over: measured with saved-tensor hooks."""
    from scratchlm.models.blocks.mamba import selective_scan_chunked

    g = torch.Generator().manual_seed(0)
    T, D, N = 128, 16, 8
    x = torch.randn(1, T, D, generator=g, requires_grad=True)
    dt, B, C = (
        torch.rand(1, T, D, generator=g),
        torch.randn(1, T, N, generator=g),
        torch.randn(1, T, N, generator=g),
    )
    A = -torch.rand(D, N, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y, _ = selective_scan_chunked(x, dt, A, B, C, chunk=32)
    assert sum(saved) < 2 * T * D * N  # a full set of states would be T·D·N per round (x5 rounds)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
