"""The engine for servers: async, streaming, many clients at once.

    engine = AsyncLLMEngine(LLMEngine.from_checkpoint(path))
    async for out in engine.generate("ROMEO:", SamplingParams(max_tokens=50)):
        send(out.delta_text)

The :class:`~scratchlm.serve.engine.LLMEngine` runs in one background thread that owns it: it
takes new requests and aborts from an inbox between steps, runs a step, and hands each request's
outputs to the asyncio queue of the coroutine that asked. The event loop never waits for a model
step, so a server stays responsive while the engine computes. A request whose consumer stops
listening (client disconnected, task cancelled) is aborted and its blocks are freed. A bad
request raises ``ValueError`` in its own ``generate`` call only.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future

from scratchlm.serve.engine import LLMEngine, RequestOutput
from scratchlm.serve.params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (event loop, queue) of the coroutine consuming it
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()  # orders "closed" against puts: no request is put after the last drain
        self.error: BaseException | None = None  # the exception that stopped the engine thread, if any
        # a failed step (its requests failed; the engine went on)
        self.last_step_error: BaseException | None = None

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changes it; the last one has ``finished``.

        A bad request raises ``ValueError`` here. If the engine fails, the requests in flight get a
        ``RuntimeError``; if the request is aborted, its last output has ``finish_reason == "abort"``.
        """
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        added: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(self._why_closed())
            self._inbox.put(("add", (prompt, params, request_id, loop, outputs), added))
            self._start()
        finished = False
        try:
            await asyncio.wrap_future(added)  # raises the request's ValueError, if any
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise RuntimeError(f"the engine failed: {out!r}") from out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away (or never got its answer): free the request
                # Only this call's request: another request may use the same id after a refusal.
                self._inbox.put(("abort", (request_id, outputs), None))

    def abort(self, request_id: str) -> None:
        """Stop a request; its consumer gets a last output with ``finish_reason == "abort"``.

        Requests are matched by id when the engine thread reads the abort: an abort sent before the
        request itself was submitted (its ``generate`` not yet started) finds nothing to stop."""
        self._inbox.put(("abort", (request_id, None), None))

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight get a ``RuntimeError``."""
        with self._lock:
            self._closed = True
        self._inbox.put(("stop", None, None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

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
        error = RuntimeError(self._why_closed())
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
                for request_id, (loop, listener) in list(self._listeners.items()):
                    engine.abort(request_id)
                    self._send(loop, listener, e)
                self._listeners.clear()
                for request_id in list(engine.requests):  # any added without a listener (none, normally)
                    engine.abort(request_id)
                continue
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
        prompt, params, request_id, loop, outputs = payload
        try:
            self.engine.add_request(prompt, params, request_id)
        except Exception as e:  # ValueError for a bad request; anything else is a bug, for this request only
            future.set_exception(e)
            return
        self._listeners[request_id] = (loop, outputs)
        future.set_result(request_id)

    def _abort(self, request_id: str, outputs: asyncio.Queue | None) -> None:
        target = self._listeners.get(request_id)
        if outputs is not None and (target is None or target[1] is not outputs):
            return  # that request is already over, or the id now belongs to another request
        out = self.engine.abort(request_id)
        self._listeners.pop(request_id, None)
        if out is not None and target is not None:
            self._send(*target, out)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, listener: asyncio.Queue, item) -> bool:
        try:
            loop.call_soon_threadsafe(listener.put_nowait, item)
            return True
        except RuntimeError:  # that event loop is closed
            return False
