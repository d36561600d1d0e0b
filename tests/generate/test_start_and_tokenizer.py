"""Where text starts (an empty prompt, the trainer's samples) and which tokenizer a checkpoint
generates with: one rule each, shared by ``sample``, ``generate``, the engine, the trainer and chat."""

from __future__ import annotations

import pytest
import torch

from scratchlm.generate.generate import prompt_ids, start_ids
from scratchlm.generate.tokenizer import checkpoint_tokenizer
from scratchlm.models.checkpoint import load_model_from_checkpoint, save_model_only
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.serve.chat import chat_tokenizers
from scratchlm.tokenizers import ByteTokenizer, CharTokenizer
from scratchlm.tokenizers.chat import add_chat_tokens, moved_ids


def test_text_starts_at_end_of_text_else_a_newline_else_nowhere():
    with_eot = CharTokenizer.train(["ab\n"], ["<|endoftext|>"])
    assert start_ids(with_eot) == [with_eot.eot_token]
    lines = CharTokenizer.train(["b\na"])  # "\n" is id 0 here, and id 0 is no longer the rule
    assert start_ids(lines) == [lines.stoi["\n"]]
    letters = CharTokenizer.train(["bca"])
    with pytest.raises(ValueError, match=r"this tokenizer \(char, 3 ids\) has neither: give a prompt"):
        start_ids(letters)
    # id 0 used to start an empty prompt without <|endoftext|>: for this vocabulary, the character "a"
    assert CharTokenizer.train(["ab"]).decode([0]) == "a"
    assert prompt_ids(lines, "") == start_ids(lines)
    assert prompt_ids(ByteTokenizer.train(["x"]), "") == [10]  # a byte-level newline


def _checkpoint(folder, tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=32))
    return save_model_only(folder, model, tokenizer)


@pytest.mark.parametrize("text", ["12+30=42\n", "the system asks; the user and the assistant answer.\n"])
def test_the_plain_tokenizer_of_a_chat_model_is_accepted_as_its_chat_tokenizer(tmp_path, text):
    """With a template-poor character vocabulary (the chat tokens move its special tokens) and with a
    rich one (nothing moves), the base's tokenizer gives the chat model's: the same decision for the
    generation path and the chat path."""
    plain = CharTokenizer.train([text], ["<|endoftext|>"])
    grown = add_chat_tokens(plain)
    assert bool(moved_ids(plain, grown)) == text.startswith("12")
    folder = _checkpoint(tmp_path / "chat", grown)
    _, state = load_model_from_checkpoint(folder)
    chosen = checkpoint_tokenizer(folder, state, plain)
    assert chosen.fingerprint == grown.fingerprint == state["tokenizer_fingerprint"]
    path = plain.save(tmp_path / "plain.json")
    trained_with, chat = chat_tokenizers(folder, state, str(path))
    assert trained_with.fingerprint == chat.fingerprint == grown.fingerprint
    # A base model: its tokenizer as it is; chat grows it (SFT's start).
    base = _checkpoint(tmp_path / "base", plain)
    _, state = load_model_from_checkpoint(base)
    assert checkpoint_tokenizer(base, state, plain).fingerprint == plain.fingerprint
    trained_with, chat = chat_tokenizers(base, state, str(path))
    assert (trained_with.fingerprint, chat.fingerprint) == (plain.fingerprint, grown.fingerprint)


def test_another_tokenizer_is_refused_with_a_fix_true_for_the_checkpoint(tmp_path):
    plain = CharTokenizer.train(["12+30=42\n"], ["<|endoftext|>"])
    folder = _checkpoint(tmp_path / "chat", add_chat_tokens(plain))
    _, state = load_model_from_checkpoint(folder)
    other = CharTokenizer.train(["12+30=45\n"], ["<|endoftext|>"])
    for chooser in (
        lambda t: checkpoint_tokenizer(folder, state, t),
        lambda t: chat_tokenizers(folder, state, str(t.save(tmp_path / "other.json"))),
    ):
        with pytest.raises(
            ValueError, match=rf"leave the tokenizer out \(no --tokenizer\): {folder} carries"
        ):
            chooser(other)
    # An imported model (no recorded tokenizer, no tokenizer.json): nothing to leave out.
    torch.manual_seed(0)
    imported = save_model_only(
        tmp_path / "imported", GPT(GPTConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16))
    )
    _, state = load_model_from_checkpoint(imported)
    with pytest.raises(
        ValueError, match=r"has 9 ids but .* 8 embedding rows.*pass the tokenizer the model was imported with"
    ):
        checkpoint_tokenizer(imported, state, CharTokenizer.train(["abcdefghi"]))


def test_a_model_padded_past_its_tokenizer_never_chooses_a_padded_id():
    """Imported models often have more output rows than tokenizer ids (Qwen2: 151,936 rows for
    151,665 ids). Rows past the tokenizer must never be chosen: made the most likely here, they
    would be the greedy choice and decode to nothing (sampling stopped with an error)."""
    import torch

    from scratchlm.generate.generate import beam_search, generate_text
    from scratchlm.generate.sampling import SamplingConfig
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.tokenizers.char import CharTokenizer

    tokenizer = CharTokenizer.train("abcdefgh\n ", special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size + 5,
        n_layer=1,
        n_head=2,
        d_model=16,
        block_size=32,
        tie_embeddings=False,
    )
    model = GPT(config).eval()
    with torch.no_grad():  # the padded rows point where the last hidden state points: they dominate
        hidden = model(torch.tensor([tokenizer.encode("abc")]), return_hidden=True)[2][0, -1]
        model.lm_head.weight[tokenizer.vocab_size :] = 100 * hidden / hidden.norm() ** 2
    padded_wins = model(torch.tensor([tokenizer.encode("abc")]))[0][0, -1].argmax() >= tokenizer.vocab_size
    assert padded_wins  # without the limit, greedy decoding would choose a padded row
    text = generate_text(model, tokenizer, "abc", max_new_tokens=12, sampling=SamplingConfig(temperature=0))
    assert len(text) > 0 and set(text) <= set("abcdefgh\n ")
    for ids, _ in beam_search(model, tokenizer.encode("abc"), 6, 2, vocab_size=tokenizer.vocab_size):
        assert all(i < tokenizer.vocab_size for i in ids)
