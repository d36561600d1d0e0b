"""``model export`` / ``model import`` on the models a new user has: the default recipe
(``shakespeare-char``: RoPE, RMSNorm, ReLU² MLP, no biases, tied) exports as Llama with
``hidden_act = "relu"`` and gate = up, nanoGPT's CPU recipe (``nanogpt-cpu``: GELU, no biases) as
GPT-2 with zero biases; ``transformers`` loads both with our logits, and ``model import`` gives the
same model and tokenizer back, so export -> import -> ``sample`` needs no ``--tokenizer``. Also:
refusals that name the failing property and the fix, dense Qwen2 / Qwen3 decoding like
``transformers``, and imports that refuse weights they cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

from scratchlm.cli import main  # noqa: E402
from scratchlm.models.checkpoint import load_model_from_checkpoint, save_model_only  # noqa: E402
from scratchlm.models.config import GPTConfig  # noqa: E402
from scratchlm.models.gpt import GPT  # noqa: E402
from scratchlm.models.hf import (  # noqa: E402
    export_hf,
    export_note,
    export_problems,
    exportable_families,
    import_hf,
)
from scratchlm.models.presets import preset  # noqa: E402
from scratchlm.tokenizers import train_tokenizer  # noqa: E402
from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"


def _large(model: GPT) -> GPT:
    """Large random weights (and gains away from 1), so a wrong activation or a swapped matrix shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def _effective(config: GPTConfig) -> dict:
    """A config with its defaults resolved (n_kv_head None = n_head, d_ff None = the MLP's width)."""
    return {**config.to_dict(), "n_kv_head": config.kv_heads, "d_ff": config.ff_width}


@pytest.mark.parametrize(
    "name,chat,arch,cls",
    [
        ("shakespeare-char", False, "llama", "LlamaForCausalLM"),
        ("shakespeare-char", True, "llama", "LlamaForCausalLM"),  # an SFT model: chat tokens, grown rows
        ("nanogpt-cpu", False, "gpt2", "GPT2LMHeadModel"),
    ],
    ids=["shakespeare-char", "shakespeare-char-sft", "nanogpt-cpu"],
)
def test_the_default_recipes_export_load_in_transformers_and_import_back(
    tmp_path, capsys, name, chat, arch, cls
):
    tokenizer = train_tokenizer("char", [TEXT])
    if chat:
        tokenizer = add_chat_tokens(tokenizer)
    model = _large(GPT(preset(name, vocab_size=tokenizer.vocab_size)))
    assert exportable_families(model.config)[0] == arch
    save_model_only(tmp_path / "ckpt", model, tokenizer=tokenizer)
    assert (
        main(["model", "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    )
    assert "tokenizer.json" in capsys.readouterr().out

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == cls
    x = torch.tensor([tokenizer.encode(TEXT[:60])])
    with torch.no_grad():
        expected = model(x)[0]
        assert expected.abs().max() > 1.0
        torch.testing.assert_close(theirs(x).logits, expected, atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (TEXT, "speak, hear"):
        assert hf_tokenizer.encode(text) == tokenizer.encode(text)
    if chat:
        messages = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "hear me"}]
        assert hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == (
            ChatTemplate(tokenizer).render(messages).ids
        )

    assert main(["model", "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, state = load_model_from_checkpoint(tmp_path / "back")
    assert _effective(back.config) == _effective(model.config)  # ReLU², no biases: the same model
    assert (tmp_path / "back" / "tokenizer.json").exists()
    assert state["tokenizer_fingerprint"] == tokenizer.fingerprint  # the same tokenizer, kept with it
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_a_trained_quickstart_checkpoint_exports_decodes_like_transformers_and_samples_after_import(
    tmp_path, capsys
):
    """The quickstart's commands on tinyshakespeare, 2 steps of the default recipe; then export,
    transformers' greedy generate = ours, and ``sample`` of the re-imported checkpoint (no
    --tokenizer) = ``sample`` of the original."""
    ds, run = tmp_path / "shakespeare", tmp_path / "run"
    assert main(["data", "prepare", "shakespeare", "--out", str(ds)]) == 0
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--dataset",
                str(ds),
                "--kind",
                "char",
                "--out",
                str(tmp_path / "char.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "tokenize",
                "--dataset",
                str(ds),
                "--tokenizer",
                str(tmp_path / "char.json"),
                "--out",
                str(tmp_path / "shards"),
            ]
        )
        == 0
    )
    sets = [
        "train.max_steps=2",
        "train.warmup_steps=1",
        "train.batch_size=4",
        "train.eval_interval=2",
        "train.eval_windows=2",
        "train.sample_tokens=8",
        f"train.data={tmp_path / 'shards'}",
        f"train.out_dir={run}",
    ]
    assert (
        main(
            [
                "train",
                "--config",
                str(CONFIGS / "shakespeare-char.toml"),
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        == 0
    )
    assert main(["model", "export", "--checkpoint", str(run / "best"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["model", "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()

    ours, _ = load_model_from_checkpoint(run / "best")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("ROMEO:")])
    hf_models.assert_greedy_equal(theirs, ours.eval(), prompt, 20)

    def sample(checkpoint) -> str:
        argv = ["sample", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--temperature", "0"]
        assert main([*argv, "--max-new-tokens", "20", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["samples"][0]["text"]

    assert sample(tmp_path / "back") == sample(run / "best")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_dense_qwen_imports_decodes_like_transformers_and_exports(tmp_path, family):
    hf = hf_models.MODELS[family]()
    ours, _, x, _ = hf_models.round_trip(hf, tmp_path)  # exported as the family export picks for it
    assert (ours.config.attn.qkv_bias, ours.config.attn.qk_norm) == (
        (True, None) if family == "qwen2" else (None, True)
    )
    if family == "qwen3":
        assert ours.config.head_dim == 12 != ours.config.d_model // ours.config.n_head
    hf_models.assert_greedy_equal(hf, ours, x[:1, :6], 12)


def test_a_relu_llama_imports_as_relu2_only_when_gate_equals_up(tmp_path):
    hf = hf_models.llama(hidden_act="relu")
    hf.save_pretrained(tmp_path / "reglu", safe_serialization=True)
    with pytest.raises(
        ValueError, match=r"layer 0: hidden_act 'relu' with gate_proj != up_proj is a ReLU-gated MLP"
    ):
        import_hf(tmp_path / "reglu")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate_proj.weight.copy_(layer.mlp.up_proj.weight)
    ours = hf_models.round_trip(hf, tmp_path).ours
    assert ours.config.mlp == "relu2"
    hf_models.assert_greedy_equal(hf, ours, torch.tensor([[1, 2, 3]]), 8)


def test_a_llama_of_another_activation_is_read_or_refused_never_taken_for_silu(tmp_path):
    geglu = hf_models.round_trip(hf_models.llama(hidden_act="gelu_pytorch_tanh"), tmp_path / "a").ours
    assert geglu.config.mlp == "geglu"
    hf_models.llama(hidden_act="gelu").save_pretrained(tmp_path / "b", safe_serialization=True)
    with pytest.raises(ValueError, match="llama: hidden_act 'gelu' is not supported"):
        import_hf(tmp_path / "b")


def test_export_refusals_name_the_property_and_the_fix(tmp_path):
    alibi = GPTConfig(
        vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8, position="alibi", mlp="gelu"
    )
    assert export_problems(alibi, "llama") == [
        "model.position = 'alibi' (llama needs 'rope')",
        "model.norm = 'layernorm' (llama needs 'rmsnorm')",
        "model.mlp = 'gelu' (llama needs a gated MLP: swiglu, geglu, or relu2)",
        "model.bias = true (llama has no biases; q/k/v biases alone are model.attn.qkv_bias)",
    ]
    assert exportable_families(alibi) == [] and "no Hugging Face format holds this model" in export_note(
        alibi
    )
    with pytest.raises(
        ValueError,
        match=r"gpt2 export cannot hold this model: model.position = 'alibi' "
        r"\(gpt2 needs 'learned'\)\. Fix: no Hugging Face format holds it: set what",
    ):
        export_hf(GPT(alibi), tmp_path / "x")
    # a model another format holds: the refusal names that --arch
    learned = GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8, mlp="gelu")
    with pytest.raises(
        ValueError,
        match=r"model.mlp = 'gelu' \(llama needs a gated MLP.*Fix: it exports as gpt2: pass --arch gpt2",
    ):
        export_hf(GPT(learned), tmp_path / "y", "llama")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert export_note(preset("shakespeare-char")).startswith(
        "export: `scratchlm model export` writes it as llama"
    )


def test_import_refuses_weights_the_config_cannot_hold_and_weights_it_lacks(tmp_path):
    hf_models.llama(num_hidden_layers=4).save_pretrained(tmp_path / "four", safe_serialization=True)
    config = json.loads((tmp_path / "four" / "config.json").read_text())
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "model.safetensors").symlink_to(tmp_path / "four" / "model.safetensors")
    (tmp_path / "two" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(
        ValueError, match=r"config.json's 2 layers have no place for: model.layers.2.input_layernorm"
    ):
        import_hf(tmp_path / "two")
    hf_models.llama(num_hidden_layers=2).save_pretrained(tmp_path / "small", safe_serialization=True)
    (tmp_path / "small" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match=r"config.json's 4 layers need that the file lacks: model.layers.2"):
        import_hf(tmp_path / "small")


def test_a_truncated_safetensors_file_is_named_not_a_traceback(tmp_path):
    hf_models.llama().save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupt"):
        import_hf(tmp_path)


# --- the tokenizer.json of a real Hugging Face folder -------------------------------------------------
# Qwen2's and Qwen3's pre-tokenization regex (one digit per chunk) and Llama 3's (digits by three),
# as their tokenizer.json files spell them.
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
VARIED = [
    "cafe\u0301 and café, A\u030angstro\u0308m and Ångström",  # decomposed and composed: NFC joins them
    "\u1100\u1161\u11a8 한국어 東京 naïve 🙂👍🏽 >\u0338",  # Hangul jamo compose; > + U+0338 is ≯
    "12345678 3.14159 ٣٤٥ ①② 2024-01-01",
    "   leading  and\t\ttabs   \n\n\n  trailing   ",
    "\r\n\r\nwindows\r\n\x1c\x1f\u00a0\u3000\u2028x\u0085y",
    "It's I'LL we'VE don't",
    "<|im_start|>user\nhi<|im_end|>\u0338<|endoftext|><think>why</think> ok",
    "a" * 60 + " " * 40 + "b",
    "",
]


def _byte_level_bpe_folder(folder, regex, *, nfc=False, bos=None, added=()):
    """A tokenizer.json in Qwen2's form (an NFC normalizer, the regex as a Split, ByteLevel; chat
    tokens added special, ``added`` added not special, as Qwen3's <think>) or, with ``bos``, in Llama
    3's (a ByteLevel + TemplateProcessing post-processor that puts ``bos`` before every text). Built
    with the tokenizers library from a BPE trained here on the same regex, so merge i creates id
    256 + i as in the real files. Returns the ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pre

    from scratchlm.tokenizers.hf import bytes_to_unicode

    bpe = train_tokenizer(
        "bpe", [TEXT + " ".join(VARIED)] * 20, vocab_size=400, pattern=regex, special_tokens=[]
    )
    table = bytes_to_unicode()
    spell = lambda token: "".join(table[b] for b in token)  # noqa: E731
    hf = Tokenizer(
        models.BPE(
            vocab={spell(t): i for i, t in enumerate(bpe.vocab)},
            merges=[(spell(bpe.vocab[a]), spell(bpe.vocab[b])) for a, b in bpe.merges],
            ignore_merges=bos is not None,  # Llama 3 sets it; Qwen2 does not
        )
    )
    if nfc:
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre.Sequence(
        [pre.Split(Regex(regex), behavior="isolated"), pre.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    specials = [bos] if bos else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    hf.add_tokens([AddedToken(name, special=False, normalized=False) for name in added])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos:
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, hf.token_to_id(bos))]
        )
        hf.post_processor = processors.Sequence([byte_level, template])
    else:
        hf.post_processor = byte_level
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    return hf


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_tokenizer_json_imports_with_the_ids_of_the_tokenizers_library(tmp_path, family, capsys):
    """Qwen2's form (NFC, its Split regex, ByteLevel) is read exactly: the checkpoint's tokenizer
    gives the ids of the tokenizers library and of transformers on unicode (decomposed and composed),
    digits, whitespace runs and special tokens; sample needs no --tokenizer, and export writes the
    NFC normalizer back."""
    from transformers import PreTrainedTokenizerFast

    from scratchlm.models.checkpoint import load_checkpoint_tokenizer

    folder = tmp_path / "hf"
    added = ["<think>", "</think>"] if family == "qwen3" else []
    theirs = _byte_level_bpe_folder(folder, QWEN2_REGEX, nfc=True, added=added)
    # One row per token: a random model would sample the padding rows real Qwen files have.
    hf = hf_models.MODELS[family](vocab_size=theirs.get_vocab_size())
    hf.save_pretrained(folder, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    capsys.readouterr()  # transformers' own progress bars
    assert main(["model", "import", "--hf", str(folder), "--out", str(tmp_path / "ck")]) == 0
    out, err = capsys.readouterr()
    assert "with its bpe tokenizer" in out and err == ""
    ck = tmp_path / "ck"
    ours = load_checkpoint_tokenizer(ck, load_model_from_checkpoint(ck)[1])
    assert ours.normalizer == "NFC" and ours.pattern == QWEN2_REGEX
    for backend in ("tiktoken", "python"):
        ours.backend = backend
        for text in VARIED:
            ids = ours.encode(text, allowed_special="all")
            assert ids == theirs.encode(text).ids == fast.encode(text), text
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.encode("cafe\u0301") == ours.encode("café")
    argv = ["sample", "--checkpoint", str(ck), "--prompt", "cafe\u0301", "--max-new-tokens", "3"]
    assert main([*argv, "--temperature", "0"]) == 0
    assert main(["model", "export", "--checkpoint", str(ck), "--out", str(tmp_path / "back")]) == 0
    again = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "back" / "tokenizer.json"))
    assert all(again.encode(text) == fast.encode(text) for text in VARIED)


def _sentencepiece_bpe_folder(folder):
    """Llama 2's and Mistral's kind: a BPE over "▁"-joined pieces with byte_fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "▁h", "▁he", "ll", "▁hell", "▁hello"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o")]
    hf = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize(
    "kind,reason",
    [
        (
            "llama3",
            "a post-processor that adds ['<|begin_of_text|>'] to every text cannot be read "
            "(scratchlm's tokenizers add no tokens of their own)",
        ),
        ("sentencepiece", "a BPE with byte_fallback (SentencePiece's kind) cannot be read"),
    ],
    ids=["llama3-bos", "llama2-sentencepiece"],
)
def test_a_tokenizer_json_we_cannot_read_exactly_is_left_out_with_a_warning(tmp_path, kind, reason, capsys):
    """Llama 3's (a BOS added by its post-processor) and Llama 2's (SentencePiece's BPE): the weights
    import, one warning names the reason, and its advice holds (a scratchlm tokenizer JSON passed to
    sample); --tokenizer-required refuses instead, before anything is written."""
    folder = tmp_path / "hf"
    hf_models.llama(vocab_size=257).save_pretrained(folder, safe_serialization=True)  # a byte tokenizer's
    if kind == "llama3":
        _byte_level_bpe_folder(folder, LLAMA3_REGEX, bos="<|begin_of_text|>")
    else:
        _sentencepiece_bpe_folder(folder)
    capsys.readouterr()  # transformers' own progress bars
    ck = tmp_path / "ck"
    assert main(["model", "import", "--hf", str(folder), "--out", str(ck)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"scratchlm: warning: {folder / 'tokenizer.json'} not imported: {reason}; the checkpoint has no "
        "tokenizer: pass --tokenizer to sample/generate (a scratchlm tokenizer JSON or gpt2)"
    ]
    assert "the checkpoint has no tokenizer" in out and not (ck / "tokenizer.json").exists()
    assert load_model_from_checkpoint(ck)[0].config.vocab_size == 257
    train_tokenizer("byte", [TEXT]).save(tmp_path / "byte.json")
    argv = ["sample", "--checkpoint", str(ck), "--tokenizer", str(tmp_path / "byte.json"), "--prompt", "hi"]
    assert main([*argv, "--max-new-tokens", "3", "--temperature", "0"]) == 0
    capsys.readouterr()
    required = [
        "model",
        "import",
        "--hf",
        str(folder),
        "--out",
        str(tmp_path / "refused"),
        "--tokenizer-required",
    ]
    assert main(required) == 2
    assert f"{folder / 'tokenizer.json'} cannot be read exactly: {reason}" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
