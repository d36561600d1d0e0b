"""LoRA adapter files, key by key: what ``adapter_bytes`` writes (tensors and metadata), what
``load_adapters`` reads back or refuses (damaged files, another format or version, missing keys,
another model shape, a vocabulary that does not fit) and what ``merge_adapters`` checks (the base's
sha256, the chat tokens of grown vocabularies). Exact values and the messages users read."""

from __future__ import annotations

import json
import re

import pytest
import torch

from scratchlm.io import FormatError
from scratchlm.models.checkpoint import (
    load_checkpoint_tokenizer,
    load_model_from_checkpoint,
    read_state,
    save_model_only,
)
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.posttrain.lora import (
    adapter_bytes,
    apply_lora,
    load_adapters,
    lora_modules,
    merge_adapters,
    save_adapters,
)

QKV_DOWN = ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]


def model(seed=0, vocab=50, layers=2, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab,
        n_layer=layers,
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


def adapted(seed=0, rank=2, alpha=3.0, **kw):
    """A model with adapters on qkv and down whose B is not zero (so every value is visible)."""
    m = model(seed, **kw)
    apply_lora(m, rank=rank, alpha=alpha, targets=("down", "qkv"))
    with torch.no_grad():
        for lora in lora_modules(m).values():
            lora.lora_B.normal_(0, 0.05)
    return m


def header(data: bytes) -> dict:
    """The metadata of safetensors bytes, read from the header itself."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


def rewrite(src, dst, **changes):
    """``src`` saved again at ``dst`` with metadata ``changes`` (None deletes the key)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    save_file(tensors, str(dst), metadata=meta)
    return dst


def logits(m, seed=1):
    x = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(x)[0]


# --- adapter_bytes -----------------------------------------------------------------------------


def test_the_file_holds_exactly_the_adapters_and_the_metadata():
    from safetensors.torch import load

    m = adapted()
    data = adapter_bytes(m, base="runs/base", base_sha256="ab" * 32)
    assert header(data) == {
        "format": "scratchlm.lora",
        "version": "1",
        "rank": "2",
        "alpha": "3.0",
        "targets": '["down", "qkv"]',
        "vocab_size": "50",
        "new_rows_from": "50",  # no new rows: the vocabulary size
        "info": '{"base": "runs/base", "base_sha256": "' + "ab" * 32 + '"}',
    }
    tensors = load(data)
    assert sorted(tensors) == sorted(f"{n}.lora_{x}" for n in QKV_DOWN for x in "AB")
    modules = lora_modules(m)
    for name in QKV_DOWN:
        assert torch.equal(tensors[f"{name}.lora_A"], modules[name].lora_A)
        assert torch.equal(tensors[f"{name}.lora_B"], modules[name].lora_B)
    assert tensors["blocks.0.attn.qkv.lora_A"].shape == (2, 64)
    assert header(adapter_bytes(m))["info"] == "{}"

    with pytest.raises(ValueError) as e:
        adapter_bytes(model())
    assert str(e.value) == "the model has no LoRA adapters (apply_lora first)"


def test_an_adapter_on_a_top_level_layer_round_trips(tmp_path):
    m = model(tie_embeddings=False)
    assert sorted(apply_lora(m, rank=1, alpha=2, targets=("lm_head", "qkv"))) == [
        "blocks.0.attn.qkv",
        "blocks.1.attn.qkv",
        "lm_head",  # no parent module: its name has no dot
    ]
    with torch.no_grad():
        lora_modules(m)["lm_head"].lora_B.normal_()
    path = save_adapters(m, tmp_path / "a.safetensors")
    assert header(path.read_bytes())["targets"] == '["lm_head", "qkv"]'
    fresh = model(tie_embeddings=False)
    load_adapters(fresh, path)
    assert torch.equal(logits(fresh), logits(m))


@pytest.mark.parametrize("tied", [False, True])
def test_the_rows_of_new_token_ids_are_saved_from_their_first_id(tied):
    from safetensors.torch import load

    m = model(tie_embeddings=tied)
    apply_lora(m, rank=1, alpha=1, targets=("qkv",), new_rows_from=47)
    with torch.no_grad():
        m.tok_emb.weight.normal_()
        m.lm_head.weight.normal_()
    data = adapter_bytes(m)
    meta = header(data)
    assert (meta["vocab_size"], meta["new_rows_from"], meta["targets"]) == ("50", "47", '["qkv"]')
    tensors = load(data)
    rows = {k: v for k, v in tensors.items() if k.startswith("new_rows")}
    assert torch.equal(rows.pop("new_rows.tok_emb"), m.tok_emb.weight[47:])
    if not tied:  # a tied output matrix is the embedding: saved once
        assert torch.equal(rows.pop("new_rows.lm_head"), m.lm_head.weight[47:])
    assert rows == {}


def test_save_adapters_writes_the_bytes_and_returns_the_path(tmp_path):
    m = adapted()
    path = save_adapters(m, str(tmp_path / "a.safetensors"), base="b")
    assert path == tmp_path / "a.safetensors"
    from safetensors.torch import load

    data, expected = path.read_bytes(), adapter_bytes(m, base="b")
    assert header(data) == header(expected)  # safetensors orders the metadata as it likes
    assert load(data).keys() == load(expected).keys()
    assert all(torch.equal(v, load(expected)[k]) for k, v in load(data).items())


# --- load_adapters -----------------------------------------------------------------------------


def test_load_wraps_the_same_layers_restores_every_value_and_returns_the_metadata(tmp_path):
    m = adapted(rank=2, alpha=3.0)
    path = save_adapters(m, tmp_path / "a.safetensors", base="runs/base", step=7)
    fresh = model()
    meta = load_adapters(fresh, path)
    assert meta == {
        "format": "scratchlm.lora",
        "version": "1",
        "rank": "2",
        "alpha": "3.0",
        "targets": '["down", "qkv"]',
        "vocab_size": "50",
        "new_rows_from": "50",
        "info": {"base": "runs/base", "step": 7},
    }
    got, want = lora_modules(fresh), lora_modules(m)
    assert sorted(got) == QKV_DOWN
    for name in QKV_DOWN:
        assert (got[name].rank, got[name].alpha, got[name].scaling) == (2, 3.0, 1.5)
        assert torch.equal(got[name].lora_A, want[name].lora_A)
        assert torch.equal(got[name].lora_B, want[name].lora_B)
    assert not hasattr(fresh, "lora_new_rows_from")  # no new rows: the embedding stays frozen
    assert not fresh.tok_emb.weight.requires_grad
    assert torch.equal(logits(fresh), logits(m))


def test_a_file_without_the_optional_keys_loads_as_one_without_new_rows(tmp_path):
    path = save_adapters(adapted(), tmp_path / "a.safetensors")
    old = rewrite(path, tmp_path / "old.safetensors", vocab_size=None, new_rows_from=None, info=None)
    fresh = model()
    meta = load_adapters(fresh, old)
    assert meta["info"] == {} and "vocab_size" not in meta
    assert fresh.config.vocab_size == 50 and sorted(lora_modules(fresh)) == QKV_DOWN


@pytest.mark.parametrize("tied", [False, True])
def test_adapters_with_new_token_rows_grow_the_vocabulary_and_bring_the_rows(tmp_path, tied):
    trained = model(tie_embeddings=tied)
    base_emb = trained.tok_emb.weight.detach().clone()
    trained.grow_vocab(53)  # the chat tokens: three new ids
    apply_lora(trained, rank=2, alpha=4, targets=("qkv",), new_rows_from=50)
    with torch.no_grad():
        trained.tok_emb.weight[50:] = torch.randn(3, 64)
        trained.lm_head.weight[50:] = torch.randn(3, 64)
        for lora in lora_modules(trained).values():
            lora.lora_B.normal_(0, 0.05)
    path = save_adapters(trained, tmp_path / "a.safetensors")

    fresh = model(tie_embeddings=tied)  # the base, with 50 ids
    meta = load_adapters(fresh, path)
    assert (meta["vocab_size"], meta["new_rows_from"]) == ("53", "50")
    assert fresh.config.vocab_size == 53 and fresh.lora_new_rows_from == 50
    assert torch.equal(fresh.tok_emb.weight[:50], base_emb)  # the known ids keep their rows
    assert torch.equal(fresh.tok_emb.weight, trained.tok_emb.weight)
    assert torch.equal(fresh.lm_head.weight, trained.lm_head.weight)
    assert fresh.tok_emb.weight.requires_grad  # the new rows train on
    assert torch.equal(logits(fresh), logits(trained))


def test_a_vocabulary_that_does_not_fit_is_refused(tmp_path):
    path = save_adapters(adapted(), tmp_path / "a.safetensors")
    bigger = model(vocab=60)
    with pytest.raises(FormatError) as e:
        load_adapters(bigger, path)
    assert str(e.value) == f"{path}: adapters for a vocabulary of 50 ids; this model has 60"
    assert lora_modules(bigger) == {}  # refused before anything was wrapped


def test_adapters_of_another_model_shape_are_refused_with_the_layers_that_differ(tmp_path):
    path = save_adapters(adapted(), tmp_path / "a.safetensors")
    with pytest.raises(FormatError) as e:
        load_adapters(model(layers=3), path)
    assert str(e.value) == (
        f"{path}: adapters for [] / missing ['blocks.2.attn.qkv.lora_A', 'blocks.2.attn.qkv.lora_B', "
        "'blocks.2.mlp.down.lora_A']: they were trained on another model shape"
    )
    with pytest.raises(FormatError) as e:
        load_adapters(model(layers=1), path)
    assert str(e.value) == (
        f"{path}: adapters for ['blocks.1.attn.qkv.lora_A', 'blocks.1.attn.qkv.lora_B', "
        "'blocks.1.mlp.down.lora_A'] / missing []: they were trained on another model shape"
    )


def test_damaged_files_are_refused_as_unreadable(tmp_path):
    good = save_adapters(adapted(), tmp_path / "a.safetensors").read_bytes()
    damaged = {
        "junk": b"not safetensors",
        "truncated": good[: len(good) // 2],
        "empty": b"",
    }
    for name, data in damaged.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(FormatError) as e:
            load_adapters(model(), path)
        assert re.fullmatch(rf"{re.escape(str(path))}: not a readable safetensors file \(.+\)", str(e.value))
        assert e.value.__cause__ is None
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        load_adapters(model(), tmp_path / "missing.safetensors")


def test_another_format_or_no_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = save_adapters(adapted(), tmp_path / "a.safetensors")
    head = rewrite(path, tmp_path / "head.safetensors", format="scratchlm.reward-head")
    with pytest.raises(FormatError) as e:
        load_adapters(model(), head)
    assert str(e.value) == f"{head}: not a scratchlm LoRA adapter file (format 'scratchlm.reward-head')"
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))  # no metadata at all
    with pytest.raises(FormatError) as e:
        load_adapters(model(), bare)
    assert str(e.value) == f"{bare}: not a scratchlm LoRA adapter file (format None)"


@pytest.mark.parametrize("version", ["2", "0", None])
def test_another_version_is_refused(tmp_path, version):
    path = save_adapters(adapted(), tmp_path / "a.safetensors")
    other = rewrite(path, tmp_path / "v.safetensors", version=version)
    m = model()
    with pytest.raises(FormatError) as e:
        load_adapters(m, other)
    assert str(e.value) == (
        f"{other}: scratchlm LoRA adapter version {version!r} is not supported (this scratchlm reads "
        "versions ['1']); save the adapters again with this version"
    )
    assert lora_modules(m) == {}


@pytest.mark.parametrize("key", ["rank", "alpha", "targets"])
def test_a_file_missing_a_required_key_is_refused(tmp_path, key):
    path = save_adapters(adapted(), tmp_path / "a.safetensors")
    damaged = rewrite(path, tmp_path / "d.safetensors", **{key: None})
    with pytest.raises(FormatError) as e:
        load_adapters(model(), damaged)
    assert str(e.value) == (
        f"{damaged}: the adapter metadata has no {[key]}; the file is damaged or was not written "
        "by scratchlm: save the adapters again"
    )


# --- merge_adapters ----------------------------------------------------------------------------


def base_checkpoint(path, seed=0, tokenizer=None, **info):
    save_model_only(path, model(seed), tokenizer=tokenizer, **info)
    return read_state(path)["files"]["model.safetensors"]["sha256"]


def trained_adapters(checkpoint, path, **info):
    m, _ = load_model_from_checkpoint(checkpoint)
    apply_lora(m, rank=2, alpha=4, targets=("qkv", "up"))
    with torch.no_grad():
        for lora in lora_modules(m).values():
            lora.lora_B.normal_(0, 0.05)
    save_adapters(m, path, **info)
    return m


def test_merge_folds_the_adapters_into_their_own_base_and_records_where_they_came_from(tmp_path):
    sha = base_checkpoint(tmp_path / "base")
    adapters = tmp_path / "a.safetensors"
    m = trained_adapters(tmp_path / "base", adapters, base="the base", base_sha256=sha)
    meta = merge_adapters(tmp_path / "base", adapters, tmp_path / "merged")
    assert meta["info"] == {"base": "the base", "base_sha256": sha} and meta["rank"] == "2"
    merged, state = load_model_from_checkpoint(tmp_path / "merged")
    assert lora_modules(merged) == {}
    torch.testing.assert_close(logits(merged), logits(m), atol=1e-5, rtol=1e-5)
    assert (state["source"], state["adapters"]) == (str(tmp_path / "base"), str(adapters))
    assert state["tokenizer_fingerprint"] is None  # the base had no tokenizer: neither has the merge


def test_merge_refuses_adapters_trained_on_another_base(tmp_path):
    sha = base_checkpoint(tmp_path / "base")
    base_checkpoint(tmp_path / "other", seed=1)
    adapters = tmp_path / "a.safetensors"
    trained_adapters(tmp_path / "base", adapters, base="runs/sft/base", base_sha256=sha)
    with pytest.raises(ValueError) as e:
        merge_adapters(tmp_path / "other", adapters, tmp_path / "merged")
    assert str(e.value) == (
        f"{adapters} were trained on another base (its weights' sha256 differs from "
        f"{tmp_path / 'other'}'s); merging them here would give a wrong model. Their base was runs/sft/base"
    )
    assert not (tmp_path / "merged").exists()
    # adapters that recorded no sha256 (saved by hand) are merged on trust
    trained_adapters(tmp_path / "base", tmp_path / "b.safetensors", base="runs/sft/base")
    merge_adapters(tmp_path / "other", tmp_path / "b.safetensors", tmp_path / "merged")
    assert (tmp_path / "merged" / "state.json").exists()


def char_tokenizer():
    from scratchlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("0123456789+=:\n abcdefghijklmnopqrstuvwxyz", ["<|endoftext|>"])
    assert tok.vocab_size <= 50
    return tok


def test_merge_without_new_rows_keeps_the_bases_tokenizer_or_the_one_given(tmp_path):
    tok = char_tokenizer()
    tok.save(tmp_path / "tok.json")
    base_checkpoint(tmp_path / "base")  # no tokenizer of its own
    base_checkpoint(tmp_path / "with-tok", tokenizer=tok)
    trained_adapters(tmp_path / "base", tmp_path / "a.safetensors")
    merge_adapters(tmp_path / "with-tok", tmp_path / "a.safetensors", tmp_path / "m1")
    state = read_state(tmp_path / "m1")
    assert load_checkpoint_tokenizer(tmp_path / "m1", state).fingerprint == tok.fingerprint  # no chat tokens
    merge_adapters(tmp_path / "base", tmp_path / "a.safetensors", tmp_path / "m2", str(tmp_path / "tok.json"))
    state = read_state(tmp_path / "m2")
    assert load_checkpoint_tokenizer(tmp_path / "m2", state).fingerprint == tok.fingerprint
    # a trained checkpoint whose data folder (and tokenizer) is gone: merged without a tokenizer
    base_checkpoint(tmp_path / "gone", train={"data": str(tmp_path / "deleted")})
    merge_adapters(tmp_path / "gone", tmp_path / "a.safetensors", tmp_path / "m3")
    assert read_state(tmp_path / "m3")["tokenizer_fingerprint"] is None
    # a file without vocab_size / new_rows_from (no new rows) keeps the tokenizer as it is too
    old = rewrite(
        tmp_path / "a.safetensors", tmp_path / "old.safetensors", vocab_size=None, new_rows_from=None
    )
    merge_adapters(tmp_path / "with-tok", old, tmp_path / "m4")
    state = read_state(tmp_path / "m4")
    assert load_checkpoint_tokenizer(tmp_path / "m4", state).fingerprint == tok.fingerprint


def test_merge_into_a_version_1_checkpoint_without_checksums(tmp_path):
    base_checkpoint(tmp_path / "base")
    state = json.loads((tmp_path / "base" / "state.json").read_text())
    del state["files"]  # version 1 recorded no sha256 of its files
    state["version"] = 1
    (tmp_path / "base" / "state.json").write_text(json.dumps(state))
    m = trained_adapters(tmp_path / "base", tmp_path / "a.safetensors", base="old")
    merge_adapters(tmp_path / "base", tmp_path / "a.safetensors", tmp_path / "merged")
    merged, _ = load_model_from_checkpoint(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(m), atol=1e-5, rtol=1e-5)


def chat_adapters(checkpoint, path, vocab):
    m, _ = load_model_from_checkpoint(checkpoint)
    known = m.config.vocab_size
    m.grow_vocab(vocab)
    apply_lora(m, rank=2, alpha=4, targets=("qkv",), new_rows_from=known)
    with torch.no_grad():
        m.tok_emb.weight[known:] = torch.randn(vocab - known, 64)
    save_adapters(m, path)
    return m


def test_merge_of_adapters_with_chat_token_rows_adds_the_chat_tokens(tmp_path):
    from scratchlm.tokenizers.chat import add_chat_tokens

    tok = char_tokenizer()
    chat = add_chat_tokens(tok)
    assert chat.vocab_size == tok.vocab_size + 2
    m = model(vocab=tok.vocab_size)
    save_model_only(tmp_path / "base", m, tokenizer=tok)
    trained = chat_adapters(tmp_path / "base", tmp_path / "a.safetensors", chat.vocab_size)
    merge_adapters(tmp_path / "base", tmp_path / "a.safetensors", tmp_path / "merged")
    merged, state = load_model_from_checkpoint(tmp_path / "merged")
    assert merged.config.vocab_size == chat.vocab_size
    assert torch.equal(merged.tok_emb.weight, trained.tok_emb.weight)
    assert load_checkpoint_tokenizer(tmp_path / "merged", state).fingerprint == chat.fingerprint

    # rows for one new id, but the chat tokenizer needs two
    chat_adapters(tmp_path / "base", tmp_path / "short.safetensors", tok.vocab_size + 1)
    with pytest.raises(ValueError) as e:
        merge_adapters(tmp_path / "base", tmp_path / "short.safetensors", tmp_path / "merged-short")
    assert str(e.value) == (
        f"the adapters' vocabulary ({tok.vocab_size + 1}) does not fit the chat tokenizer "
        f"({tok.vocab_size + 2} ids)"
    )
    assert not (tmp_path / "merged-short").exists()
