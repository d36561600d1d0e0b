"""Post-training: from a base model to an assistant (issue 8).

* :mod:`scratchlm.posttrain.tasks`: synthetic tasks checked exactly (addition, counting, ...);
* :mod:`scratchlm.posttrain.data`: SFT conversations, preference pairs and verifiable prompts
  from JSONL, and the task data writer.

The chat template and loss mask live in :mod:`scratchlm.tokenizers.chat` (the server and the
engine need them too).
"""
