"""Admission: which wanted models get memory, greedily in a stable order, and (demand.py) which
resident on-demand models a request for another may evict. Pure, like the rest of plan.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opta_lmx.reconciler.demand import Resident, Waiting, decide
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DemandPolicy, ModelSpec


@dataclass(frozen=True)
class ObservedWorker:
    """A worker the engine has, ready or still loading, with what it holds (measured or estimated)."""

    name: str
    worker_id: str
    fingerprint: str
    ready: bool
    bytes: int = 0
    in_flight: int = 0  # requests in flight (or queued for a concurrency slot) on it
    ready_seconds: float = 0.0  # since it became Ready (demand's min_residency reads it)
    draining: bool = False  # being unloaded: it holds memory but no longer counts as the model running
    queued: int = 0  # requests woken for its route (or queued for a slot) that have not begun yet


@dataclass(frozen=True)
class Unschedulable:
    """A model that is wanted but does not fit; `missing_bytes` is how much memory it lacks."""

    name: str
    message: str
    missing_bytes: int


@dataclass(frozen=True)
class Workers:
    """The observed workers grouped by model, read against the wanted fingerprints and what is blocked."""

    observed: tuple[ObservedWorker, ...]
    fingerprints: Mapping[str, str]
    blocked: frozenset[str] = frozenset()
    estimates: Mapping[str, int] = field(default_factory=dict)

    def of(self, name: str) -> list[ObservedWorker]:
        return [w for w in self.observed if w.name == name]

    def names(self) -> set[str]:
        """Models with a worker that is not being unloaded (they rank as incumbents)."""
        return {w.name for w in self.observed if not w.draining}

    def current(self, name: str) -> ObservedWorker | None:
        """The worker of `name` with the wanted fingerprint (a ready one before a loading one)."""
        fingerprint = self.fingerprints.get(name)
        matches = [w for w in self.of(name) if w.fingerprint == fingerprint and not w.draining]
        return max(matches, key=lambda w: w.ready) if matches else None

    def stale(self, name: str) -> list[ObservedWorker]:
        fingerprint = self.fingerprints.get(name)
        return [w for w in self.of(name) if w.fingerprint != fingerprint and not w.draining]

    def need(self, name: str) -> int | None:
        """Bytes the model takes once converged; None if it neither runs nor may start."""
        worker = self.current(name)
        if worker is not None:
            # While the successor loads, the old worker still serves and still holds memory.
            serving = [w for w in self.stale(name) if w.ready] if not worker.ready else []
            return worker.bytes + sum(w.bytes for w in serving)
        if name in self.blocked:
            serving = [w for w in self.stale(name) if w.ready]
            return sum(w.bytes for w in serving) if serving else None
        return self.estimates.get(name, 0)


@dataclass
class Admission:
    """What the admit phase decided: bytes per admitted model, and what was refused."""

    admitted: dict[str, int] = field(default_factory=dict)
    drop_stale: set[str] = field(default_factory=set)  # mid-swap models whose old worker must go now
    unschedulable: dict[str, Unschedulable] = field(default_factory=dict)
    pressure: set[str] = field(default_factory=set)  # admitted models dropped under memory pressure
    evicted: dict[str, str] = field(default_factory=dict)  # resident on-demand models evicted by demand, why
    waiting: dict[str, Waiting] = field(default_factory=dict)  # requested models waiting for protected holders

    @property
    def used(self) -> int:
        return sum(self.admitted.values())


def admit(wanted: Mapping[str, tuple[ModelSpec, int]], workers: Workers, budget: int,
          promoted: frozenset[str] = frozenset()) -> Admission:
    """Phase 1: a greedy pass in a stable order (pinned incumbents, pinned, priority, incumbents, file order).

    `promoted` models rank as incumbents: requests that demand evicted others for (demand.py)."""
    running = workers.names() | promoted

    def rank(item: tuple[str, tuple[ModelSpec, int]]):
        name, (spec, index) = item
        here = name in running
        return (not (spec.pinned and here), not spec.pinned, -spec.priority, not here, index)

    result = Admission()
    used = 0
    for name, _entry in sorted(wanted.items(), key=rank):
        size = workers.need(name)
        if size is None:
            continue
        if used + size <= budget:
            result.admitted[name] = size
            used += size
            continue
        worker = workers.current(name)
        if worker is not None and used + worker.bytes <= budget:
            result.admitted[name] = worker.bytes
            used += worker.bytes
            result.drop_stale.add(name)
            continue
        missing = used + size - budget
        holders = ", ".join(result.admitted) or "nothing"
        result.unschedulable[name] = Unschedulable(
            name,
            f"needs {format_size(size)} but only {format_size(max(budget - used, 0))} of the "
            f"{format_size(budget)} budget is left beside {holders}: {format_size(missing)} missing",
            missing,
        )
    return result


def admit_with_demand(
    wanted: Mapping[str, tuple[ModelSpec, int]], workers: Workers, budget: int,
    policies: Mapping[str, DemandPolicy], demand: frozenset[str], waited: Mapping[str, float],
    idle: Mapping[str, float],
) -> Admission:
    """Phase 1b: requested on-demand models that were refused may evict resident on-demand ones.

    Each round promotes the requesters that found enough unprotected victims, leaves the victims
    out and admits again; at most one round per model, as every round promotes a new model."""
    specs = {name: entry[0] for name, entry in wanted.items()}
    promoted: set[str] = set()
    evicted: dict[str, str] = {}
    admission = admit(wanted, workers, budget)
    for _round in range(len(wanted) + 1):
        residents = _residents(admission, workers, idle)
        needs = {n: workers.need(n) or 0 for n in admission.unschedulable}
        decision = decide(list(admission.unschedulable), admission.admitted, specs, policies, residents, needs,
                          budget, demand, waited)
        fresh = decision.promoted - promoted
        if not fresh:
            break
        promoted |= fresh
        evicted.update(decision.evicted)
        remaining = {n: e for n, e in wanted.items() if n not in evicted}
        admission = admit(remaining, workers, budget, frozenset(promoted))
    admission.evicted = {n: why for n, why in evicted.items() if n not in admission.admitted}
    for name, waiting in decision.waiting.items():
        if admission.unschedulable.pop(name, None) is not None:
            admission.waiting[name] = waiting
    for name, why in decision.refusals.items():
        verdict = admission.unschedulable.get(name)
        if verdict is not None:
            admission.unschedulable[name] = Unschedulable(name, why, verdict.missing_bytes)
    return admission


def _residents(admission: Admission, workers: Workers, idle: Mapping[str, float]) -> dict[str, Resident]:
    """Admitted models served by one ready worker of their current spec (what demand may evict)."""
    residents = {}
    for name, size in admission.admitted.items():
        worker = workers.current(name)
        if worker is None or not worker.ready or workers.stale(name):
            continue
        residents[name] = Resident(size, worker.ready_seconds, worker.in_flight, idle.get(name, 0.0), worker.queued)
    return residents
