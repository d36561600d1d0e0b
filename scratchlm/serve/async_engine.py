"""The engine for servers: async, streaming, many clients at once.

    engine = AsyncLLMEngine(LLMEngine.from_checkpoint(path))
    params = SamplingParams(max_tokens=50, output_kind=RequestOutputKind.DELTA)
    async for out in engine.generate("ROMEO:", params):
        send(out.outputs[0].text)

The :class:`~scratchlm.serve.engine.LLMEngine` runs in one background thread that owns it: it
takes new requests and aborts from an inbox between steps, runs a step, and hands each request's
output to the :class:`RequestStream` of the coroutine that asked. The event loop never waits for a
model step, so a server stays responsive while the engine computes.

* **Tokenizing is the frontend's work.** :meth:`AsyncLLMEngine.generate` checks and tokenizes the
  prompt (``LLMEngine.make_request``) in a tokenizer thread of its own before handing the request
  over; the engine thread only queues it. A long prompt never stalls the running decodes, nor the
  event loop. (A chat server renders its template into token ids there too.)
* **Bounded streams.** A stream holds at most one output: a newer one is folded into it
  (:meth:`~scratchlm.serve.engine.RequestOutput.add`: a DELTA output's new tokens, text and
  logprobs are appended; a cumulative one replaces it). A client that stalls costs one output's
  memory, not one output per step.
* **Errors.** A bad request raises ``InvalidRequestError`` (a ``ValueError``) in its own
  ``generate`` call; a full waiting queue raises ``EngineOverloaded``; a request that fails while
  running raises ``RequestFailed`` in its consumer only. A consumer that stops listening (client
  gone, task cancelled) aborts its request, whose blocks are freed at once.
* **Health.** A step that raises fails the requests in it and the engine goes on; after
  ``unhealthy_after`` failed steps in a row (every request failing, the thread alive)
  :meth:`AsyncLLMEngine.check_health` raises ``EngineUnhealthy`` with the last error, as it does
  once the thread has stopped; one good step makes it healthy again.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

from scratchlm.serve.engine import LLMEngine, RequestOutput
from scratchlm.serve.errors import EngineUnhealthy, RequestFailed
from scratchlm.serve.params import RequestOutputKind, SamplingParams


class RequestStream:
    """One request's outputs on their way to its consumer, used on the consumer's event loop: at
    most one output (or the exception that ended the request) waits to be read."""

    def __init__(self, aggregate: bool):
        self.aggregate = aggregate  # DELTA outputs: fold by appending
        self.pending: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(self.pending, BaseException):
            return  # the request is over already
        if self.pending is None or isinstance(item, BaseException):
            self.pending = item
        else:
            self.pending.add(item, aggregate=self.aggregate)
        self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self.ready.wait()
        item, self.pending = self.pending, None
        self.ready.clear()
        return item


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, unhealthy_after: int = 3):
        if not isinstance(unhealthy_after, int) or unhealthy_after < 1:
            raise ValueError(f"unhealthy_after must be an integer >= 1, got {unhealthy_after!r}")
        self.engine = engine
        self.unhealthy_after = unhealthy_after  # failed steps in a row that make the engine unhealthy
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (event loop, stream) of the coroutine consuming it
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._thread: threading.Thread | None = None
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scratchlm-tokenize")
        self._closed = False
        self._lock = threading.Lock()  # orders "closed" against puts: no request is put after the last drain
        self.error: BaseException | None = None  # the exception that stopped the engine thread, if any
        self.last_step_error: BaseException | None = None  # the last failed step's (its requests failed)
        self.failed_steps = 0  # failed steps in a row

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (by its ``output_kind``); the last one has ``finished``.

        Raises ``InvalidRequestError`` for a bad request, ``EngineOverloaded`` when the waiting queue
        is full, ``RequestFailed`` if the request (or the step running it) fails, and
        ``EngineUnhealthy`` if the engine is shut down or stopped. An aborted request's last output
        has ``finish_reason == "abort"``.
        """
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        if self._closed:
            raise EngineUnhealthy(self._why_closed())
        # Check and tokenize here, off the engine thread (and off the event loop).
        request = await loop.run_in_executor(
            self._tokenizer, self.engine.make_request, prompt, params, request_id
        )
        stream = RequestStream(aggregate=request.params.output_kind is RequestOutputKind.DELTA)
        added: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineUnhealthy(self._why_closed())
            self._inbox.put(("add", (request, loop, stream), added))
            self._start()
        finished = False
        try:
            await asyncio.wrap_future(added)  # raises the request's refusal, if any
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                if out.error is not None:
                    finished = True
                    raise out.error
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away (or never got its answer): free the request
                # Only this call's request: another request may use the same id after a refusal.
                self._inbox.put(("abort", (request_id, stream), None))

    def abort(self, request_id: str) -> None:
        """Stop a request; its consumer gets a last output with ``finish_reason == "abort"``.

        Requests are matched by id when the engine thread reads the abort: an abort sent before the
        request itself was submitted (its ``generate`` not yet started) finds nothing to stop."""
        self._inbox.put(("abort", (request_id, None), None))

    @property
    def healthy(self) -> bool:
        try:
            self.check_health()
        except EngineUnhealthy:
            return False
        return True

    def check_health(self) -> None:
        """Raise ``EngineUnhealthy`` saying why if the engine cannot serve: stopped, shut down, or
        its last ``unhealthy_after`` steps all failed."""
        if self._closed or (self._thread is not None and not self._thread.is_alive()):
            raise EngineUnhealthy(self._why_closed())
        if self.failed_steps >= self.unhealthy_after:
            raise EngineUnhealthy(
                f"the last {self.failed_steps} engine steps failed; the last with {self.last_step_error!r}"
            )

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight get ``EngineUnhealthy``."""
        with self._lock:
            self._closed = True
        self._inbox.put(("stop", None, None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._tokenizer.shutdown(wait=False)

    async def shutdown_async(self) -> None:
        """:meth:`shutdown` without blocking the event loop while the current step finishes."""
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # --- the engine thread ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: nobody may wait forever
            self.error = e
        with self._lock:
            self._closed = True
        error = EngineUnhealthy(self._why_closed())
        # Whoever is still waiting (listening, or with an add not yet answered) learns it is over,
        # and the engine is left empty (every block free), whatever stopped the loop.
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort(request_id)
            except Exception:  # a broken engine must not keep the consumers waiting
                break
        for loop, listener in list(self._listeners.values()):
            self._send(loop, listener, error)
        self._listeners.clear()
        while True:
            try:
                kind, payload, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add" and future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _why_closed(self) -> str:
        return (
            "the engine is shut down"
            if self.error is None
            else f"the engine stopped after an error: {self.error!r}"
        )

    def _loop(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()  # idle: sleep until something arrives
            while True:
                try:
                    kind, payload, future = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    return
                if kind == "add":
                    self._add(payload, future)
                elif kind == "abort":
                    self._abort(*payload)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug or out of memory: fail every request, keep the thread alive
                self.last_step_error = e
                self.failed_steps += 1
                failure = RequestFailed(f"the engine step failed: {e!r}")
                failure.__cause__ = e
                for request_id, (loop, listener) in list(self._listeners.items()):
                    engine.abort(request_id)
                    self._send(loop, listener, failure)
                self._listeners.clear()
                for request_id in list(engine.requests):  # any added without a listener (none, normally)
                    engine.abort(request_id)
                continue
            self.failed_steps = 0
            for out in outputs:
                target = self._listeners.get(out.request_id)
                if target is None:
                    continue
                if out.finished:
                    del self._listeners[out.request_id]
                if not self._send(*target, out):  # that event loop is closed: nobody is listening
                    engine.abort(out.request_id)
                    self._listeners.pop(out.request_id, None)

    def _add(self, payload, future: Future) -> None:
        if not future.set_running_or_notify_cancel():  # the caller was cancelled while waiting
            return
        request, loop, stream = payload
        try:
            self.engine.enqueue(request)
        except Exception as e:  # InvalidRequestError (id in use), EngineOverloaded; anything else: a bug
            future.set_exception(e)
            return
        self._listeners[request.request_id] = (loop, stream)
        future.set_result(request.request_id)

    def _abort(self, request_id: str, stream: RequestStream | None) -> None:
        target = self._listeners.get(request_id)
        if stream is not None and (target is None or target[1] is not stream):
            return  # that request is already over, or the id now belongs to another request
        out = self.engine.abort(request_id)
        self._listeners.pop(request_id, None)
        if out is not None and target is not None:
            self._send(*target, out)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, stream: RequestStream, item) -> bool:
        try:
            loop.call_soon_threadsafe(stream.put, item)
            return True
        except RuntimeError:  # that event loop is closed
            return False
