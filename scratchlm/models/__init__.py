"""Language models: the bigram baselines (checkpoint A); the Transformer comes next."""

from scratchlm.models.bigram import CountBigram, NeuralBigram, bigram_pairs, sample_bigram

__all__ = ["CountBigram", "NeuralBigram", "bigram_pairs", "sample_bigram"]
