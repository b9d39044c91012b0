"""What the gateway's traffic tells the loop: which on-demand models requests ask for, and how long
each model has been idle. Observed state, like a pod's readiness: it never edits models.yaml.

A model is in demand while a request registered on the route table waits for it (at most
`demand_ttl`), or for `demand_grace` after a request asked (the time the request takes to
register); with no waiter left its load is cancelled (docs/reconciler.md, "On demand").
"""

from __future__ import annotations

from collections.abc import Callable

from opta_lmx.reconciler.ledger import Ledger
from opta_lmx.reconciler.routes import RouteTable


class Requests:
    """Demand (on-demand model -> when a request last asked for it) and idleness, per model."""

    def __init__(self, routes: RouteTable, ledger: Ledger, clock: Callable[[], float], *, demand_ttl: float,
                 demand_grace: float, nudge: Callable[[], None]):
        self.routes = routes
        self.ledger = ledger
        self.clock = clock
        self.demand_ttl = demand_ttl
        self.demand_grace = demand_grace
        self.nudge = nudge
        self.demand: dict[str, float] = {}

    def asked(self, name: str) -> None:
        """A request is waiting for on-demand model `name`: an observation the next pass reads."""
        self.demand[name] = self.clock()
        self.nudge()

    def served(self, name: str) -> None:
        """`name` became Ready: its demand is met (the route now says it is served)."""
        self.demand.pop(name, None)

    def active(self) -> frozenset[str]:
        """Models requests wait for: asked for within `demand_grace`, or with a waiter registered on
        the route table (bounded by `demand_ttl`). A model with a route is served, not in demand."""
        now = self.clock()
        for name, since in list(self.demand.items()):
            abandoned = now - since > self.demand_grace and not self.routes.waiters(name)
            if now - since > self.demand_ttl or name in self.routes or abandoned:
                del self.demand[name]
        return frozenset(self.demand)

    def idle(self, now: float) -> dict[str, float]:
        """Per model, seconds since its workers last served or became Ready (0 while any request is
        in flight or waits for it: a request woken by the route is not yet counted in flight)."""
        idle: dict[str, float] = {}
        for entry in self.ledger.processes():
            seconds = 0.0 if self.routes.waiters(entry.model) else entry.traffic.idle_seconds(now)
            if entry.ready_at:
                seconds = min(seconds, max(0.0, now - entry.ready_at))
            idle[entry.model] = min(idle.get(entry.model, seconds), seconds)
        return idle

    def wake_times(self, now: float) -> list[float]:
        """When demand runs out (its ttl, or its grace with no waiter): a pass is due then."""
        times = [t + self.demand_ttl for t in self.demand.values()]
        times += [t + self.demand_grace for t in self.demand.values() if t + self.demand_grace > now]
        return [t for t in times if t > now]
