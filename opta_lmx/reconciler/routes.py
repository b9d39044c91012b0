"""The route table: where requests for each model go now, read by the gateway.

The loop writes it (a worker became ready, a worker drains or exited); the gateway reads it,
waits on it while a model loads, and begins and ends every request here: the table is the one
owner of what is in flight (per model, for a concurrency limit and /metrics; per worker, on its
route's `Traffic`, the counter the loop reads to drain a worker and to measure idleness) and of
what waits (every request waiting for a model is registered here while it waits, so the loop sees
how many wait and for how long: demand swapping's serve_queue; a load nobody waits for any more is
cancelled; /metrics' queue depth).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opta_lmx.reconciler.ledger import Traffic


@dataclass(frozen=True)
class Route:
    """Where requests for a model go now, and the counter of what is in flight there."""

    name: str
    address: str
    worker_id: str
    traffic: Traffic = field(compare=False)
    served_as: str | None = None  # the name its worker knows the model by, when not the model's own


class RouteTable:
    """Model name -> Route, with a wait for a route that is still loading (every wait bounded)."""

    def __init__(self, expects_ready: Callable[[str], bool] = lambda _name: False,
                 on_waiters_changed: Callable[[], None] = lambda: None):
        self._routes: dict[str, Route] = {}
        self._changed = asyncio.Condition()
        self._waiters: dict[str, list[float]] = {}  # model -> when each waiting request began (monotonic)
        self._in_flight: collections.Counter[str] = collections.Counter()  # model -> requests being answered
        self.expects_ready = expects_ready  # whether waiting for `name` is worthwhile (set by the loop)
        self.on_waiters_changed = on_waiters_changed  # the loop's nudge: a waiter came or went

    def begin(self, route: Route) -> None:
        """A request starts on `route`'s worker (the loop drains it until every one has ended)."""
        route.traffic.begin()
        self._in_flight[route.name] += 1

    def end(self, route: Route) -> None:
        route.traffic.end()
        self._in_flight[route.name] = max(0, self._in_flight[route.name] - 1)

    def moved(self, old: Route, new: Route) -> None:
        """A request begun on `old` is sent to `new` instead (its worker died before it was read)."""
        old.traffic.end()
        new.traffic.begin()

    def in_flight(self, name: str) -> int:
        """Requests being answered for `name` now, on any of its workers."""
        return self._in_flight[name]

    def in_flight_by_model(self) -> dict[str, int]:
        return {name: count for name, count in self._in_flight.items() if count}

    def waiters_by_model(self) -> dict[str, int]:
        return {name: len(starts) for name, starts in self._waiters.items() if starts}

    def waiters(self, name: str) -> int:
        """How many requests wait for `name` now (for its route, or for a concurrency slot)."""
        return len(self._waiters.get(name, ()))

    def waited_seconds(self) -> dict[str, float]:
        """Per model with waiters, how long the oldest has waited."""
        now = time.monotonic()
        return {name: now - min(starts) for name, starts in self._waiters.items() if starts}

    def register(self, name: str) -> float:
        """A request starts waiting for `name`; pass the returned token to `unregister`."""
        token = time.monotonic()
        self._waiters.setdefault(name, []).append(token)
        return token

    def unregister(self, name: str, token: float) -> None:
        """The request stopped waiting (served, refused, timed out or its client went away)."""
        starts = self._waiters.get(name, [])
        if token in starts:
            starts.remove(token)
        if not starts:
            self._waiters.pop(name, None)
            self.on_waiters_changed()

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    async def set(self, route: Route) -> None:
        async with self._changed:
            self._routes[route.name] = route
            self._changed.notify_all()

    def drop(self, name: str, worker_id: str, fallback: Route | None = None) -> None:
        """Stop routing `name` to `worker_id`: to `fallback` (another ready worker, mid-swap) or nowhere."""
        route = self._routes.get(name)
        if route is None or route.worker_id != worker_id:
            return
        if fallback is not None:
            self._routes[name] = fallback
        else:
            del self._routes[name]

    async def wait(self, name: str, timeout: float) -> Route | None:
        """The route for `name`, waiting up to `timeout` seconds while it may still become ready."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while (route := self._routes.get(name)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.expects_ready(name):
                    return None
                try:
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await self._changed.wait()
                except TimeoutError:
                    pass
            return route
