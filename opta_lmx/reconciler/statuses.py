"""Writing each model's status (phase, reason, conditions) from what the loop knows after a pass,
and the loop's observation as plain data for `lmx plan`."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from opta_lmx.reconciler import observing
from opta_lmx.reconciler.ledger import WorkerPhase
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DesiredModelState, ModelSpec
from opta_lmx.state.status import ModelStatus, Phase

if TYPE_CHECKING:
    from opta_lmx.reconciler.controller import Reconciler


def update_statuses(rec: Reconciler, fingerprints: dict[str, str], blocked: frozenset[str]) -> None:
    assert rec.desired is not None
    now = rec.clock()
    desired_names = {m.name for m in rec.desired.models}
    for model in rec.desired.models:
        _update_status(rec, model, fingerprints[model.name], blocked, now)
    for name in list(rec.statuses):
        if name not in desired_names:
            if any(e.worker_id for e in rec.ledger.of(name)):
                rec.statuses[name].phase = Phase.UNLOADING
            else:
                del rec.statuses[name]


def refresh_status(rec: Reconciler, name: str) -> None:
    """One model's status now, between passes: a worker that just became Ready shows so at once,
    not after the next pass (the phase a client polls for, and the pid it reads)."""
    model = rec.desired.model(name) if rec.desired else None
    if model is None:
        return
    fingerprint = rec.worker_spec(model).fingerprint
    now = rec.clock()
    _update_status(rec, model, fingerprint, observing.blocked(rec, {name: fingerprint}, now), now)


def _update_status(rec: Reconciler, model: ModelSpec, fingerprint: str, blocked: frozenset[str], now: float) -> None:
    status = rec.statuses.setdefault(model.name, ModelStatus())
    phase, reason, message = phase_of(rec, model, fingerprint, blocked)
    route = rec.routes.get(model.name)
    worker = rec.pool.get(route.worker_id) if route else None
    if phase != status.phase and phase == Phase.UNSCHEDULABLE:  # the other phases have their own events
        rec.events.record(model.name, reason, message, kind="Warning")
    status.phase = phase
    status.reason, status.message = reason, message
    status.pid = worker.pid if worker else None
    status.address = worker.address if worker else None
    status.started_at = worker.started_at if worker else None
    forked = rec.start_choice.option.forked if rec.start_choice else False
    status.estimated_bytes = rec.estimate(model).started(forked).total_bytes
    entry = rec.ledger.get(route.worker_id) if route else None
    status.measured_bytes = entry.measured_bytes if entry else None
    status.counted_bytes = sum(_counted(rec, e) for e in rec.ledger.of(model.name)) or None
    status.download = rec.downloads.status_of(model.name)
    status.observed_generation = rec.generation
    status.set_condition("Ready", phase == Phase.READY, reason, message, rec.generation, now)
    verdict = rec.verdicts.get(model.name)
    if verdict is not None:
        scheduled = (False, "InsufficientMemory", verdict.message)
    elif phase == Phase.UNLOADED:
        scheduled = (False, "NotWanted", message)
    else:
        scheduled = (True, "Fits", f"planned at {format_size(_planned_bytes(rec, model))} "
                     f"within the {format_size(rec.memory.budget_bytes)} budget")
    status.set_condition("Scheduled", *scheduled, rec.generation, now)


def show_download(rec: Reconciler, name: str) -> None:
    """Between passes, keep a downloading model's `download` block and message as fresh as its progress."""
    status = rec.statuses.get(name)
    if status is None:
        return
    status.download = rec.downloads.status_of(name)
    if status.phase == Phase.DOWNLOADING and status.download is not None:
        status.message = rec.downloads.message(name, status.download.repo_id)


def _planned_bytes(rec: Reconciler, model: ModelSpec) -> int:
    route = rec.routes.get(model.name)
    entry = rec.ledger.get(route.worker_id) if route else None
    if entry is not None:
        return rec.worker_bytes(entry)
    load = rec.ledger.load_of(model.name)
    return load.planned_bytes if load is not None else rec.estimate(model).total_bytes


def _counted(rec: Reconciler, entry) -> int:
    """What the plan counts for one ledger entry: a worker's held figure, a load's planned one."""
    return entry.planned_bytes if entry.worker_id is None else rec.worker_bytes(entry)


def phase_of(rec: Reconciler, model: ModelSpec, fingerprint: str, blocked: frozenset[str]) -> tuple[Phase, str, str]:
    """The phase, reason and message of one model, from what the loop knows now."""
    name = model.name
    route = rec.routes.get(name)
    mine = rec.ledger.of(name)
    failure = rec.ledger.failures.get(name)
    serving_note = " (the previous spec keeps serving)" if route else ""
    if failure and failure.permanent and failure.fingerprint == fingerprint and model.state != DesiredModelState.UNLOADED:
        return Phase.FAILED, "LoadFailed", failure.message + serving_note
    load = rec.ledger.load_of(name)
    if load is not None:
        if load.phase == WorkerPhase.DOWNLOADING:
            return Phase.DOWNLOADING, "Downloading", rec.downloads.message(name, rec.worker_spec(model).source)
        if load.phase == WorkerPhase.WAITING:
            return Phase.PENDING, "WaitingForMemory", load.why
        return Phase.LOADING, "Loading", "starting a worker"
    entry = rec.ledger.get(route.worker_id) if route else None
    if route is not None and entry is not None and entry.fingerprint == fingerprint:
        return Phase.READY, "Ready", f"serving at {route.address}; {resident_because(model, entry)}"
    draining = [e for e in mine if e.phase == WorkerPhase.DRAINING]
    if draining:
        return Phase.DRAINING, "Draining", draining[0].why
    if any(e.phase == WorkerPhase.STOPPING for e in mine):
        return Phase.UNLOADING, "Unloading", "stopping its worker"
    if failure and name in blocked:
        return Phase.PENDING, "CrashLoopBackOff" if "crash-looping" in failure.message else "BackOff", (
            failure.message + serving_note)
    if name in rec.downloads.sizing():
        return Phase.PENDING, "ReadingSize", f"reading the size of {model.source} from the hub"
    verdict = rec.verdicts.get(name)
    if verdict is not None:
        return Phase.UNSCHEDULABLE, "InsufficientMemory", verdict.message
    waiting = rec.waiting.get(name)
    if waiting is not None:
        return Phase.PENDING, "WaitingForSwap", waiting.message
    if model.state == DesiredModelState.UNLOADED:
        return Phase.UNLOADED, "Unloaded", "state is unloaded"
    if model.state == DesiredModelState.ON_DEMAND and name not in rec.demand:
        return Phase.UNLOADED, "Standby", "on-demand: loads when a request asks for it"
    return Phase.PENDING, "Pending", "waiting to be loaded"


def resident_because(model: ModelSpec, entry) -> str:
    """Why a ready model is resident: desired in models.yaml, or demand (with its last request)."""
    if model.state == DesiredModelState.LOADED:
        return "resident because desired loaded in models.yaml"
    last = entry.traffic.last_used
    stamp = datetime.datetime.fromtimestamp(last, datetime.timezone.utc).strftime("%H:%M:%S UTC")
    ttl = f", idle_ttl {model.idle_ttl}" if model.idle_ttl is not None else ""
    return f"resident on demand: last request at {stamp}{ttl}"


def observation(rec: Reconciler) -> dict:
    """What the loop observes, as plain data: enough for `lmx plan` to plan against this server."""
    now = rec.clock()
    workers = []
    for entry in rec.ledger.processes():
        workers.append({
            "name": entry.model, "worker_id": entry.worker_id, "fingerprint": entry.fingerprint, "ready": True,
            "bytes": rec.worker_bytes(entry) if rec.desired else (entry.measured_bytes or 0),
            "measured_bytes": entry.measured_bytes, "mlx_bytes": entry.mlx_bytes, "forked": entry.forked,
            "in_flight": entry.traffic.in_flight, "ready_seconds": _ready_seconds(rec, entry, now),
            "draining": entry.phase in (WorkerPhase.DRAINING, WorkerPhase.STOPPING),
        })
    for entry in rec.ledger:
        if entry.loading:
            workers.append({"name": entry.model, "worker_id": entry.key, "fingerprint": entry.fingerprint,
                            "ready": False, "bytes": entry.planned_bytes, "measured_bytes": None,
                            "in_flight": 0, "draining": False})
    held = sum(w["bytes"] for w in workers)
    choice = rec.start_choice
    fixed = choice.option.fixed_bytes if choice else 0
    return {
        "memory": {
            "physical_bytes": rec.physical_bytes, "budget_bytes": rec.memory.budget_bytes,
            "reserve_bytes": rec.memory.reserve_bytes, "available_bytes": rec.memory.available_bytes,
            "held_bytes": held, "fixed_bytes": fixed, "total_budget_bytes": rec.memory.budget_bytes + fixed,
        },
        "engine_start": {
            "wanted": choice.wanted.mode if choice else None, "mode": choice.option.mode if choice else None,
            "spares": choice.option.spares if choice else 0, "fixed_bytes": fixed,
            "measured_bytes": rec.helper.waiting_bytes + rec.helper.starting_bytes,
            "forked_loads": choice.option.forked if choice else False,
            "yielded": choice.yielded if choice else None,
            "helper": rec.helper.to_dict(), "costs": rec.accounts.helper_costs.to_dict(),
        },
        "workers": workers,
        "measured_max": dict(rec.accounts.measured_max),
        "blocked": [
            {"name": n, "fingerprint": f.fingerprint} for n, f in rec.ledger.failures.items()
            if f.permanent or f.retry_at > now
        ],
        "demand": sorted(rec.demand),
        "waited_seconds": rec.routes.waited_seconds(),
        "idle_seconds": rec.idle_seconds(now),
    }


def _ready_seconds(rec: Reconciler, entry, now: float) -> float:
    worker = rec.pool.get(entry.worker_id or "")
    ready_at = getattr(worker, "ready_at", None)
    return max(0.0, now - ready_at) if ready_at else 0.0
