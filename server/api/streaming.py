"""Plumbing shared by the HTTP APIs: surface refusals before a response starts, and abort a
request as soon as its client goes away, whether it is still in prefill or streaming.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


def client_gone() -> Response:
    log.info("client disconnected; request aborted")
    return Response(status_code=499)  # nobody reads it; nginx's code for a closed client


async def first_then_rest(outputs: AsyncIterator) -> AsyncIterator:
    """Awaits the first output, so a refused request raises here and becomes a 4xx/5xx before
    any 200 goes out; the iterator returned yields it and the rest, and closes `outputs`."""
    return _prepend(await anext(outputs, None), outputs)


async def _prepend(first: object | None, rest: AsyncIterator) -> AsyncIterator:
    try:
        if first is None:
            return
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def watched(request: Request, stream: AsyncIterator) -> AsyncIterator:
    """`stream`'s items, raising ClientGone as soon as the client disconnects. `stream` is
    closed however this ends, which aborts the request if it had not finished."""
    gone = asyncio.ensure_future(_disconnect(request))
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(_next(stream))
            await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise ClientGone()
            item = step.result()
            if item is None:
                return
            yield item
    finally:
        gone.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})
        if step is not None and not step.cancelled():
            step.exception()  # retrieved, so asyncio does not log it as lost
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _next(stream: AsyncIterator) -> object | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or the server's
    # own disconnect once the response is complete, by which time this task is cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body however the response ends, so a client that leaves aborts its request
    (Starlette cancels a stream on disconnect but leaves the generator suspended)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
