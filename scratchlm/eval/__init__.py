"""Evaluation: cross-entropy, perplexity, bits per byte, loss by position, simple probes."""

from scratchlm.eval.perplexity import evaluate_checkpoint, evaluate_ids, format_report

__all__ = ["evaluate_checkpoint", "evaluate_ids", "format_report"]
