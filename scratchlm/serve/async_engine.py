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
from collections.abc import AsyncIterator
from concurrent.futures import Future

from scratchlm.serve.engine import LLMEngine, RequestOutput
from scratchlm.serve.params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: BaseException | None = None  # the exception that stopped the engine thread, if any

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changes it; the last one has ``finished``."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        self._start()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        added: Future = Future()
        self._inbox.put(("add", (prompt, params, request_id, loop, outputs), added))
        request_id = await asyncio.wrap_future(added)  # raises the request's ValueError, if any
        finished = False
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise RuntimeError(f"the engine failed: {out!r}") from out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away: free the request's blocks
                self._inbox.put(("abort", request_id, None))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._closed = True
        self._inbox.put(("stop", None, None))
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
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
                    prompt, params, request_id, loop, outputs = payload
                    try:
                        request_id = engine.add_request(prompt, params, request_id)
                    except ValueError as e:
                        future.set_exception(e)
                        continue
                    self._listeners[request_id] = (loop, outputs)
                    future.set_result(request_id)
                elif kind == "abort":
                    engine.abort(payload)
                    self._listeners.pop(payload, None)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug or out of memory: fail every request, keep the thread alive
                self.error = e
                for request_id, (loop, listener) in list(self._listeners.items()):
                    engine.abort(request_id)
                    loop.call_soon_threadsafe(listener.put_nowait, e)
                self._listeners.clear()
                continue
            for out in outputs:
                target = self._listeners.get(out.request_id)
                if target is None:
                    continue
                loop, listener = target
                if out.finished:
                    del self._listeners[out.request_id]
                try:
                    loop.call_soon_threadsafe(listener.put_nowait, out)
                except RuntimeError:  # that event loop is closed: nobody is listening
                    engine.abort(out.request_id)
