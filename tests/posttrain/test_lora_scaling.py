"""LoRA's arithmetic against its definition written by hand (Hu et al., 2021):
``y = x·(W + (α/r)·B A)ᵀ + b``, with A (r × in) Kaiming-uniform as PEFT draws it, B (out × r) zero,
the base frozen; the adapter's default rank 8 and α 16; only new token rows train."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scratchlm.posttrain.lora import LoRALinear, apply_lora, lora_modules


def test_the_update_is_alpha_over_rank_times_b_a_in_forward_delta_weight_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=True)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    rank, alpha = 4, 6.0  # alpha / rank = 1.5: neither alpha nor rank nor 1
    lora = LoRALinear(base, rank=rank, alpha=alpha)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.3)
    A, B = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    x = torch.randn(3, 5, 12)
    expected = x @ (W + (alpha / rank) * (B @ A)).T + b  # by hand
    assert lora.scaling == 1.5
    with torch.no_grad():
        torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lora.delta(), 1.5 * B @ A, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lora.weight, W + 1.5 * B @ A, atol=1e-6, rtol=1e-6)
        assert lora.merged is False
        lora.merge()
        assert lora.merged is True
        torch.testing.assert_close(base.weight, W + 1.5 * B @ A, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)
        lora.merge()  # a second merge adds nothing
        torch.testing.assert_close(base.weight, W + 1.5 * B @ A, atol=1e-6, rtol=1e-6)
        lora.unmerge()
        lora.unmerge()
        torch.testing.assert_close(base.weight, W, atol=1e-6, rtol=0)
        assert lora.merged is False


def test_rank_one_works_rank_zero_is_refused_and_the_base_is_frozen():
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=1, alpha=3.0)
    assert lora.scaling == 3.0 and lora.lora_A.shape == (1, 6) and lora.lora_B.shape == (5, 1)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert (
        lora.lora_A.requires_grad
        and lora.lora_B.requires_grad
        and torch.equal(lora.lora_B, torch.zeros(5, 1))
    )
    assert (lora.in_features, lora.out_features) == (6, 5) and lora.bias is base.bias
    with pytest.raises(ValueError, match="LoRA rank must be >= 1, got 0"):
        LoRALinear(nn.Linear(6, 5), rank=0, alpha=1.0)


def test_a_is_kaiming_uniform_with_a_sqrt5_and_follows_the_base_dtype():
    """PEFT's init: kaiming_uniform_(A, a=√5) is U(−1/√in, 1/√in) (gain √(2/6), bound gain·√(3/in))."""
    torch.manual_seed(0)
    fan_in = 256
    lora = LoRALinear(nn.Linear(fan_in, 8), rank=64, alpha=1.0)
    bound = 1 / math.sqrt(fan_in)
    biggest = lora.lora_A.detach().abs().max().item()
    assert 0.995 * bound < biggest <= bound  # 16384 draws: the largest sits within 0.5% of the bound
    half = nn.Linear(16, 4).to(torch.bfloat16)
    low = LoRALinear(half, rank=2, alpha=2.0)
    assert low.lora_A.dtype == low.lora_B.dtype == torch.bfloat16
    assert low.lora_A.device == low.lora_B.device == half.weight.device
    elsewhere = LoRALinear(nn.Linear(16, 4, device="meta"), rank=2, alpha=2.0)  # a device not the CPU
    assert elsewhere.lora_A.device.type == elsewhere.lora_B.device.type == "meta"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 4)  # a target at the top level: its name has no parent
        self.inner = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))  # inner.0.0: its own name is "0"


def test_apply_lora_defaults_dropout_and_names():
    model = Tiny()
    assert apply_lora(model, targets=("qkv",)) == ["qkv"]
    (lora,) = lora_modules(model).values()
    assert (lora.rank, lora.alpha, lora.scaling) == (8, 16.0, 2.0)  # PEFT-style defaults: r 8, α 16
    assert lora.dropout.p == 0.0
    other = Tiny()
    apply_lora(other, targets=("qkv",), dropout=0.25)
    assert other.qkv.dropout.p == 0.25
    with pytest.raises(ValueError, match=r"no linear layer named \['up'\]; this model's are \['0', 'qkv'\]"):
        apply_lora(Tiny(), targets=("up",))


def test_only_the_new_token_rows_train_and_their_gradient_is_untouched():
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    def tiny(seed=0):
        torch.manual_seed(seed)
        cfg = GPTConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, block_size=8, tie_embeddings=False)
        return GPT(cfg)

    x = torch.randint(0, 20, (2, 8))
    plain = tiny()
    plain(x, x)[1].backward()
    model = tiny()
    apply_lora(model, rank=2, alpha=2.0, new_rows_from=17)
    assert model.lora_new_rows_from == 17
    model(x, x)[1].backward()
    for name in ("tok_emb", "lm_head"):
        grad, reference = getattr(model, name).weight.grad, getattr(plain, name).weight.grad
        assert torch.equal(grad[:17], torch.zeros_like(grad[:17])), name
        torch.testing.assert_close(grad[17:], reference[17:], atol=1e-6, rtol=1e-5)  # neither scaled nor cut
    assert model.lm_head.weight.grad[17:].abs().sum() > 0
    # new_rows_from at the vocabulary size: no new rows, the embeddings stay frozen
    frozen = tiny()
    apply_lora(frozen, rank=2, alpha=2.0, new_rows_from=20)
    assert not frozen.tok_emb.weight.requires_grad and not hasattr(frozen, "lora_new_rows_from")
