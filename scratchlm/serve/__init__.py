"""The inference engine (checkpoint E): paged KV cache, continuous batching, prefix caching.

One job per file: :mod:`~scratchlm.serve.sequence` (a request's state),
:mod:`~scratchlm.serve.block_manager` (which block holds what; prefix caching),
:mod:`~scratchlm.serve.scheduler` (who runs each step; chunked prefill; preemption),
:mod:`~scratchlm.serve.paged_attention` (attention through block tables),
:mod:`~scratchlm.serve.runner` (the model on one step's tokens), :mod:`~scratchlm.serve.sampler`
(per-request sampling), :mod:`~scratchlm.serve.engine` (the loop; ``LLM``), and
:mod:`~scratchlm.serve.async_engine` (streaming, for servers).
"""

from scratchlm.serve.engine import LLM, CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from scratchlm.serve.errors import EngineOverloaded, EngineUnhealthy, InvalidRequestError, RequestFailed
from scratchlm.serve.params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineOverloaded",
    "EngineUnhealthy",
    "InvalidRequestError",
    "LLMEngine",
    "RequestFailed",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]
