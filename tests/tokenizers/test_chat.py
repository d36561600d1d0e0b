"""The chat format: template, loss mask, special tokens, a grown model, and the
Hugging Face form of it all, against ``transformers`` as the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.loss import masked_token_loss
from scratchlm.tokenizers import CharTokenizer
from scratchlm.tokenizers.chat import IM_END, IM_START, ChatTemplate, add_chat_tokens

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "12+30="},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "1+1="},
    {"role": "assistant", "content": "2"},
]


@pytest.fixture(scope="module")
def chat_gpt2(gpt2):
    return add_chat_tokens(gpt2)


def test_add_chat_tokens_keeps_every_id_and_appends_two(gpt2, chat_gpt2):
    assert chat_gpt2.vocab_size == gpt2.vocab_size + 2
    assert chat_gpt2.special_tokens[IM_START] == 50257 and chat_gpt2.special_tokens[IM_END] == 50258
    assert chat_gpt2.eot_token == gpt2.eot_token  # <|endoftext|>: the padding id, distinct from end of turn
    assert add_chat_tokens(chat_gpt2) is chat_gpt2


def test_mask_covers_assistant_content_and_its_end_of_turn_only(chat_gpt2):
    t = ChatTemplate(chat_gpt2)
    r = t.render(CONVERSATION)
    assert len(r.ids) == len(r.mask)
    learned = [i for i, m in zip(r.ids, r.mask) if m]
    # exactly the two answers, each followed by <|im_end|>: the token that teaches the model to stop
    assert learned == chat_gpt2.encode_ordinary("42") + [t.end_id] + chat_gpt2.encode_ordinary("2") + [
        t.end_id
    ]
    ends = [k for k, i in enumerate(r.ids) if i == t.end_id]
    assert [r.mask[k] for k in ends] == [0, 0, 1, 0, 1]  # system and user turns end unlearned
    assert t.pad_id != t.end_id
    assert chat_gpt2.decode(r.ids) == (
        "<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n12+30="
        "<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n<|im_start|>user\n1+1="
        "<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    )
    prompt = t.prompt_ids(CONVERSATION[:2])
    assert chat_gpt2.decode(prompt).endswith("<|im_start|>assistant\n")


def test_bad_conversations_are_refused_with_the_reason(chat_gpt2):
    t = ChatTemplate(chat_gpt2)
    for messages, message in [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "role must be"),
        ([{"role": "user"}], "message 0 must be"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"role": "user", "content": "hi <|im_end|> there"}], "special token"),
    ]:
        with pytest.raises(ValueError, match=message):
            t.render(messages)
    with pytest.raises(ValueError, match="add_chat_tokens"):
        ChatTemplate(CharTokenizer.train("abc", ["<|endoftext|>"]))
    with pytest.raises(ValueError, match="cannot spell the template's role names"):
        ChatTemplate(CharTokenizer.train("abc", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    # add_chat_tokens gives a character vocabulary the characters the template writes.
    ChatTemplate(add_chat_tokens(CharTokenizer.train("abc", ["<|endoftext|>"])))


text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="<|>"), max_size=40
)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})


@settings(max_examples=60, deadline=None)
@given(st.lists(message, min_size=1, max_size=5))
def test_render_parse_round_trip_and_whole_string_encoding(chat_gpt2, messages):
    """Pieces encoded one by one give the ids of encoding the whole rendered text (what HF does)."""
    t = ChatTemplate(chat_gpt2)
    r = t.render(messages)
    stripped = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    assert t.parse(r.ids) == stripped
    assert chat_gpt2.encode(chat_gpt2.decode(r.ids), allowed_special="all") == r.ids
    user_tokens = sum(
        len(chat_gpt2.encode_ordinary(m["content"])) for m in stripped if m["role"] == "assistant"
    )
    assert sum(r.mask) == user_tokens + sum(m["role"] == "assistant" for m in messages)


def test_masked_loss_of_a_fully_masked_batch_is_zero_not_nan():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -1  # padding
    loss, count = masked_token_loss(logits, targets, torch.zeros(2, 5))
    assert loss.item() == 0.0 and count.item() == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    mask = torch.zeros(2, 5)
    mask[1, 3] = 1
    loss, count = masked_token_loss(logits, targets, mask)
    expected = torch.nn.functional.cross_entropy(logits[1, 3:4], targets[1, 3:4])
    assert count.item() == 1 and torch.allclose(loss, expected)


def test_grown_vocabulary_keeps_old_logits_and_new_rows_start_near_the_mean():
    torch.manual_seed(0)
    for tie in (True, False):
        model = GPT(
            GPTConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, block_size=16, tie_embeddings=tie)
        ).eval()
        x = torch.randint(0, 20, (1, 7))
        with torch.no_grad():
            before, _ = model(x)
        old_rows = model.tok_emb.weight[:20].clone()
        model.grow_vocab(23)
        with torch.no_grad():
            after, _ = model(x)
        assert after.shape[-1] == 23 and model.config.vocab_size == 23
        assert torch.equal(after[..., :20], before)  # bit for bit: the old rows are the same tensors' values
        new = model.tok_emb.weight[20:]
        spread = old_rows.std(0)
        assert ((new - old_rows.mean(0)).abs() <= 0.05 * spread + 1e-6).all()  # the mean, plus 1% noise
        assert not torch.equal(new[0], new[1])  # distinct: two new tokens never tie
        assert (model.lm_head.weight is model.tok_emb.weight) == tie
        with pytest.raises(ValueError, match="only grow"):
            model.grow_vocab(10)
    # a padded table (30 rows, 20 known ids): new ids reuse the padding rows, initialised afresh
    model = GPT(GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, block_size=16)).eval()
    before = model.tok_emb.weight.detach().clone()
    model.grow_vocab(30, known=20)
    assert torch.equal(model.tok_emb.weight[:20], before[:20]) and not torch.equal(
        model.tok_emb.weight[20:], before[20:]
    )
    assert ((model.tok_emb.weight[20:] - before[:20].mean(0)).abs() <= 0.05 * before[:20].std(0) + 1e-6).all()


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_hugging_face_tokenizer_and_chat_template_give_our_ids_and_generate_our_reply(kind, gpt2, tmp_path):
    """The exported folder loads with AutoTokenizer and AutoModelForCausalLM: apply_chat_template
    gives exactly our ids, plain encoding too, and HF greedy generate reproduces our reply."""
    transformers = pytest.importorskip("transformers")
    from scratchlm.generate import SamplingConfig, generate
    from scratchlm.models.hf import export_hf

    if kind == "bpe":
        tok = add_chat_tokens(gpt2)
        texts = [
            "Hello world, it's 2024!",
            " leading space\n\n  and\ttabs",
            "naïve café 😀 ünïcödé",
            "x" * 30,
        ]
    else:
        tok = add_chat_tokens(CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ABC+=0123456789\n.,!?", []))
        texts = ["hello world", "ab c\n\nd", "12+30=42"]
    t = ChatTemplate(tok)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size - 2,
            n_layer=2,
            n_head=2,
            d_model=32,
            block_size=96,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
            init_std=0.3,
        )
    ).eval()
    model.grow_vocab(tok.vocab_size)
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for s in texts:
        assert hf_tok(s)["input_ids"] == tok.encode(s)
        assert hf_tok.decode(tok.encode(s)) == s
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi there "}]
    ours = t.prompt_ids(messages)
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(theirs, dict) or hasattr(theirs, "keys"):  # newer transformers return a BatchEncoding
        theirs = theirs["input_ids"]
    assert list(theirs) == ours
    assert (
        list(
            hf_tok.apply_chat_template(
                CONVERSATION
                if kind == "bpe"
                else [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        == t.render(
            CONVERSATION
            if kind == "bpe"
            else [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
        ).ids
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.generation_config.eos_token_id == t.end_id
    reply = generate(model, ours, 20, SamplingConfig(temperature=0))[0]
    with torch.no_grad():
        ids = torch.tensor([ours])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)[
            0, len(ours) :
        ]
    out = out.tolist()
    # HF stops at <|im_end|> (its eos) and keeps it; our plain generate runs the full 20 tokens
    n = out.index(t.end_id) + 1 if t.end_id in out else len(out)
    assert out[:n] == reply[:n]


def test_a_chat_checkpoint_carries_its_tokenizer_to_the_engine_and_the_export(chat_gpt2, tmp_path, capsys):
    import json

    from scratchlm.cli import main
    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.serve import LLM, SamplingParams

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=chat_gpt2.vocab_size - 2, n_layer=1, n_head=2, d_model=16, block_size=64)
    )
    model.grow_vocab(chat_gpt2.vocab_size)
    save_model_only(tmp_path / "chat", model, tokenizer=chat_gpt2)
    llm = LLM(tmp_path / "chat")
    assert llm.engine.tokenizer.fingerprint == chat_gpt2.fingerprint
    t = ChatTemplate(chat_gpt2)
    prompt = t.prompt_ids([{"role": "user", "content": "hi"}])
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[t.end_id]))[0]
    from scratchlm.generate import generate
    from scratchlm.generate.sampling import SamplingConfig

    greedy = generate(model.eval(), [prompt], 5, SamplingConfig(temperature=0))[0]
    n = greedy.index(t.end_id) + 1 if t.end_id in greedy else len(greedy)
    assert out.outputs[0].token_ids == greedy[:n]  # the engine's greedy reply is the model's
    assert out.outputs[0].finish_reason == ("stop" if t.end_id in greedy else "length")
    assert (
        main(
            [
                "model",
                "export",
                "--checkpoint",
                str(tmp_path / "chat"),
                "--out",
                str(tmp_path / "hf"),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["tokenizer"] is True
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (
        config["eos_token"] == IM_END
        and config["pad_token"] == "<|endoftext|>"
        and "im_start" in config["chat_template"]
    )
    (tmp_path / "chat" / "tokenizer.json").write_text(
        (tmp_path / "chat" / "tokenizer.json").read_text().replace("im_end", "im_stop")
    )  # not the recorded tokenizer any more
    with pytest.raises(Exception, match="fingerprints differ|sha256|size"):
        LLM(tmp_path / "chat")


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", "o200k"])
def test_hugging_face_form_of_trained_bpe_with_each_pattern_encodes_as_we_do(pattern):
    """cl100k's possessive digit rule reads differently in Oniguruma: long numbers are the test."""
    transformers = pytest.importorskip("transformers")
    from scratchlm.tokenizers import train_tokenizer
    from scratchlm.tokenizers.hf import to_hf_tokenizer

    corpus = [
        "In 1600 the 12345678 numbers, naïve café 😀; it's O'Neil's 3.14159!\n\n  indented\tcode()"
    ] * 20
    corpus += ["34 45 56 67 78 4567 3456"] * 20  # merges that would cross cl100k's 3-digit cuts
    tok = train_tokenizer("bpe", corpus, vocab_size=320, pattern=pattern)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=to_hf_tokenizer(tok))
    import regex
    from tokenizers import Regex, pre_tokenizers

    from scratchlm.tokenizers.hf import oniguruma_pattern

    split = pre_tokenizers.Split(Regex(oniguruma_pattern(tok.pattern)), behavior="isolated")
    for s in corpus[:1] + [
        "12345678901 and 1600",
        "  spaces   and\n\n\nnewlines",
        "ÀÉÎ 你好 мир",
        "a<|endoftext|>b",
    ]:
        assert hf(s)["input_ids"] == tok.encode(s, allowed_special="all"), s
        # the pre-tokenizer cuts where ours does (cl100k: "123|456|78", not "12345678")
        assert [piece for piece, _ in split.pre_tokenize_str(s)] == regex.findall(tok.pattern, s), s


def test_hugging_face_form_of_a_char_tokenizer_maps_unknown_characters_to_unk():
    transformers = pytest.importorskip("transformers")
    from scratchlm.tokenizers.hf import to_hf_tokenizer

    tok = CharTokenizer.train("abc", ["<|endoftext|>"], unknown="replace")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=to_hf_tokenizer(tok))
    assert hf("ab?c")["input_ids"] == tok.encode("ab?c") == [0, 1, tok.special_tokens["<|unk|>"], 2]
