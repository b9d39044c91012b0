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
from opta_lmx.reconciler.admission import (  # noqa: F401 - re-exported: plan.py is the planner's door
    Admission,
    ObservedWorker,
    Unschedulable,
    Workers,
    admit,
    admit_with_demand,
)
from opta_lmx.reconciler.demand import Waiting
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec


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
    DEMAND = "demand"  # a request for another on-demand model needs its memory (demand.py)


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


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    unschedulable: dict[str, Unschedulable] = field(default_factory=dict)
    waiting: dict[str, Waiting] = field(default_factory=dict)  # requested, waiting for protected holders
    budget_bytes: int = 0
    held_bytes: int = 0  # what observed workers hold now
    peak_bytes: int = 0  # the most the plan holds at once
    after_bytes: int = 0  # what is held once every action is done

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
    """Models that should run, with their file index: loaded ones, and on-demand ones asked for or in use.

    `observed_names` are models with a ready worker of their current spec: an on-demand model
    that is only loading is wanted while requests wait for it, so a load nobody waits for any more
    is cancelled; an on-demand model whose entry changed while nobody asks for it is unloaded (the
    next request loads the new spec) rather than replaced."""
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


def relieve_pressure(
    admission: Admission, wanted: Mapping[str, tuple[ModelSpec, int]], workers: Workers, memory: MemoryFigures
) -> Admission:
    """Phase 2: below the reserve, drop running unpinned models (on-demand, low priority, late first)."""
    if memory.available_bytes is None or memory.available_bytes >= memory.reserve_bytes:
        return admission
    deficit = memory.reserve_bytes - memory.available_bytes
    running = workers.names()
    victims = sorted(
        (n for n in admission.admitted if n in running and not wanted[n][0].pinned),
        key=lambda n: (wanted[n][0].state != DesiredModelState.ON_DEMAND, wanted[n][0].priority, -wanted[n][1]),
    )
    for name in victims:
        if deficit <= 0:
            break
        deficit -= sum(w.bytes for w in workers.of(name))
        admission.pressure.add(name)
        admission.admitted.pop(name)
        admission.unschedulable[name] = Unschedulable(
            name,
            f"unloaded under memory pressure: the machine has {format_size(memory.available_bytes)} "
            f"free, below the {format_size(memory.reserve_bytes)} reserve",
            0,
        )
    return admission


def plan_unloads(
    desired: DesiredState, wanted: Mapping[str, tuple[ModelSpec, int]], workers: Workers,
    admission: Admission, idle: Mapping[str, float],
) -> list[UnloadModel]:
    """Phase 3: every observed worker that is not (or no longer) admitted, with why."""
    unloads: list[UnloadModel] = []
    for worker in workers.observed:
        name = worker.name
        if name in admission.admitted:
            replaced = _replaced_because(worker, workers.current(name), name in admission.drop_stale)
            if replaced is not None:
                unloads.append(UnloadModel(name, worker.worker_id, UnloadReason.REPLACED, replaced, worker.bytes))
            continue
        spec = desired.model(name)
        if spec is None:
            reason, message = UnloadReason.REMOVED, "removed from models.yaml"
        elif name in admission.evicted:
            reason, message = UnloadReason.DEMAND, admission.evicted[name]
        elif name in admission.pressure:
            reason, message = UnloadReason.PRESSURE, admission.unschedulable[name].message
        elif spec.state == DesiredModelState.UNLOADED:
            reason, message = UnloadReason.UNLOADED, "state is unloaded"
        elif name in wanted and workers.need(name) is None:
            reason, message = UnloadReason.REPLACED, "its entry changed and the new spec cannot start now"
        elif name not in wanted and not any(w.ready for w in workers.of(name)):
            reason, message = UnloadReason.IDLE, "load cancelled: no request waits for it any more"
        elif name not in wanted and worker.fingerprint != workers.fingerprints.get(name):
            reason, message = UnloadReason.REPLACED, "its entry changed; on demand, the new spec loads when a request asks"
        elif name not in wanted:
            reason, message = UnloadReason.IDLE, f"idle for {idle.get(name, 0):.0f}s (idle_ttl {spec.idle_ttl})"
        else:
            reason = UnloadReason.EVICTED
            verdict = admission.unschedulable.get(name)
            message = "evicted: " + (verdict.message if verdict else "no longer fits")
        unloads.append(UnloadModel(name, worker.worker_id, reason, message, worker.bytes))
    return unloads


def _replaced_because(worker: ObservedWorker, successor: ObservedWorker | None, drop_stale: bool) -> str | None:
    """Why an admitted model's other worker goes now; None: it keeps serving (successor loading or blocked)."""
    if worker is successor:
        return None
    if drop_stale:
        return "no room to run old and new side by side"
    if successor is not None and successor.ready:
        return "its successor is ready"
    if not worker.ready:
        return "its entry changed while it was loading"
    return None


@dataclass
class Loads:
    """What the loads phase decided (its unloads are old workers that must go before a deferred load)."""

    loads: list[LoadModel] = field(default_factory=list)
    unloads: list[UnloadModel] = field(default_factory=list)
    unschedulable: dict[str, Unschedulable] = field(default_factory=dict)
    peak_bytes: int = 0


def plan_loads(
    wanted: Mapping[str, tuple[ModelSpec, int]], workers: Workers, admission: Admission,
    unloads: list[UnloadModel], memory: MemoryFigures, demand: frozenset[str],
) -> Loads:
    """Phase 4: start admitted models at once if they fit beside what runs now, else after the unloads."""
    machine = math.inf if memory.available_bytes is None else memory.available_bytes - memory.reserve_bytes
    result = Loads(peak_bytes=sum(w.bytes for w in workers.observed))
    immediate: list[LoadModel] = []
    deferred: list[tuple[str, ModelSpec, int]] = []
    already = {u.worker_id for u in unloads}
    for name, size in admission.admitted.items():
        if workers.current(name) is not None or name in workers.blocked:
            continue
        spec = wanted[name][0]
        if result.peak_bytes + size <= memory.budget_bytes and size <= machine:
            replaced = tuple(w.worker_id for w in workers.stale(name) if w.worker_id not in already)
            immediate.append(LoadModel(name, workers.fingerprints[name], spec, _load_reason(name, workers, demand),
                                       size, (), replaced))
            result.peak_bytes += size
            machine -= size
        else:
            deferred.append((name, spec, size))
    replaced_later = sum(w.bytes for load in immediate for w in workers.observed if w.worker_id in load.replaces)
    room = machine + sum(u.bytes for u in unloads) + replaced_later
    admitted: list[tuple[str, ModelSpec, int]] = []
    for name, spec, size in deferred:
        # maxUnavailable 0: an old worker is drained for its successor only if the successor then
        # fits in what the drain frees; otherwise it keeps serving and the successor is refused.
        old = [w for w in workers.stale(name) if w.ready]
        if size > room + sum(w.bytes for w in old):
            result.unschedulable[name] = Unschedulable(
                name,
                f"needs {format_size(size)} but the machine has only {format_size(max(room, 0))} free "
                f"above the {format_size(memory.reserve_bytes)} reserve",
                int(size - max(room, 0)),
            )
            continue
        for worker in old:
            result.unloads.append(UnloadModel(name, worker.worker_id, UnloadReason.REPLACED,
                                              "no room to run old and new side by side", worker.bytes))
        room += sum(w.bytes for w in old) - size
        admitted.append((name, spec, size))
    after_ids = tuple(u.worker_id for u in [*unloads, *result.unloads])
    after_ids += tuple(i for load in immediate for i in load.replaces)
    result.loads = list(immediate) + [
        LoadModel(name, workers.fingerprints[name], spec, _load_reason(name, workers, demand), size, after_ids, ())
        for name, spec, size in admitted]
    return result


def keep_serving(unloads: list[UnloadModel], loads: list[LoadModel], workers: Workers,
                 admitted: Mapping[str, int]) -> list[UnloadModel]:
    """maxUnavailable 0, the last word: a ready worker of an admitted model is drained as
    replaced only for a successor that runs, loads, or is started by this plan."""
    successors = {load.name for load in loads}
    kept = []
    for unload in unloads:
        current = workers.current(unload.name)
        stranded = (unload.reason == UnloadReason.REPLACED and unload.name in admitted
                    and unload.name not in successors and (current is None or current.worker_id == unload.worker_id))
        if stranded and any(w.worker_id == unload.worker_id and w.ready for w in workers.observed):
            continue
        kept.append(unload)
    return kept


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
    waited: Mapping[str, float] | None = None,
) -> Plan:
    """What to do so that the running workers match `desired` within `memory`.

    `fingerprints` gives each desired model's wanted worker fingerprint, `estimates` its
    footprint before it is loaded; `blocked` holds models that must not be (re)started now
    (backing off, or failed for this spec); `demand` the on-demand models that requests are
    waiting for; `idle` seconds since each model last served a request; `waited` seconds the
    oldest request waiting for each requested model has waited (demand.py's serve_queue).
    A replaced worker keeps serving until its successor is ready, and also while its successor
    cannot start. Four phases, each a pure function: admit (with demand swaps), relieve_pressure,
    plan_unloads, plan_loads.
    """
    memory = memory or MemoryFigures()
    idle = idle or {}
    # A model whose only workers are being unloaded is not (re)started until they are gone.
    leaving = {w.name for w in observed if w.draining} - {w.name for w in observed if not w.draining}
    workers = Workers(tuple(observed), fingerprints, blocked | leaving, estimates or {})
    resident = {w.name for w in observed if w.ready and not w.draining and w.fingerprint == fingerprints.get(w.name)}
    wanted = wanted_models(desired, resident, demand, idle)
    policies = {m.name: desired.effective_demand(m) for m in desired.models}
    admission = admit_with_demand(wanted, workers, memory.budget_bytes, policies, demand, waited or {}, idle)
    admission = relieve_pressure(admission, wanted, workers, memory)
    unloads = plan_unloads(desired, wanted, workers, admission, idle)
    loads = plan_loads(wanted, workers, admission, unloads, memory, demand)
    result = Plan(budget_bytes=memory.budget_bytes, held_bytes=sum(w.bytes for w in observed))
    result.unschedulable = {**admission.unschedulable, **loads.unschedulable}
    result.waiting = dict(admission.waiting)
    result.actions = [*keep_serving([*unloads, *loads.unloads], loads.loads, workers, admission.admitted),
                      *loads.loads]
    unloaded = {u.worker_id for u in result.unloads()} | {i for load in loads.loads for i in load.replaces}
    result.after_bytes = sum(w.bytes for w in observed if w.worker_id not in unloaded) + sum(
        load.bytes for load in loads.loads
    )
    result.peak_bytes = max(loads.peak_bytes, result.after_bytes)
    return result


def _load_reason(name: str, workers: Workers, demand: frozenset[str]) -> str:
    if workers.of(name):
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
