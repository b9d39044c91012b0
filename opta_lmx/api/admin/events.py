"""`GET /admin/events?follow=true`: the event log as server-sent events (`id:` is the seq).

Hand-written rather than sse-starlette: the work here is the subscribe-then-backlog ordering
and ending on shutdown, which a library does not do for us; sse-starlette would replace only
the three-line frame format, and it installs its own hook into uvicorn's signal handling,
which `lmx serve` already owns (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from opta_lmx.state.status import EventLog

KEEP_ALIVE_SECONDS = 15.0


def frame(event) -> bytes:
    return f"id: {event.seq}\nevent: {event.reason}\ndata: {event.model_dump_json()}\n\n".encode()


async def follow(events: EventLog, since: int, limit: int, *, stopping: Callable[[], bool],
                 disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[bytes]:
    """The backlog after `since`, then every new event until shutdown or the client leaves."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)

    def put(event) -> None:
        if not queue.full():
            queue.put_nowait(event)

    def listener(event) -> None:
        loop.call_soon_threadsafe(put, event)

    events.subscribe(listener)  # before the backlog, so nothing falls in between
    try:
        last = since
        for event in events.since(since, limit):
            last = event.seq
            yield frame(event)
        idle = 0.0
        while not stopping():  # a shutdown ends the stream
            try:
                async with asyncio.timeout(1.0):
                    event = await queue.get()
            except TimeoutError:
                idle += 1.0
                if idle >= KEEP_ALIVE_SECONDS:
                    idle = 0.0
                    if await disconnected():
                        return
                    yield b": keep-alive\n\n"
                continue
            idle = 0.0
            if event.seq > last:
                last = event.seq
                yield frame(event)
    finally:
        events.unsubscribe(listener)
