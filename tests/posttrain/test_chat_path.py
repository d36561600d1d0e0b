"""The seams between stages on the way to a chat model: a character base that cannot spell the
template's role names grows them (and keeps what it learned), ``--tokenizer`` is checked against
the checkpoint, and each method's ``loss.png`` shows its own numbers under their own names."""

from __future__ import annotations

import json

import pytest
import torch


def test_a_char_vocabulary_grows_the_template_characters_and_the_model_keeps_its_rows(tmp_path):
    from scratchlm.models.checkpoint import read_state, save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.serve.chat import first_new_id, load_chat_model
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens, moved_ids

    plain = CharTokenizer.train("0123456789+=", ["<|endoftext|>"])  # what `tasks` lines teach
    chat = add_chat_tokens(plain)
    assert chat.chars == [*plain.chars, *"\naeimnrstuy"]
    assert moved_ids(plain, chat) == {12: 23}  # <|endoftext|> moves up past the 11 new characters
    assert first_new_id(plain, chat) == 12
    template = ChatTemplate(chat)
    rendered = template.render([{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}])
    assert template.parse(rendered.ids) == [
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
    ]

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=13, n_layer=1, n_head=2, d_model=16, block_size=16, tie_embeddings=False)
    base = GPT(config).eval()
    save_model_only(tmp_path / "base", base, tokenizer=plain)
    model, tokenizer = load_chat_model(tmp_path / "base", device="cpu")
    assert tokenizer.fingerprint == chat.fingerprint and model.config.vocab_size == chat.vocab_size
    for name in ("tok_emb", "lm_head"):
        old, new = getattr(base, name).weight, getattr(model, name).weight
        assert torch.equal(new[:12], old[:12])  # the characters keep their rows
        assert torch.equal(new[23], old[12])  # <|endoftext|>'s trained row moved with it
        assert not any(torch.equal(new[i], old[12]) for i in range(12, 23))  # the new ids are fresh
    # Text of the old characters: the same logits over the old ids as the base's.
    ids = torch.tensor([plain.encode("12+30=42<|endoftext|>1", allowed_special="all")])
    moved = torch.tensor([chat.encode("12+30=42<|endoftext|>1", allowed_special="all")])
    with torch.no_grad():
        before, after = base(ids)[0], model(moved)[0]
    torch.testing.assert_close(after[..., :12], before[..., :12])
    torch.testing.assert_close(after[..., 23], before[..., 12])
    assert read_state(tmp_path / "base")["tokenizer_fingerprint"] == plain.fingerprint


def test_tokenizer_of_another_vocabulary_is_refused_and_the_plain_one_of_a_chat_model_taken(tmp_path):
    from scratchlm.models.checkpoint import read_state, save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.serve.chat import chat_tokenizers
    from scratchlm.tokenizers import ByteTokenizer, CharTokenizer
    from scratchlm.tokenizers.chat import add_chat_tokens

    plain = CharTokenizer.train("0123456789+=", ["<|endoftext|>"])
    chat = add_chat_tokens(plain)
    plain.save(tmp_path / "char.json")
    ByteTokenizer({"<|endoftext|>": 256}).save(tmp_path / "byte.json")
    config = GPTConfig(vocab_size=chat.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=16)
    save_model_only(tmp_path / "sft", GPT(config), tokenizer=chat)  # a chat model
    state = read_state(tmp_path / "sft")
    with pytest.raises(ValueError, match="is not the tokenizer .* was trained with"):
        chat_tokenizers(tmp_path / "sft", state, str(tmp_path / "byte.json"))
    # The chat model's own plain tokenizer is accepted: the chat tokens are the only difference.
    got_plain, got_chat = chat_tokenizers(tmp_path / "sft", state, str(tmp_path / "char.json"))
    assert got_plain.fingerprint == got_chat.fingerprint == chat.fingerprint


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _axes(out, trainer):
    from scratchlm.train.metrics import loss_figure

    return loss_figure(out / "metrics.jsonl", trainer.plot_panels).axes


def _line(ax, label):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def test_dpo_and_grpo_plot_their_own_metrics(task_base, tmp_path):
    """DPO: loss, reward margin, accuracies; GRPO: the reward as logged (not minus it), KL, loss —
    read back from the figure's axes and compared with metrics.jsonl."""
    from scratchlm.posttrain.dpo import DPOTrainer, dpo
    from scratchlm.posttrain.rl.grpo import GRPOTrainer, grpo
    from scratchlm.train.trainer import Trainer

    root = task_base
    fast = {"max_steps": 4, "eval_interval": 2, "batch_size": 8, "sample_tokens": 0, "warmup_steps": 0}
    dpo({"base": str(root / "base"), "data": str(root / "tasks" / "pairs-train.jsonl")},
        {**fast, "out_dir": str(tmp_path / "dpo")}, progress=False)  # fmt: skip
    assert (tmp_path / "dpo" / "loss.png").exists()
    axes = _axes(tmp_path / "dpo", DPOTrainer)
    assert [ax.get_ylabel() for ax in axes] == [
        "DPO loss",
        "reward margin (β·log-ratio, chosen − rejected)",
        "fraction of pairs",
    ]
    records = _records(tmp_path / "dpo")
    steps, margins = _line(axes[1], "train (per step)")
    assert margins == [r["rewards/margins"] for r in records if "rewards/margins" in r]
    _, accuracy = _line(axes[2], "reward accuracy, held out")
    assert accuracy == [r["val_rewards/accuracies"] for r in records if "val_rewards/accuracies" in r]

    grpo(
        {
            "base": str(root / "base"),
            "data": str(root / "tasks" / "prompts-train.jsonl"),
            "max_new_tokens": 2,
            "prompts_per_rollout": 4,
            "samples_per_prompt": 2,
        },
        {**fast, "out_dir": str(tmp_path / "grpo")},
        progress=False,
    )
    axes = _axes(tmp_path / "grpo", GRPOTrainer)
    assert [ax.get_ylabel() for ax in axes] == ["reward", "KL to the reference (nats/token)", "GRPO loss"]
    records = _records(tmp_path / "grpo")
    _, held_out = _line(axes[0], "held out (greedy)")
    assert held_out == [r["val_reward"] for r in records if "val_reward" in r]
    assert held_out == [-r["val_loss"] for r in records if "val_loss" in r]  # the reward, not minus it
    _, rollout = _line(axes[0], "rollouts (sampled) (per step)")
    assert rollout == [r["reward"] for r in records if "reward" in r]
    _, kl = _line(axes[1], "per token (k3) (per step)")
    assert kl == [r["kl"] for r in records if "kl" in r]
    # Pretraining and SFT keep the cross-entropy axis.
    assert Trainer.plot_panels[0].ylabel == "cross-entropy (nats/token)"
