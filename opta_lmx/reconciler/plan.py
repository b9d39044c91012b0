"""Planning: a pure function from (desired, observed, memory) to ordered actions. No I/O.

Running it again on the result of its own plan plans nothing: admission is a greedy pass in a
stable order (pinned, priority, incumbents, file order), and every rule acts only on a
difference between what is admitted and what runs. The plan never commits more memory than the
budget: a load starts at once only if it fits beside everything that is running now; otherwise
it waits for the plan's unloads (and make-before-break replacements) to finish first.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec


@dataclass(frozen=True)
class ObservedWorker:
    """A worker the engine has, ready or still loading, with what it holds (measured or estimated)."""

    name: str
    worker_id: str
    fingerprint: str
    ready: bool
    bytes: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class MemoryFigures:
    """The memory the plan may use. `available_bytes` is the machine's, now (None: unknown)."""

    budget_bytes: int = 2**62
    reserve_bytes: int = 0
    available_bytes: int | None = None


class UnloadReason(str, enum.Enum):
    REMOVED = "removed"  # no longer in models.yaml
    UNLOADED = "unloaded"  # state: unloaded
    EVICTED = "evicted"  # a higher-ranked model needs the memory, or the budget shrank
    IDLE = "idle"  # on-demand model idle past its idle_ttl
    PRESSURE = "pressure"  # the machine's free memory fell below the reserve
    REPLACED = "replaced"  # its entry changed; the new worker takes over


@dataclass(frozen=True)
class LoadModel:
    """Start a worker. `after`: worker ids that must be gone first; `replaces`: ids to unload once it is ready."""

    name: str
    fingerprint: str
    spec: ModelSpec
    reason: str
    bytes: int = 0
    after: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnloadModel:
    """Drain a worker (no new requests, in-flight ones finish within a grace period), then stop it."""

    name: str
    worker_id: str
    reason: UnloadReason
    message: str = ""
    bytes: int = 0


Action = LoadModel | UnloadModel


@dataclass(frozen=True)
class Unschedulable:
    """A model that is wanted but does not fit; `missing_bytes` is how much memory it lacks."""

    name: str
    message: str
    missing_bytes: int


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    unschedulable: dict[str, Unschedulable] = field(default_factory=dict)
    budget_bytes: int = 0
    held_bytes: int = 0  # what observed workers hold now
    peak_bytes: int = 0  # the most the plan holds at once
    after_bytes: int = 0  # what is held once every action is done

    def __iter__(self):
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def loads(self) -> list[LoadModel]:
        return [a for a in self.actions if isinstance(a, LoadModel)]

    def unloads(self) -> list[UnloadModel]:
        return [a for a in self.actions if isinstance(a, UnloadModel)]


def wanted_models(
    desired: DesiredState,
    observed_names: set[str],
    demand: frozenset[str],
    idle: Mapping[str, float],
) -> dict[str, tuple[ModelSpec, int]]:
    """Models that should run, with their file index: loaded ones, and on-demand ones asked for or in use."""
    wanted: dict[str, tuple[ModelSpec, int]] = {}
    for index, model in enumerate(desired.models):
        if model.state == DesiredModelState.LOADED:
            wanted[model.name] = (model, index)
        elif model.state == DesiredModelState.ON_DEMAND:
            ttl = model.idle_ttl_seconds()
            if model.name in demand:
                wanted[model.name] = (model, index)
            elif model.name in observed_names and (ttl is None or idle.get(model.name, 0.0) < ttl):
                wanted[model.name] = (model, index)
    return wanted


def plan(
    desired: DesiredState,
    fingerprints: Mapping[str, str],
    observed: list[ObservedWorker],
    blocked: frozenset[str] = frozenset(),
    *,
    memory: MemoryFigures | None = None,
    estimates: Mapping[str, int] | None = None,
    demand: frozenset[str] = frozenset(),
    idle: Mapping[str, float] | None = None,
) -> Plan:
    """What to do so that the running workers match `desired` within `memory`.

    `fingerprints` gives each desired model's wanted worker fingerprint, `estimates` its
    footprint before it is loaded; `blocked` holds models that must not be (re)started now
    (backing off, or failed for this spec); `demand` the on-demand models that requests are
    waiting for; `idle` seconds since each model last served a request. A replaced worker keeps
    serving until its successor is ready, and also while its successor cannot start.
    """
    memory = memory or MemoryFigures()
    estimates = estimates or {}
    idle = idle or {}
    budget = memory.budget_bytes
    by_name: dict[str, list[ObservedWorker]] = {}
    for worker in observed:
        by_name.setdefault(worker.name, []).append(worker)
    wanted = wanted_models(desired, set(by_name), demand, idle)
    result = Plan(budget_bytes=budget, held_bytes=sum(w.bytes for w in observed))

    def current(name: str) -> ObservedWorker | None:
        fingerprint = fingerprints.get(name)
        matches = [w for w in by_name.get(name, []) if w.fingerprint == fingerprint]
        return max(matches, key=lambda w: w.ready) if matches else None

    def stale(name: str) -> list[ObservedWorker]:
        fingerprint = fingerprints.get(name)
        return [w for w in by_name.get(name, []) if w.fingerprint != fingerprint]

    def need(name: str) -> int | None:
        """Bytes the model takes once converged; None if it neither runs nor may start."""
        worker = current(name)
        if worker is not None:
            # While the successor loads, the old worker still serves and still holds memory.
            serving = [w for w in stale(name) if w.ready] if not worker.ready else []
            return worker.bytes + sum(w.bytes for w in serving)
        if name in blocked:
            serving = [w for w in stale(name) if w.ready]
            return sum(w.bytes for w in serving) if serving else None
        return estimates.get(name, 0)

    # -- admission: pinned incumbents, pinned, priority, incumbents, file order --------------
    def rank(item: tuple[str, tuple[ModelSpec, int]]):
        name, (spec, index) = item
        running = name in by_name
        return (not (spec.pinned and running), not spec.pinned, -spec.priority, not running, index)

    admitted: dict[str, int] = {}
    drop_stale: set[str] = set()  # mid-swap models whose old worker must go now to make room
    used = 0
    for name, (spec, _index) in sorted(wanted.items(), key=rank):
        size = need(name)
        if size is None:
            continue
        if used + size <= budget:
            admitted[name] = size
            used += size
            continue
        worker = current(name)
        if worker is not None and used + worker.bytes <= budget:
            admitted[name] = worker.bytes
            used += worker.bytes
            drop_stale.add(name)
            continue
        missing = used + size - budget
        holders = ", ".join(admitted) or "nothing"
        result.unschedulable[name] = Unschedulable(
            name,
            f"needs {format_size(size)} but only {format_size(max(budget - used, 0))} of the "
            f"{format_size(budget)} budget is left beside {holders}: {format_size(missing)} missing",
            missing,
        )

    # -- memory pressure: the machine is below its reserve ------------------------------------
    pressure: set[str] = set()
    if memory.available_bytes is not None and memory.available_bytes < memory.reserve_bytes:
        deficit = memory.reserve_bytes - memory.available_bytes
        victims = sorted(
            (n for n in admitted if n in by_name and not wanted[n][0].pinned),
            key=lambda n: (
                wanted[n][0].state != DesiredModelState.ON_DEMAND,
                wanted[n][0].priority,
                -wanted[n][1],
            ),
        )
        for name in victims:
            if deficit <= 0:
                break
            freed = sum(w.bytes for w in by_name[name])
            pressure.add(name)
            deficit -= freed
            used -= admitted.pop(name)
            result.unschedulable[name] = Unschedulable(
                name,
                f"unloaded under memory pressure: the machine has {format_size(memory.available_bytes)} "
                f"free, below the {format_size(memory.reserve_bytes)} reserve",
                0,
            )

    # -- unloads -----------------------------------------------------------------------------
    unloads: list[UnloadModel] = []
    for worker in observed:
        name = worker.name
        if name in admitted:
            successor = current(name)
            if worker is successor:
                continue
            if name in drop_stale:
                unloads.append(UnloadModel(name, worker.worker_id, UnloadReason.REPLACED,
                                           "no room to run old and new side by side", worker.bytes))
            elif successor is not None and successor.ready:
                unloads.append(UnloadModel(name, worker.worker_id, UnloadReason.REPLACED,
                                           "its successor is ready", worker.bytes))
            elif not worker.ready:
                unloads.append(UnloadModel(name, worker.worker_id, UnloadReason.REPLACED,
                                           "its entry changed while it was loading", worker.bytes))
            continue  # a stale ready worker keeps serving while its successor loads or is blocked
        spec = desired.model(name)
        if spec is None:
            reason, message = UnloadReason.REMOVED, "removed from models.yaml"
        elif name in pressure:
            reason, message = UnloadReason.PRESSURE, result.unschedulable[name].message
        elif spec.state == DesiredModelState.UNLOADED:
            reason, message = UnloadReason.UNLOADED, "state is unloaded"
        elif name in wanted and need(name) is None:
            reason, message = UnloadReason.REPLACED, "its entry changed and the new spec cannot start now"
        elif name not in wanted:
            reason, message = UnloadReason.IDLE, f"idle for {idle.get(name, 0):.0f}s (idle_ttl {spec.idle_ttl})"
        else:
            reason = UnloadReason.EVICTED
            verdict = result.unschedulable.get(name)
            message = "evicted: " + (verdict.message if verdict else "no longer fits")
        unloads.append(UnloadModel(name, worker.worker_id, reason, message, worker.bytes))

    # -- loads: at once if they fit beside what runs now, else after the unloads -------------
    machine = math.inf
    if memory.available_bytes is not None:
        machine = memory.available_bytes - memory.reserve_bytes
    peak = result.held_bytes
    immediate: list[LoadModel] = []
    deferred: list[tuple[str, ModelSpec, int]] = []
    for name, size in admitted.items():
        if current(name) is not None or name in blocked:
            continue
        spec = wanted[name][0]
        if peak + size <= budget and size <= machine:
            already = {u.worker_id for u in unloads}
            replaced = tuple(w.worker_id for w in stale(name) if w.worker_id not in already)
            immediate.append(LoadModel(name, fingerprints[name], spec, _load_reason(name, by_name, demand),
                                       size, (), replaced))
            peak += size
            machine -= size
        else:
            deferred.append((name, spec, size))
    freed_first = sum(u.bytes for u in unloads)
    for name, _spec, _size in deferred:
        for worker in stale(name):
            if worker.ready:
                unloads.append(UnloadModel(name, worker.worker_id, UnloadReason.REPLACED,
                                           "no room to run old and new side by side", worker.bytes))
                freed_first += worker.bytes
    replaced_later = sum(w.bytes for load in immediate for w in observed if w.worker_id in load.replaces)
    after_ids = tuple(u.worker_id for u in unloads) + tuple(i for load in immediate for i in load.replaces)
    room = machine + freed_first + replaced_later
    loads: list[LoadModel] = list(immediate)
    for name, spec, size in deferred:
        if size > room:
            result.unschedulable[name] = Unschedulable(
                name,
                f"needs {format_size(size)} but the machine has only {format_size(max(room, 0))} free "
                f"above the {format_size(memory.reserve_bytes)} reserve",
                int(size - max(room, 0)),
            )
            continue
        room -= size
        loads.append(LoadModel(name, fingerprints[name], spec, _load_reason(name, by_name, demand),
                               size, after_ids, ()))

    result.actions = [*unloads, *loads]
    unloaded = {u.worker_id for u in unloads} | {i for load in loads for i in load.replaces}
    result.after_bytes = sum(w.bytes for w in observed if w.worker_id not in unloaded) + sum(
        load.bytes for load in loads
    )
    result.peak_bytes = max(peak, result.after_bytes)
    return result


def _load_reason(name: str, by_name: Mapping[str, list[ObservedWorker]], demand: frozenset[str]) -> str:
    if by_name.get(name):
        return "spec changed"
    return "requested (on-demand)" if name in demand else "desired in models.yaml"


def apply(observed: list[ObservedWorker], result: Plan) -> list[ObservedWorker]:
    """The observed workers once every action of `result` is done (for tests and `lmx plan`)."""
    gone = {u.worker_id for u in result.unloads()} | {i for load in result.loads() for i in load.replaces}
    after = [w for w in observed if w.worker_id not in gone]
    for load in result.loads():
        after.append(ObservedWorker(load.name, f"new:{load.name}:{load.fingerprint}", load.fingerprint,
                                    True, load.bytes))
    return after
