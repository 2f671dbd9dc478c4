"""Plumbing shared by the HTTP APIs: surface refusals before a response starts, stop and abort
a request when its client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

DISCONNECT_POLL_S = 0.1


async def first_then_rest(stream: AsyncIterator) -> AsyncIterator:
    """Awaits the first item, so admission errors raise here and become 4xx/5xx responses."""
    first = await anext(stream)

    async def chained():
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return chained()


async def until_disconnected(outputs: AsyncIterator, request: Request) -> AsyncIterator:
    """Yields from `outputs` until it ends or the client disconnects; closing it aborts."""
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        while True:
            step = asyncio.ensure_future(anext(outputs))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                # The generator must be idle before it can be closed below.
                await asyncio.gather(step, return_exceptions=True)
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        watcher.cancel()
        await outputs.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
