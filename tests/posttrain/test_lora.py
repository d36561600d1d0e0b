"""LoRA: zero-initialised update, only adapters train, merge equals adapters,
unmerge restores the base, adapters are small and round-trip through safetensors."""

from __future__ import annotations

import pytest
import torch

from scratchlm.io import FormatError
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.posttrain.lora import apply_lora, load_adapters, lora_modules, merge_lora, save_adapters


def model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=50,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        block_size=32,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        **kw,
    )
    return GPT(cfg).eval()


def randomise(m):
    with torch.no_grad():
        for lora in lora_modules(m).values():
            lora.lora_B.normal_(0, 0.05)


def test_adapted_model_starts_equal_and_only_adapters_get_gradients():
    base, x = model(), torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected, _ = base(x)
    wrapped = apply_lora(base, rank=4, alpha=8)
    assert len(wrapped) == 2 * 5  # qkv, proj, up, gate, down in each of 2 blocks
    with torch.no_grad():
        got, _ = base(x)
    assert torch.equal(got, expected)  # B = 0: exactly the base model
    _, loss = base.train()(x, x)
    loss.backward()
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is None for n, p in base.named_parameters() if n not in trainable)
    assert all(lora.lora_B.grad.abs().sum() > 0 for lora in lora_modules(base).values())


def test_merged_logits_equal_the_adapter_logits_and_unmerge_restores_the_base():
    m, x = model(), torch.randint(0, 50, (2, 16))
    original = {n: p.clone() for n, p in m.state_dict().items()}
    apply_lora(m, rank=8, alpha=16)
    randomise(m)
    with torch.no_grad():
        adapted, _ = m(x)
        for lora in lora_modules(m).values():
            lora.merge()
        merged, _ = m(x)
        torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
        for lora in lora_modules(m).values():
            lora.unmerge()
        unmerged, _ = m(x)
    torch.testing.assert_close(unmerged, adapted, atol=1e-5, rtol=1e-5)
    for name, lora in lora_modules(m).items():
        torch.testing.assert_close(lora.base.weight, original[f"{name}.weight"], atol=1e-6, rtol=0)
    plain = merge_lora(m)
    assert not lora_modules(plain) and set(plain.state_dict()) == set(original)
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], adapted, atol=1e-5, rtol=1e-5)


def test_adapters_are_small_and_round_trip(tmp_path):
    m, x = model(), torch.randint(0, 50, (1, 16))
    apply_lora(m, rank=2, alpha=4, targets=("qkv", "down"))
    randomise(m)
    with torch.no_grad():
        expected, _ = m(x)
    path = save_adapters(m, tmp_path / "adapters.safetensors", base="some/checkpoint")
    fresh = model()
    meta = load_adapters(fresh, path)
    assert meta["rank"] == "2" and meta["info"] == {"base": "some/checkpoint"}
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], expected)
    weights = sum(p.numel() for p in model().parameters())
    adapters = sum(p.numel() for n, p in fresh.named_parameters() if "lora_" in n)
    assert adapters < 0.05 * weights and path.stat().st_size < 0.05 * weights * 4
    other = GPT(
        GPTConfig(
            vocab_size=50,
            n_layer=3,
            n_head=4,
            d_model=64,
            block_size=32,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
        )
    )
    with pytest.raises(FormatError, match="another model shape"):
        load_adapters(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FormatError, match="not a readable"):
        load_adapters(model(), tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no linear layer named"):
        apply_lora(model(), targets=("q_proj",))


def test_cli_merge_writes_a_checkpoint_with_the_adapted_outputs(tmp_path, capsys):
    import json

    from scratchlm.cli import main
    from scratchlm.models.checkpoint import load_model_from_checkpoint, save_model_only

    base = model()
    save_model_only(tmp_path / "base", base)
    apply_lora(base, rank=4, alpha=8)
    randomise(base)
    save_adapters(base, tmp_path / "a.safetensors")
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        expected, _ = base(x)
    assert (
        main(
            [
                "lora",
                "merge",
                "--checkpoint",
                str(tmp_path / "base"),
                "--adapters",
                str(tmp_path / "a.safetensors"),
                "--out",
                str(tmp_path / "merged"),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rank"] == 4
    merged, _ = load_model_from_checkpoint(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x)[0], expected, atol=1e-5, rtol=1e-5)
