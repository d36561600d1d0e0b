"""The measured post-training path (issue 8, section 8), on a CPU, from nothing:

1. synthetic task data (``scratchlm tasks``): 2-digit additions, held-out test problems;
2. a base model pretrained on the training problems as plain text ("12+30=42"): it knows
   addition but has never seen the chat format;
3. SFT (full, and LoRA) on the same problems as conversations;
4. exact match on the held-out problems, asked in the chat format, before and after, and the
   fraction of replies that end with <|im_end|>.

    python benchmarks/posttrain.py [--quick]      # -> benchmarks/results/posttrain.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import save


def main() -> None:
    import torch

    from scratchlm.data import prepare_dataset
    from scratchlm.data.shards import tokenize_dataset
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
    from scratchlm.posttrain.data import load_prompts, write_task_data
    from scratchlm.posttrain.sft import exact_match, sft
    from scratchlm.tokenizers import train_tokenizer
    from scratchlm.tokenizers.chat import add_chat_tokens
    from scratchlm.train import train

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer steps: a smoke run")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="with --out: keep the finished training runs found there "
                   "(their times are read from their metrics.jsonl) and redo only what is missing")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.out or tempfile.mkdtemp())
    pretrain_steps, sft_steps, dpo_steps = (300, 100, 40) if args.quick else (3000, 1000, 200)
    results: dict = {"task": "addition, 2 digits", "steps": {"pretrain": pretrain_steps, "sft": sft_steps, "dpo": dpo_steps}}

    start = time.perf_counter()
    write_task_data(work / "tasks", ["addition"], train=5000, test=200, difficulty=2)
    ds, _ = prepare_dataset(str(work / "tasks" / "corpus-train.txt"), work / "corpus", documents="lines")
    texts = list(ds.documents("train"))
    tok = train_tokenizer("char", texts + ["abcdefghijklmnopqrstuvwxyz\n "], special_tokens=["<|endoftext|>"])
    tok.save(work / "char.json")
    shards = tokenize_dataset(ds, work / "char.json")["path"]
    results["seconds_data"] = time.perf_counter() - start

    def finished(run: Path):
        """A finished run in --out, reused: (its summary, its training seconds), else None."""
        if not (args.reuse and (run / "best").exists()):
            return None
        import json

        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return ({"best_val_loss": min(r["val_loss"] for r in records if "val_loss" in r)}, records[-1]["seconds"])

    start = time.perf_counter()
    reused = finished(work / "base")
    base = reused[0] if reused else train({"model": {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 64, "position": "rope",
                            "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "dropout": 0.0},
                  "train": {"data": shards, "out_dir": str(work / "base"), "batch_size": 32, "max_steps": pretrain_steps,
                            "eval_interval": pretrain_steps // 4, "warmup_steps": 100, "lr": 3e-3, "min_lr": 3e-4,
                            "sample_tokens": 0, "log_interval": 100}}, progress=False)
    results["seconds_pretrain"] = reused[1] if reused else time.perf_counter() - start
    results["base_val_loss"] = base["best_val_loss"]

    prompts = load_prompts(work / "tasks" / "prompts-test.jsonl").items
    model, state = load_model_from_checkpoint(work / "base" / "best")
    chat_tok = add_chat_tokens(load_checkpoint_tokenizer(work / "base" / "best", state))
    model.grow_vocab(chat_tok.vocab_size)
    results["before"] = exact_match(model, chat_tok, prompts, max_tokens=8)
    print(f"base: exact match {results['before']['exact_match']:.1%} in the chat format")

    for name, extra in (("full", {}), ("lora", {"lora_rank": 8}), ("no_end_of_turn", {"learn_end_of_turn": False})):
        start = time.perf_counter()
        reused = finished(work / f"sft-{name}")
        summary = reused[0] if reused else sft(
            {"base": str(work / "base" / "best"), "data": str(work / "tasks" / "sft-train.jsonl"),
             "val_data": str(work / "tasks" / "sft-test.jsonl"), **extra},
            {"out_dir": str(work / f"sft-{name}"), "max_steps": sft_steps, "eval_interval": sft_steps // 4,
             "batch_size": 32, "lr": 1e-3 if name != "lora" else 3e-3}, progress=False)
        seconds = reused[1] if reused else time.perf_counter() - start
        model, state = load_model_from_checkpoint(work / f"sft-{name}" / "best")
        tuned_tok = load_checkpoint_tokenizer(work / f"sft-{name}" / "best", state)
        after = exact_match(model, tuned_tok, prompts, max_tokens=8)
        results[f"sft_{name}"] = {**after, "seconds": seconds, "best_val_loss": summary["best_val_loss"]}
        print(f"SFT {name}: exact match {after['exact_match']:.1%}, replies ending with <|im_end|> "
              f"{after['ended_with_end_of_turn']:.1%}, {seconds:.0f} s")
    # DPO from the full SFT model on correct-vs-wrong pairs; held-out pairs for the preference accuracy.
    from scratchlm.posttrain.dpo import dpo

    import json

    for name, extra in (("dpo", {}), ("dpo_rpo", {"rpo_alpha": 1.0})):
        start = time.perf_counter()
        dpo({"base": str(work / "sft-full" / "best"), "data": str(work / "tasks" / "pairs-train.jsonl"),
             "val_data": str(work / "tasks" / "pairs-test.jsonl"), **extra},
            {"out_dir": str(work / name), "max_steps": dpo_steps, "eval_interval": dpo_steps // 2, "lr": 1e-4,
             "batch_size": 32}, progress=False)
        seconds = time.perf_counter() - start
        evals = [r for r in map(json.loads, (work / name / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
        model, state = load_model_from_checkpoint(work / name / "last")
        after = exact_match(model, load_checkpoint_tokenizer(work / name / "last", state), prompts, max_tokens=8)
        results[name] = {**after, "seconds": seconds,
                         "preference_accuracy_before": evals[0]["val_reference_preference_accuracy"],
                         "preference_accuracy_after": evals[-1]["val_preference_accuracy"],
                         "rewards/accuracies": evals[-1]["val_rewards/accuracies"],
                         "rewards/margins": evals[-1]["val_rewards/margins"], "val_loss": evals[-1]["val_loss"]}
        d = results[name]
        print(f"{name}: held-out preference accuracy {d['preference_accuracy_before']:.1%} -> "
              f"{d['preference_accuracy_after']:.1%}, exact match {after['exact_match']:.1%}, {seconds:.0f} s")
    print(f"wrote {save('posttrain', results)}")


if __name__ == "__main__":
    main()
