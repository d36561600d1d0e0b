"""What can go wrong with a request, as exception types a server maps to HTTP statuses.

* :class:`InvalidRequestError` (a ``ValueError``): the request itself is wrong — a sampling value out
  of range, a prompt that fills the context, an unknown token id. ``param`` names the field (as the
  OpenAI API's error object does); a server answers 400. Nothing was queued.
* :class:`EngineOverloaded`: the engine's waiting queue is full (``EngineConfig.max_waiting``); the
  request was fine and may be sent again later; a server answers 503 with ``Retry-After``.
* :class:`RequestFailed`: a request that was admitted could not finish (the model produced NaN
  logits for it, its tokenizer could not decode a token). Only that request fails; a server
  answers 500. Errors are raised, never reported as a ``finish_reason``.
* :class:`EngineUnhealthy`: the engine cannot serve anyone (its thread stopped, it was shut down,
  or its steps keep failing); a server's health check answers 503.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineOverloaded(RuntimeError):
    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after  # seconds: a hint for Retry-After


class RequestFailed(RuntimeError):
    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class EngineUnhealthy(RuntimeError):
    pass
