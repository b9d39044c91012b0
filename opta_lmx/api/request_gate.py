"""Requests waiting for their model: a bounded queue per model, registered on the route table.

A request for a model that is still loading waits (bounded by the load-wait timeout), registered
on the route table so the loop sees who waits (demand swapping; a load nobody waits for any more
is cancelled); a waiting client that goes away is noticed within 0.5 s. A model's
`max_concurrency` is a slot limit here. The counts themselves (in flight, waiting) are the route
table's: one owner, read by this gate, by the loop and by /metrics alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from opta_lmx.api.errors import APIError
from opta_lmx.api.metrics import GatewayMetrics
from opta_lmx.reconciler.routes import Route
from opta_lmx.reconciler.view import GatewayView
from opta_lmx.state.status import Phase

_DISCONNECT_POLL = 0.5  # seconds between checks that a waiting request's client is still there
Disconnected = Callable[[], Awaitable[bool]]


class RequestGate:
    """Per model: who may send a request now (Ready, a concurrency slot free), and the bounded wait of the rest."""

    def __init__(self, loop: GatewayView, metrics: GatewayMetrics, *, queue_limit: int, wait_timeout: float):
        self.loop = loop
        self.routes = loop.routes  # the route table: the gateway reads and waits on it
        self.metrics = metrics
        self.queue_limit = queue_limit
        self.wait_timeout = wait_timeout
        self._slots: dict[str, asyncio.Condition] = {}  # per model: a slot was freed

    def _slot(self, name: str) -> asyncio.Condition:
        return self._slots.setdefault(name, asyncio.Condition())

    async def acquire(self, name: str, limit: int | None, disconnected: Disconnected | None = None) -> Route:
        """The route to use once the model is Ready and a concurrency slot is free; release() after.

        `disconnected` is polled while the request waits: a client that went away stops waiting
        (and the loop cancels a load that no request waits for any more)."""
        route = self.routes.get(name)
        if route is None or (limit is not None and self.routes.in_flight(name) >= limit):
            if route is None and not self.routes.expects_ready(name):
                raise self._not_loaded(name)
            waiting = self.routes.waiters(name)
            if waiting >= self.queue_limit:
                raise APIError(429, f"Too many requests are waiting for `{name}` ({waiting})", "queue_full",
                               headers={"Retry-After": "1"})
            route = await self._wait(name, limit, disconnected)
        self.routes.begin(route)  # the loop drains a worker until its requests have ended
        return route

    def free_now(self, name: str, limit: int | None) -> bool:
        """Whether acquire() would return at once (the model is routed and a slot is free)."""
        return self.routes.get(name) is not None and (limit is None or self.routes.in_flight(name) < limit)

    def _not_loaded(self, name: str) -> APIError:
        status = self.loop.statuses.get(name)
        why = f" ({status.phase.value}: {status.message or status.last_error})" if status else ""
        code = "model_unschedulable" if status and status.phase == Phase.UNSCHEDULABLE else "model_not_loaded"
        # Waiting will not help until something changes (memory, the file): the OpenAI and Anthropic
        # SDKs obey `x-should-retry`, and would otherwise wait out Retry-After twice (a minute) first.
        return APIError(503, f"The model `{name}` is not loaded{why}", code,
                        headers={"Retry-After": "30", "x-should-retry": "false"})

    async def release(self, name: str, route: Route) -> None:
        self.routes.end(route)
        slot = self._slot(name)
        async with slot:
            slot.notify(1)

    async def _wait(self, name: str, limit: int | None, disconnected: Disconnected | None) -> Route:
        token = self.routes.register(name)  # the loop counts waiters (demand, serve_queue, load cancel)
        started = time.monotonic()
        deadline = started + self.wait_timeout
        try:
            loading = self.routes.get(name) is None
            while True:
                route = await self._route_or_gone(name, disconnected, max(deadline - time.monotonic(), 0.0))
                if route is None and not self.routes.expects_ready(name):
                    raise self._not_loaded(name)  # refused meanwhile (Unschedulable, Failed)
                if route is None:
                    raise APIError(503, f"The model `{name}` did not become ready within {self.wait_timeout:.0f}s",
                                   "model_loading", headers={"Retry-After": "5"})
                await self._wait_for_slot(name, limit, deadline)
                current = self.routes.get(name)  # no await from here to the caller's routes.begin()
                if current is not None:
                    if loading:
                        self.metrics.load_wait.labels(name).observe(time.monotonic() - started)
                    return current
                # The route went away while this request woke (its worker is being swapped away): wait
                # again, and say so to the loop (its demand ended when the route appeared).
                self.loop.note_request(name)
        finally:
            self.routes.unregister(name, token)

    async def _wait_for_slot(self, name: str, limit: int | None, deadline: float) -> None:
        slot = self._slot(name)
        async with slot:
            while limit is not None and self.routes.in_flight(name) >= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(503, f"No free slot for `{name}` within {self.wait_timeout:.0f}s",
                                   "model_busy", headers={"Retry-After": "1"})
                try:
                    async with asyncio.timeout(remaining):
                        await slot.wait()
                except TimeoutError:
                    pass

    async def _route_or_gone(self, name: str, disconnected: Disconnected | None, timeout: float) -> Route | None:
        """The route table's wait for `name`, given up as soon as the client has gone away."""
        waiter = asyncio.create_task(self.routes.wait(name, timeout))
        try:
            while True:
                done, _pending = await asyncio.wait({waiter}, timeout=_DISCONNECT_POLL)
                if done:
                    return waiter.result()
                if disconnected is not None and await disconnected():
                    raise APIError(499, f"the client went away while waiting for `{name}`", "client_closed")
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
