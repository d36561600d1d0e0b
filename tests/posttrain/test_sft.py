"""Supervised fine-tuning on the trainer: masked loss, replies that stop,
LoRA checkpoints that any reader loads, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.models.checkpoint import load_model_from_checkpoint, save_model_only
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.posttrain.base import collate
from scratchlm.posttrain.data import load_prompts
from scratchlm.posttrain.evaluate import exact_match
from scratchlm.posttrain.sft import sft
from scratchlm.tokenizers import CharTokenizer
from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens


@pytest.fixture(scope="module")
def setup(task_base):
    return task_base


def run(**train):
    return {"max_steps": 300, "eval_interval": 100, "batch_size": 16, "lr": 3e-3, "log_interval": 50, **train}


def test_collate_shifts_pads_and_masks_the_predicted_tokens():
    tok = add_chat_tokens(CharTokenizer.train("abcdefghijklmnopqrstuvwxyz12+=\n", ["<|endoftext|>"]))
    t = ChatTemplate(tok)
    rows = [
        (r.ids, r.mask)
        for r in (
            t.render([{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]),
            t.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        )
    ]
    x, y, m = collate(rows, t.pad_id)
    assert x.shape == y.shape == m.shape == (2, len(rows[0][0]) - 1)
    assert torch.equal(y[0], torch.tensor(rows[0][0][1:])) and torch.equal(
        x[0], torch.tensor(rows[0][0][:-1])
    )
    n = len(rows[1][0]) - 1
    assert (x[1, n:] == t.pad_id).all() and (y[1, n:] == -1).all() and (m[1, n:] == 0).all()
    learned = [int(tok_id) for tok_id, keep in zip(y[0], m[0]) if keep]
    assert learned == tok.encode_ordinary("2") + [t.end_id]


def test_sft_answers_held_out_prompts_and_ends_with_end_of_turn(copy_sft):
    """Validated and measured on the task generator's held-out problems (never in the training
    file): the copy task generalises, so a model that only memorised its 200 training problems
    would fail. Measured: held-out loss 0.02 (0.30 after 100 steps, 3.7 from the random base),
    40/40 exact and stopped."""
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer

    root, summary = copy_sft
    train_prompts = {json.loads(line)["prompt"] for line in (root / "tasks" / "prompts-train.jsonl").open()}
    held_out = load_prompts(root / "tasks" / "prompts-test.jsonl").items
    assert len(held_out) == 40 and not {p.prompt[0]["content"] for p in held_out} & train_prompts
    assert summary["stop_reason"] == "max_steps"
    records = [json.loads(line) for line in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and summary["best_val_loss"] < 0.1 and val[-1] < 0.5 * val[0], val
    model, state = load_model_from_checkpoint(root / "sft" / "best")
    tok = load_checkpoint_tokenizer(root / "sft" / "best", state)
    assert "<|im_end|>" in tok.special_tokens  # the checkpoint carries the chat tokenizer
    unseen = exact_match(model, tok, held_out, max_tokens=10)
    assert unseen["ended_with_end_of_turn"] >= 0.95 and unseen["exact_match"] >= 0.9, unseen


def test_without_end_of_turn_in_the_mask_replies_never_stop(setup, tmp_path):
    """The classic SFT bug, reproduced: the same run with <|im_end|> left out of the loss mask
    learns the answers but not to stop."""
    sft(
        {
            "base": str(setup / "base"),
            "data": str(setup / "tasks" / "sft-train.jsonl"),
            "learn_end_of_turn": False,
            "val_data": str(setup / "tasks" / "sft-test.jsonl"),
        },
        run(out_dir=str(tmp_path / "bug")),
        progress=False,
    )
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer

    model, state = load_model_from_checkpoint(tmp_path / "bug" / "best")
    tok = load_checkpoint_tokenizer(tmp_path / "bug" / "best", state)
    prompts = load_prompts(setup / "tasks" / "prompts-train.jsonl").items[:40]
    assert exact_match(model, tok, prompts, max_tokens=6)["ended_with_end_of_turn"] <= 0.2


def test_lora_sft_checkpoints_are_plain_models_and_resume_exactly(setup, tmp_path):
    data = {"base": str(setup / "base"), "data": str(setup / "tasks" / "sft-train.jsonl"), "lora_rank": 4}
    straight = tmp_path / "straight"
    sft(data, run(out_dir=str(straight), max_steps=20, eval_interval=10), progress=False)
    split = tmp_path / "split"
    sft(data, run(out_dir=str(split), max_steps=10, eval_interval=10), progress=False)
    sft(data, run(out_dir=str(split), max_steps=20, eval_interval=10), resume=True, progress=False)

    def losses(folder):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert losses(split) == losses(straight)
    assert (straight / "last" / "adapters.safetensors").stat().st_size < 0.2 * (
        straight / "last" / "model.safetensors"
    ).stat().st_size
    model, _ = load_model_from_checkpoint(straight / "last")  # merged weights: an ordinary GPT
    assert not any("lora" in name for name in model.state_dict())
    base, _ = load_model_from_checkpoint(setup / "base")
    changed = [
        n
        for n, p in model.state_dict().items()
        if n in base.state_dict()
        and p.shape == base.state_dict()[n].shape
        and not torch.equal(p, base.state_dict()[n])
    ]
    assert changed and all(
        n.endswith(("qkv.weight", "proj.weight", "up.weight", "gate.weight", "down.weight")) for n in changed
    )  # only the adapted matrices moved


def test_cli_sft_reports_exact_match_before_and_after(setup, tmp_path, capsys):
    from scratchlm.cli import main

    tasks = setup / "tasks"
    assert (
        main(
            [
                "sft",
                "--checkpoint",
                str(setup / "base"),
                "--data",
                str(tasks / "sft-train.jsonl"),
                "--out",
                str(tmp_path / "run"),
                "--eval-prompts",
                str(tasks / "prompts-test.jsonl"),
                "--set",
                "train.max_steps=5",
                "--set",
                "train.eval_interval=5",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    em = summary["exact_match"]
    assert em["before"]["n"] == em["after"]["n"] == 6 and summary["steps"] == 5
    assert (
        main(
            [
                "sft",
                "--checkpoint",
                str(setup / "base"),
                "--data",
                str(tasks / "sft-train.jsonl"),
                "--out",
                str(tmp_path / "x"),
                "--set",
                "model.n_layer=3",
            ]
        )
        == 2
    )
    assert "sft.key=value or train.key=value" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text((tasks / "sft-train.jsonl").read_text() + "{broken\n")
    assert (
        main(["sft", "--checkpoint", str(setup / "base"), "--data", str(bad), "--out", str(tmp_path / "y")])
        == 2
    )
    assert "bad.jsonl, line 81" in capsys.readouterr().err


def test_lora_sft_learns_to_stop_and_its_adapters_merge_into_the_base(setup, tmp_path, capsys):
    """The chat tokens' rows train under LoRA (frozen, <|im_end|> could never win); the adapters a
    run saves merge into the base with the CLI, refused on any other base."""
    from scratchlm.cli import main
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer

    run_dir = tmp_path / "lora"
    sft(
        {"base": str(setup / "base"), "data": str(setup / "tasks" / "sft-train.jsonl"), "lora_rank": 8},
        run(out_dir=str(run_dir), lr=1e-2),
        progress=False,
    )
    model, state = load_model_from_checkpoint(run_dir / "last")
    tok = load_checkpoint_tokenizer(run_dir / "last", state)
    prompts = load_prompts(setup / "tasks" / "prompts-train.jsonl").items[:40]
    assert exact_match(model, tok, prompts, max_tokens=6)["ended_with_end_of_turn"] >= 0.9
    assert (
        main(
            [
                "lora",
                "merge",
                "--checkpoint",
                str(setup / "base"),
                "--adapters",
                str(run_dir / "last" / "adapters.safetensors"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged, merged_state = load_model_from_checkpoint(tmp_path / "merged")
    assert load_checkpoint_tokenizer(tmp_path / "merged", merged_state).fingerprint == tok.fingerprint
    x = torch.tensor([tok.encode_ordinary("12+3=")])
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)
    other = GPT(GPTConfig(**{**model.config.to_dict(), "vocab_size": tok.vocab_size - 2}))
    save_model_only(
        tmp_path / "other",
        other,
        tokenizer=CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz", ["<|endoftext|>"]),
    )
    capsys.readouterr()
    assert (
        main(
            [
                "lora",
                "merge",
                "--checkpoint",
                str(tmp_path / "other"),
                "--adapters",
                str(run_dir / "last" / "adapters.safetensors"),
                "--out",
                str(tmp_path / "wrong"),
            ]
        )
        == 2
    )
    assert "trained on another base" in capsys.readouterr().err


def test_the_loss_weighs_every_answer_token_alike_whatever_grad_accum(setup, tmp_path):
    """One step of 16 conversations, or two micro-batches of 8: the same batch, the same objective."""
    data = {"base": str(setup / "base"), "data": str(setup / "tasks" / "sft-train.jsonl")}

    def first_losses(name, **train):
        sft(
            data,
            run(
                out_dir=str(tmp_path / name),
                max_steps=3,
                eval_interval=3,
                log_interval=1,
                warmup_steps=0,
                **train,
            ),
            progress=False,
        )
        return [
            r["loss"]
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    whole = first_losses("whole", batch_size=16)
    accumulated = first_losses("accumulated", batch_size=8, grad_accum=2)
    assert whole == pytest.approx(accumulated, rel=1e-4, abs=1e-5)


def test_resuming_lora_on_another_base_is_refused(setup, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(setup / "base", base)
    data = {"base": str(base), "data": str(setup / "tasks" / "sft-train.jsonl"), "lora_rank": 4}
    sft(data, run(out_dir=str(tmp_path / "run"), max_steps=4, eval_interval=4), progress=False)
    model, _ = load_model_from_checkpoint(base)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(0.01)
    shutil.rmtree(base)
    save_model_only(
        base,
        model,
        tokenizer=CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz", ["<|endoftext|>"]),
    )
    with pytest.raises(ValueError, match="not the one this run started from"):
        sft(
            data,
            run(out_dir=str(tmp_path / "run"), max_steps=8, eval_interval=4),
            resume=True,
            progress=False,
        )


@pytest.mark.parametrize(
    "position,attention",
    [
        ("rope", "sdpa"),
        ("rope", "manual"),
        ("learned", "sdpa"),
        ("alibi", "manual"),
        ("alibi", "sdpa"),
        ("sinusoidal", "sdpa"),
    ],
)
def test_a_packed_row_computes_each_conversation_as_if_alone(position, attention):
    """Packing's guarantee: attention never crosses a document boundary and positions restart,
    so the logits of packed rows (two rows, laid out differently) equal those of their documents
    run one by one, and so do the gradients of the summed loss."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=30,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            block_size=24,
            position=position,
            attention=attention,
        )
    )
    docs = [torch.randint(30, (1, n)) for n in (5, 3, 7, 9, 6)]
    rows = torch.cat(
        [
            torch.cat(docs[:3] + [torch.zeros(1, 2, dtype=torch.long)], dim=1),
            torch.cat(docs[3:] + [torch.zeros(1, 2, dtype=torch.long)], dim=1),
        ]
    )
    documents = torch.tensor(
        [
            [0] * 5 + [1] * 3 + [2] * 7 + [-1] * 2,  # two padding positions at the end
            [0] * 9 + [1] * 6 + [-1] * 2,
        ]
    )
    together = model(rows, documents=documents)[0]
    alone = [model(d)[0] for d in docs]
    assert torch.allclose(together[0, :15], torch.cat(alone[:3], dim=1)[0], atol=1e-5)
    assert torch.allclose(together[1, :15], torch.cat(alone[3:], dim=1)[0], atol=1e-5)
    grads = []
    for loss in (together[:, :15].sum(), sum(a.sum() for a in alone)):
        model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)
    # Without the document mask the later conversations do see the earlier ones.
    with torch.no_grad():
        assert not torch.allclose(model(rows)[0][0, 5:15], torch.cat(alone[1:3], dim=1)[0], atol=1e-3)


def test_a_document_id_that_comes_back_starts_a_new_document():
    from scratchlm.models.gpt import packing

    positions, mask = packing(torch.tensor([[0, 0, 1, 1, 0, 0]]))
    assert positions.tolist() == [[0, 1, 0, 1, 0, 1]]
    assert not mask[0, 0, 4, :4].any() and mask[0, 0, 5, 4:6].all()  # the third run sees only itself
    model = GPT(GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, block_size=8))
    with pytest.raises(ValueError, match="packed row of 9 positions exceeds the context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long), documents=torch.zeros(1, 9, dtype=torch.long))


def test_collate_packed_keeps_every_target_inside_its_conversation():
    from scratchlm.posttrain.sft import collate_packed

    a, b = ([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1])
    x, y, m, d = collate_packed([[a, b], [b]], pad_id=9)
    assert x[0].tolist() == [1, 2, 3, 5, 6] and y[0].tolist() == [2, 3, 4, 6, 7]  # no 4 -> 5 target
    assert m[0].tolist() == [0, 1, 1, 1, 1] and d[0].tolist() == [0, 0, 0, 1, 1]
    assert (
        x[1].tolist() == [5, 6, 9, 9, 9]
        and y[1].tolist() == [6, 7, -1, -1, -1]
        and d[1].tolist() == [0, 0, -1, -1, -1]
    )


def test_sft_with_packing_learns_and_fills_its_windows(setup, tmp_path):
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, read_state
    from scratchlm.posttrain.sft import SFTConfig, SFTTrainer
    from scratchlm.train.config import TrainConfig

    # A base with a 96-token context: three of these ~25-token conversations fit in a row.
    tok = load_checkpoint_tokenizer(setup / "base", read_state(setup / "base"))
    torch.manual_seed(0)
    base = GPT(
        GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, block_size=96, position="rope")
    )
    save_model_only(tmp_path / "base", base, tokenizer=tok)
    data = str(setup / "tasks" / "sft-train.jsonl")
    # The same steps and rows, packed or not (packed rows carry about three times the
    # conversations): packing learns at least as well; that it computes the right thing is the
    # test above.
    best = {}
    for packing in (False, True):
        summary = sft(
            {"base": str(tmp_path / "base"), "data": data, "val_data": data, "packing": packing},
            run(out_dir=str(tmp_path / f"packed-{packing}"), max_steps=150, eval_interval=150, batch_size=8),
            progress=False,
        )
        best[packing] = summary["best_val_loss"]
    assert summary["steps"] == 150 and best[True] < 1.02 * best[False] and best[True] < 1.0, best
    trainer = SFTTrainer(
        SFTConfig(base=str(tmp_path / "base"), data=data, packing=True),
        TrainConfig(data="", out_dir=str(tmp_path / "look"), batch_size=4),
        progress=False,
    )
    x, y, mask, documents = trainer.train_loader.get_batch()
    trainer.lock.release()
    assert (documents.max(dim=1).values >= 2).all()  # every row holds three conversations
    assert (y >= 0).float().mean() > 0.7  # and little padding
    with pytest.raises(ValueError, match="dpo.packing is an SFT option"):
        from scratchlm.posttrain.dpo import dpo

        dpo(
            {
                "base": str(setup / "base"),
                "data": str(setup / "tasks" / "pairs-train.jsonl"),
                "packing": True,
            },
            {"out_dir": str(tmp_path / "dpo")},
            progress=False,
        )


def test_sft_of_a_mixture_of_experts_keeps_its_balancing_loss(setup, tmp_path):
    """SFT builds its loss from logits (no targets to GPT.forward), so the trainer adds the blocks'
    auxiliary losses itself: with a large balancing weight the first logged loss exceeds the same
    run's without it by the weight times the (positive) balance loss, and the router trains."""
    from scratchlm.models.checkpoint import save_model_only as save

    tok = CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz", ["<|endoftext|>"])
    first = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        base = GPT(
            GPTConfig(
                vocab_size=tok.vocab_size,
                n_layer=2,
                n_head=4,
                d_model=32,
                block_size=48,
                position="rope",
                norm="rmsnorm",
                mlp="swiglu",
                bias=False,
                layers=["attention+moe"],
                moe={"n_experts": 4, "top_k": 2, "aux_weight": weight},
            )
        )
        save(tmp_path / f"base{weight}", base, tokenizer=tok)
        out = tmp_path / f"sft{weight}"
        sft(
            {"base": str(tmp_path / f"base{weight}"), "data": str(setup / "tasks" / "sft-train.jsonl")},
            run(out_dir=str(out), max_steps=2, eval_interval=2, log_interval=1),
            progress=False,
        )
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first[weight] = next(r["loss"] for r in records if "loss" in r and "val_loss" not in r)
    # the aux loss is E·Σ f·P >= 1 per MoE layer (2 layers): weight 5 adds at least 10
    assert first[5.0] - first[0.0] > 9.0, first
