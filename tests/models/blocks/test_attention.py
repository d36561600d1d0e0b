"""Attention's settings table ``[model.attn]`` (``AttentionConfig``), and the reader of the old spelling.

Configs and checkpoints written before the table kept its six settings at the top of ``[model]``
(``sliding_window``, ``d_head``, ``qkv_bias``, ``qk_norm``, ``attn_scale``, ``attn_softcap``). A
checkpoint's dict reads into the table silently and builds the same model (names, shapes, logits);
a hand-written ``[model]`` table or ``--set`` in the old spelling works with one notice naming the
new key; a new config's dict round-trips, and a plain one writes no table at all.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from scratchlm.config import ConfigError, apply_overrides
from scratchlm.models.blocks.attention import LEGACY_KEYS, AttentionConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.presets import config_from_section

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints"
BASE = {
    "vocab_size": 61,
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "d_model": 32,
    "block_size": 24,
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "bias": False,
    "attention": "manual",
    "layers": ["sliding", "attention"],
    "init_std": 0.3,
}
OLD = {
    "sliding_window": 4,
    "d_head": 12,
    "qkv_bias": True,
    "qk_norm": True,
    "attn_scale": 0.3,
    "attn_softcap": 8.0,
}
NEW = {"window": 4, "head_dim": 12, "qkv_bias": True, "qk_norm": True, "scale": 0.3, "softcap": 8.0}


def test_an_old_dict_with_every_key_builds_the_same_model_silently():
    assert set(OLD) == set(LEGACY_KEYS)  # every old key is exercised
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint's dict reads without any message
        old = GPTConfig.from_dict({**BASE, **OLD})
    new = GPTConfig(**BASE, attn=NEW)
    assert old == new and old.attn == AttentionConfig(**NEW) and old.head_dim == 12
    torch.manual_seed(0)
    a = GPT(old).eval()
    b = GPT(new).eval()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.blocks[0].attn.qkv.bias is not None and a.blocks[0].attn.q_norm is not None
    assert a.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 12, 32)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)
        # the old keys were read, not dropped: without the window, scale and cap the logits differ
        unread = {"window": None, "scale": None, "softcap": None}
        other = GPT(GPTConfig(**{**BASE, "layers": None}, attn={**NEW, **unread}))
        other.load_state_dict(a.state_dict())
        assert (other.eval()(x)[0] - a(x)[0]).abs().max() > 1e-2


def test_a_new_config_round_trips_and_a_plain_one_writes_no_table():
    c = GPTConfig(**BASE, attn=NEW)
    d = c.to_dict()
    assert d["attn"] == NEW and not set(LEGACY_KEYS) & set(d)
    assert GPTConfig.from_dict(d) == c
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == c  # as a checkpoint's state.json keeps it
    for plain in (GPTConfig(), GPTConfig(attn=AttentionConfig()), GPTConfig(attn=None)):
        assert "attn" not in plain.to_dict() and plain.attn == AttentionConfig()
        assert GPTConfig.from_dict(plain.to_dict()) == plain


def test_the_old_checkpoints_settings_read_into_the_table_without_a_message():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemma = GPTConfig.from_dict(json.loads((FIXTURES / "gemma" / "state.json").read_text())["model"])
        mixed = GPTConfig.from_dict(json.loads((FIXTURES / "mixed" / "state.json").read_text())["model"])
    assert gemma.attn == AttentionConfig(
        window=8, head_dim=16, qkv_bias=True, qk_norm=True, scale=0.25, softcap=50.0
    )
    assert mixed.attn.window is not None


def test_the_old_spelling_in_a_model_table_or_set_works_with_one_notice():
    section = apply_overrides(
        {"model": {"preset": "shakespeare-char", "layers": ["sliding"]}},
        ["model.sliding_window=8", "model.attn_softcap=5.0"],
    )["model"]
    with pytest.warns(FutureWarning) as caught:
        old = config_from_section(section)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "model.sliding_window -> model.attn.window" in message
    assert "model.attn_softcap -> model.attn.softcap" in message
    new_section = apply_overrides(
        {"model": {"preset": "shakespeare-char", "layers": ["sliding"]}},
        ["model.attn.window=8", "model.attn.softcap=5.0"],
    )["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_section(new_section) == old
    assert old.attn.window == 8 and old.attn.softcap == 5.0


def test_one_setting_under_both_spellings_is_refused():
    with pytest.raises(ConfigError, match="model.attn_softcap is the old spelling of model.attn.softcap"):
        GPTConfig.from_dict({"attn_softcap": 5.0, "attn": {"softcap": 6.0}})
    # different settings under each spelling merge into one table
    c = GPTConfig.from_dict({"attn_softcap": 5.0, "attn": {"scale": 0.5}})
    assert (c.attn.softcap, c.attn.scale) == (5.0, 0.5)


@pytest.mark.parametrize(
    "key,bad,good",
    [
        ("window", 0, 1),
        ("head_dim", 0, 1),
        ("scale", 0.0, 1e-9),
        ("softcap", 0.0, 1e-9),
        ("qk_norm", 1, True),
    ],
)
def test_each_setting_is_checked_naming_its_key(key, bad, good):
    with pytest.raises(ConfigError, match=rf"model\.attn\.{key} = "):
        AttentionConfig(**{key: bad})
    AttentionConfig(**{key: good})
    with pytest.raises(ConfigError, match=r"unknown \[model.attn\] keys \['sliding_window'\]"):
        GPTConfig.from_dict({"attn": {"sliding_window": 4}})
