"""The optimizers against their definitions: which parameters AdamW decays and which go to Muon,
the quintic Newton–Schulz iteration with its published coefficients (Jordan et al., 2024), one Muon
step written out by hand, and the settings build_optimizers passes through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scratchlm.train.optim import Muon, _is_hidden_matrix, build_optimizers, newton_schulz, param_groups


def cfg(**kw):
    base = dict(
        optimizer="muon", lr=3e-3, beta1=0.8, beta2=0.97, weight_decay=0.1, muon_lr=0.04, muon_momentum=0.9
    )
    return SimpleNamespace(**{**base, **kw})


def tiny():
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, block_size=4, bias=True, position="learned")
    )


def test_which_parameters_are_hidden_matrices():
    m2, m3 = torch.zeros(4, 4), torch.zeros(2, 4, 4)
    for name in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight", "score.weight", "value_head.weight"):
        assert not _is_hidden_matrix(name, m2), name
    assert not _is_hidden_matrix("blocks.0.moe.router.weight", m2)
    assert _is_hidden_matrix("blocks.0.attn.qkv.weight", m2) and _is_hidden_matrix(
        "blocks.0.mlp.up.weight", m2
    )
    assert _is_hidden_matrix("blocks.0.moe.experts_up", m3) is True  # a stack of expert matrices
    assert _is_hidden_matrix("blocks.0.conv.weight", m3) is False  # a 3-D tensor that is not experts
    assert not _is_hidden_matrix("blocks.0.attn.qkv.bias", torch.zeros(4))
    assert not _is_hidden_matrix("blocks.0.x.experts_up", torch.zeros(2, 2, 4, 4))


def test_adamw_groups_decay_matrices_only_and_skip_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen, and first: every later parameter must still be grouped
    decay, no_decay = param_groups(model, 0.3)
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model[2].weight)]
    expected = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in expected]


def test_build_optimizers_passes_every_setting_through():
    model = tiny()
    (adamw,) = build_optimizers(model, cfg(optimizer="adamw"), torch.device("cpu"))
    assert adamw.defaults["lr"] == 3e-3 and adamw.defaults["betas"] == (0.8, 0.97)
    assert adamw.defaults["fused"] is False  # fused kernels only on CUDA
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    adamw, muon = build_optimizers(model, cfg(), torch.device("cpu"))
    assert adamw.defaults["lr"] == 3e-3 and adamw.defaults["betas"] == (0.8, 0.97)
    assert adamw.defaults["fused"] is False
    assert (
        muon.defaults["lr"] == 0.04
        and muon.defaults["momentum"] == 0.9
        and muon.defaults["weight_decay"] == 0.1
    )
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    # the embeddings (2-D, not hidden) are AdamW's and decayed; vectors are AdamW's and not decayed
    assert {id(p) for p in decayed["params"]} == {id(model.tok_emb.weight), id(model.pos_emb.weight)} | (
        set() if model.config.tie_embeddings else {id(model.lm_head.weight)}
    )
    assert all(p.dim() == 1 for p in plain["params"]) and plain["params"]
    hidden = {id(p) for p in muon.param_groups[0]["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in hidden and all(
        p.dim() == 2 for p in muon.param_groups[0]["params"]
    )
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'muon', got 'sgd'"):
        build_optimizers(model, cfg(optimizer="sgd"), torch.device("cpu"))


def test_fused_adamw_is_asked_for_on_cuda():
    model = tiny()
    for optimizer in ("adamw", "muon"):
        try:
            adamw = build_optimizers(model, cfg(optimizer=optimizer), torch.device("cuda"))[0]
        except RuntimeError as e:  # a build whose fused AdamW refuses CPU tensors
            pytest.skip(reason=f"this PyTorch build cannot make a fused AdamW here: {e}")
        assert adamw.defaults["fused"] is True


def test_muon_defaults_are_the_published_ones():
    muon = Muon([nn.Parameter(torch.zeros(2, 2))])
    assert muon.defaults == {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0, "ns_steps": 5}


def quintic(g, steps=5):
    """The iteration by hand: X ← aX + (bS + cS²)X with S = XXᵀ, from X = G/‖G‖_F (wide orientation)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def test_newton_schulz_is_the_quintic_iteration_with_its_coefficients():
    torch.manual_seed(0)
    for shape in ((6, 10), (10, 6), (7, 7)):
        g = torch.randn(shape)
        torch.testing.assert_close(newton_schulz(g).double(), quintic(g), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(newton_schulz(g, steps=2).double(), quintic(g, 2), atol=2e-5, rtol=1e-4)
    assert newton_schulz(torch.randn(4, 6).bfloat16()).dtype == torch.bfloat16
    assert torch.equal(newton_schulz(torch.zeros(3, 5)), torch.zeros(3, 5))  # eps: no division by zero


def test_newton_schulz_iterates_on_the_small_gram_matrix():
    """A tall (64 × 8) matrix is transposed first: the Gram matrices are 8 × 8, not 64 × 64."""
    for g in (torch.randn(64, 8), torch.randn(3, 64, 8), torch.randn(8, 64)):
        with FlopCounterMode(display=False) as counter:
            newton_schulz(g)
        batch = g.shape[0] if g.dim() == 3 else 1
        small = 5 * (2 * 8 * 8 * 64 + 2 * 8 * 8 * 8 + 2 * 8 * 8 * 64)  # S, S², (bS + cS²)X per step
        assert counter.get_total_flops() == batch * small


def test_one_muon_step_by_hand():
    torch.manual_seed(0)
    lr, momentum, wd = 0.05, 0.9, 0.1
    tall = nn.Parameter(torch.randn(8, 4))
    wide = nn.Parameter(torch.randn(4, 8))
    muon = Muon([tall, wide], lr=lr, momentum=momentum, weight_decay=wd, ns_steps=5)
    buffers = {id(p): torch.zeros_like(p) for p in (tall, wide)}
    for _ in range(2):  # two steps: the momentum buffer carries over
        grads = {id(p): torch.randn_like(p) for p in (tall, wide)}
        expected = {}
        for p in (tall, wide):
            g = grads[id(p)]
            buf = buffers[id(p)] = momentum * buffers[id(p)] + (1 - momentum) * g
            nesterov = momentum * buf + (1 - momentum) * g
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5  # tall: √2; wide: 1
            expected[id(p)] = p.detach().double() * (1 - lr * wd) - lr * scale * quintic(nesterov)
            p.grad = g
        muon.step()
        for p in (tall, wide):
            torch.testing.assert_close(p.detach().double(), expected[id(p)], atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(muon.state[p]["momentum_buffer"], buffers[id(p)], atol=1e-6, rtol=1e-6)
