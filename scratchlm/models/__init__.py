"""Language models, from the bigram baselines to one config-driven Transformer and its block kinds.

A map of the package, in reading order:

* ``bigram.py`` — the count and neural bigram baselines (checkpoint A) and their runner.
* ``gpt.py`` — the GPT: embeddings, the stack of blocks, the output head, forward, accounting.
* ``config.py`` — ``GPTConfig`` and the rules its values obey; ``presets.py`` — named shapes.
* ``block.py`` — ``Block`` (a mixer then an MLP) and the registry of the kinds a layer can pick.
* ``layers.py`` — norms, position tables (sinusoidal, RoPE, ALiBi) and the dense MLP.
* ``blocks/`` — the block kinds, each with its settings table: attention (and FlashAttention's
  tiled form), mixture of experts, multi-head latent attention, differential and native sparse
  attention, the Mamba state-space mixer, multi-token prediction.
* ``hf/`` — Hugging Face import and export, one module per family and one table of them.
* ``loss.py`` — per-token cross-entropy for evaluation and masked fine-tuning.
* ``inspect.py`` — traced tensor shapes and inference cost estimates.
* ``checkpoint.py`` — reading checkpoints (inference never imports ``train/``).
"""

from scratchlm.models.bigram import CountBigram, NeuralBigram, bigram_pairs, sample_bigram

__all__ = ["CountBigram", "NeuralBigram", "bigram_pairs", "sample_bigram"]
