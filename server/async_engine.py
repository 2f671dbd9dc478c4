"""Drives an `LLMEngine` on its own thread and hands outputs to asyncio callers.

The engine is single-threaded: requests and aborts reach it through a queue drained between
steps, and each request's outputs flow back through its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from engine.engine import LLMEngine, RequestOutput
from engine.sequence import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; requests cannot be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if not self.alive:
            raise EngineDeadError(f"engine stopped: {self.error!r}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        accepted = loop.create_future()
        self._commands.put(("add", request_id, prompt_token_ids, params, loop, accepted))
        self._wake.set()
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # no-op if it was refused; frees it if we were cancelled
            raise
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # the loop must report any failure to every waiter
            log.exception("engine loop failed")
            self.error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine failed: {exc!r}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, loop, accepted = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as exc:
                    loop.call_soon_threadsafe(_settle, accepted, exc)
                else:
                    loop.call_soon_threadsafe(_settle, accepted, None)
            else:
                self.engine.abort(command[1])

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller went away meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
