"""How good is a language model on held-out text?

* **Cross-entropy** (nats per token): the mean of ``-log p(true next token)``. The number training
  minimizes.
* **Perplexity** = ``exp(cross-entropy)``: the model is as uncertain as a uniform choice among
  that many tokens. Only comparable between models with the same tokenizer.
* **Bits per byte** = total nats / ln 2 / bytes of text: the same quantity per byte of text, so a
  character model and a BPE model can be compared.
* **Loss by position** in the context window: early positions see little context and cost more;
  the curve shows how much the model uses its context.
* **Probes**: top-1 accuracy on kinds of next tokens: finishing a word it has begun
  (common-word completion), punctuation, and line breaks.

Text is cut into consecutive windows of ``block_size`` targets, so every token (after the first)
is predicted exactly once.
"""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import numpy as np
import torch

from scratchlm.config import Rule
from scratchlm.data.shards import open_shard, verify_shards
from scratchlm.generate.tokenizer import checkpoint_tokenizer
from scratchlm.models.loss import token_nll
from scratchlm.tokenizers.chat import moved_ids

BATCH_SIZE = Rule(type=int, min=1, why="windows per forward pass")


def _token_classes(tokenizer) -> dict[str, np.ndarray]:
    """For each probe, a boolean mask over the vocabulary of target tokens that belong to it."""
    V = tokenizer.vocab_size
    texts = []
    for i in range(V):
        try:
            texts.append(tokenizer.decode([i]))
        except (ValueError, KeyError):
            texts.append("")
    starts_letter = np.array([bool(t) and t[0].isalpha() for t in texts])
    ends_letter = np.array([bool(t) and t[-1].isalpha() for t in texts])
    punctuation = np.array(
        [bool(t.strip()) and all(unicodedata.category(c).startswith("P") for c in t.strip()) for t in texts]
    )
    newline = np.array(["\n" in t for t in texts])
    return {
        "starts_letter": starts_letter,
        "ends_letter": ends_letter,
        "punctuation": punctuation,
        "newline": newline,
    }


@torch.no_grad()
def evaluate_ids(model, ids: np.ndarray, tokenizer, *, batch_size: int = 32, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    BATCH_SIZE.require(batch_size, "batch_size")
    device = next(model.parameters()).device
    T = model.config.block_size
    n_windows = (len(ids) - 1) // T
    if n_windows == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one context window of {T} + 1")
    classes = _token_classes(tokenizer)
    loss_sum = np.zeros(T)
    correct = dict.fromkeys(("all", "word_completion", "punctuation", "line_break"), 0)
    counted = dict.fromkeys(correct, 0)
    was_training = model.training
    model.eval()
    for first in tqdm(range(0, n_windows, batch_size), desc="evaluating", disable=not progress):
        rows = range(first, min(first + batch_size, n_windows))
        windows = torch.from_numpy(np.stack([ids[r * T : r * T + T + 1] for r in rows]).astype(np.int64)).to(
            device
        )
        x, y = windows[:, :-1], windows[:, 1:]
        logits, _ = model(x)
        nll = token_nll(logits, y)  # (B, T)
        loss_sum += nll.sum(0).double().cpu().numpy()
        hit = (logits.argmax(-1) == y).cpu().numpy()
        del logits
        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        masks = {
            "all": np.ones_like(hit),
            "word_completion": classes["ends_letter"][xs] & classes["starts_letter"][ys],
            "punctuation": classes["punctuation"][ys],
            "line_break": classes["newline"][ys],
        }
        for k, mask in masks.items():
            correct[k] += int((hit & mask).sum())
            counted[k] += int(mask.sum())
    model.train(was_training)
    n_tokens = n_windows * T
    mean = float(loss_sum.sum() / n_tokens)
    # The bytes of the predicted text: special tokens (document separators) are not text, 0 bytes.
    n_bytes = len(tokenizer.decode_bytes(ids[1 : n_tokens + 1], skip_special=True))
    if n_bytes == 0:
        raise ValueError(
            "the evaluated tokens hold no text bytes (only special tokens): bits per byte is undefined"
        )
    return {
        "tokens": n_tokens,
        "bytes": n_bytes,
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_byte": float(loss_sum.sum()) / math.log(2) / n_bytes,
        "loss_by_position": (loss_sum / n_windows).tolist(),
        "probes": {
            k: {"accuracy": correct[k] / counted[k] if counted[k] else None, "count": counted[k]}
            for k in correct
        },
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    splits=("val", "test"),
    device: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Evaluate a checkpoint on splits of a shards folder; ``"val+test"`` joins two splits into one text."""
    from scratchlm.device import pick_device
    from scratchlm.models.checkpoint import load_model_from_checkpoint
    from scratchlm.tokenizers import load_tokenizer

    BATCH_SIZE.require(batch_size, "batch_size")
    model, state = load_model_from_checkpoint(checkpoint, pick_device(device))
    data = Path(data) if data is not None else trained_shards(checkpoint, state)
    shards_tokenizer = load_tokenizer(data / "tokenizer.json")
    # The model's tokenizer: the shards', or a chat model's grown from its base's (the shards' ids
    # then move where the chat tokens moved them).
    tokenizer = checkpoint_tokenizer(
        checkpoint,
        state,
        shards_tokenizer,
        source=f"the tokenizer of {data}",
        fix="evaluate on shards made with the model's tokenizer (scratchlm data tokenize --tokenizer ...)",
    )
    moves = moved_ids(shards_tokenizer, tokenizer) if tokenizer is not shards_tokenizer else {}
    report = {"checkpoint": str(checkpoint), "data": str(data), "step": state["step"], "splits": {}}
    # A complete shards set (shards.json written last) whose files are as they were written.
    verify_shards(data, shards_tokenizer, splits={part for split in splits for part in split.split("+")})
    for split in splits:
        ids = np.concatenate(
            [np.asarray(open_shard(data / f"{part}.bin", shards_tokenizer)) for part in split.split("+")]
        )
        if moves:
            index = np.arange(shards_tokenizer.vocab_size, dtype=np.int64)
            index[list(moves)] = list(moves.values())
            ids = index[ids]
        report["splits"][split] = evaluate_ids(
            model, ids, tokenizer, batch_size=batch_size, progress=progress
        )
    return report


def trained_shards(checkpoint: str | Path, state: dict) -> Path:
    """The token shards a checkpoint was trained on, where it was pretrained on shards; a post-trained
    checkpoint (trained on conversations, a JSONL) or an imported one has none to default to."""
    if not state.get("train"):
        raise ValueError(
            f"{checkpoint} was imported, not trained here: pass the shards folder to evaluate on (--shards DIR)"
        )
    if state.get("method"):
        raise ValueError(
            f"{checkpoint} was trained on conversations ({state['method']} on {state['train']['data']}), not "
            "on token shards: pass --shards DIR (a folder from `scratchlm data tokenize`, e.g. its base's) "
            "to evaluate it on"
        )
    return Path(state["train"]["data"])


def format_report(report: dict) -> str:
    lines = [f"{report['checkpoint']} (step {report['step']}) on {report['data']}"]
    for split, r in report["splits"].items():
        by_pos = r["loss_by_position"]
        probes = "  ".join(
            f"{k} {v['accuracy']:.1%}" for k, v in r["probes"].items() if v["accuracy"] is not None
        )
        lines += [
            f"  {split}: loss {r['loss']:.4f} nats/token  perplexity {r['perplexity']:.2f}  "
            f"bits/byte {r['bits_per_byte']:.4f}  ({r['tokens']:,} tokens)",
            f"    loss at position 0 / {len(by_pos) // 2} / {len(by_pos) - 1}: "
            f"{by_pos[0]:.3f} / {by_pos[len(by_pos) // 2]:.3f} / {by_pos[-1]:.3f}",
            f"    top-1 accuracy: {probes}",
        ]
    return "\n".join(lines)
