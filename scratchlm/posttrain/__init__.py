"""Post-training: from a base model to an assistant.

* :mod:`scratchlm.posttrain.tasks`: synthetic tasks checked exactly (addition, counting, ...);
* :mod:`scratchlm.posttrain.data`: SFT conversations, preference pairs and verifiable prompts
  from JSONL, the held-out split, and the task data writer;
* :mod:`scratchlm.posttrain.base`: the chat trainer every method derives from (chat tokenizer,
  grown vocabulary, LoRA, adapter checkpoints, shared settings);
* the methods, siblings over it: :mod:`~scratchlm.posttrain.sft` (supervised fine-tuning, with
  :mod:`~scratchlm.posttrain.lora`), :mod:`~scratchlm.posttrain.dpo` (Rafailov et al., 2023) and
  :mod:`~scratchlm.posttrain.reward` (Bradley–Terry reward model) over the pairs of
  :mod:`~scratchlm.posttrain.pairs`, and :mod:`scratchlm.posttrain.rl` (PPO, GRPO);
* :mod:`scratchlm.posttrain.critique`: Constitutional AI's critique-revise loop;
* :mod:`scratchlm.posttrain.evaluate`: exact match on prompts with answers.

The chat template and loss mask live in :mod:`scratchlm.tokenizers.chat`, and replies through
the engine in :mod:`scratchlm.serve.chat` (the server and evaluation need them too).
"""
