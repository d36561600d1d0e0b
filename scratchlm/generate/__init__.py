"""Inference: logit processors, the KV cache, generation and beam search (checkpoints D and E)."""

from scratchlm.generate.generate import TextStream, beam_search, generate, generate_text, stream
from scratchlm.generate.kv_cache import KVCache
from scratchlm.generate.sampling import SamplingConfig, choose, process_logits
from scratchlm.generate.stats import GenerationStats

__all__ = [
    "GenerationStats",
    "KVCache",
    "SamplingConfig",
    "TextStream",
    "beam_search",
    "choose",
    "generate",
    "generate_text",
    "process_logits",
    "stream",
]
