"""Model status: one writer, deriving every field from the ledger, the routes and the last pass.

Nothing else sets a phase: the status of a model is a function of what the loop knows (its
ledger entries and failures, its route, its download, what the last plan refused or keeps
waiting), written after every pass and, between passes, for one model whose worker just became
Ready, failed or finished downloading (`refresh`), so a client polling for Ready sees it at once.
Whoever waits for a change (an admin write with `?wait=ready`) waits on `changed`, not a timer.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opta_lmx.engine.prefix_cache import CacheFigures
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.accounting import MemoryAccounts
from opta_lmx.reconciler.demand import Waiting
from opta_lmx.reconciler.downloads import Downloads
from opta_lmx.reconciler.fleet import Placement
from opta_lmx.reconciler.ledger import Ledger, WorkerEntry, WorkerPhase
from opta_lmx.reconciler.plan import Unschedulable
from opta_lmx.reconciler.routes import RouteTable
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import EventLog, ModelStatus, Phase, PrefixCacheStatus


@dataclass(frozen=True)
class PassVerdicts:
    """What the last pass decided that statuses show."""

    desired: DesiredState
    generation: int
    unschedulable: Mapping[str, Unschedulable] = field(default_factory=dict)
    waiting: Mapping[str, Waiting] = field(default_factory=dict)
    budget_bytes: int = 0
    forked: bool = False  # new workers would fork from the template (their estimate is a forked one)


class StatusBook:
    """Each model's status, and the one place that writes it."""

    def __init__(self, ledger: Ledger, routes: RouteTable, downloads: Downloads, accounts: MemoryAccounts,
                 events: EventLog, clock: Callable[[], float], spec_of: Callable[[ModelSpec], WorkerSpec],
                 demand: Callable[[], Mapping[str, float]], worker_bytes: Callable[[WorkerEntry], int],
                 caches: Callable[[], Mapping[str, CacheFigures]] = dict,
                 placements: Callable[[], Mapping[str, Placement]] = dict):
        self.ledger, self.routes, self.downloads, self.accounts = ledger, routes, downloads, accounts
        self.events, self.clock, self.spec_of, self.demand = events, clock, spec_of, demand
        self.worker_bytes = worker_bytes
        self.caches = caches  # each model's kept prefix cache (engine/prefix_cache.py), as last read
        self.placements = placements  # on which fleet host each model runs, and why (fleet.py)
        self.statuses: dict[str, ModelStatus] = {}
        self.verdicts: PassVerdicts | None = None
        self._change: asyncio.Event | None = None  # set (and replaced) at each write

    # -- writing ------------------------------------------------------------------------
    def write(self, verdicts: PassVerdicts) -> None:
        """Every model's status after a pass; a model removed from the file keeps one while a worker
        of it is being stopped (Unloading), then goes."""
        self.verdicts = verdicts
        names = {m.name for m in verdicts.desired.models}
        for model in verdicts.desired.models:
            self._write(model, verdicts)
        for name in list(self.statuses):
            if name not in names:
                if any(e.worker_id for e in self.ledger.of(name)):
                    self.statuses[name].phase = Phase.UNLOADING
                else:
                    del self.statuses[name]
        self._notify()

    def refresh(self, name: str) -> None:
        """One model's status now, between passes (a worker Ready, failed, downloaded)."""
        verdicts = self.verdicts
        model = verdicts.desired.model(name) if verdicts else None
        if verdicts is not None and model is not None:
            self._write(model, verdicts)
            self._notify()

    def show_download(self, name: str) -> None:
        """Between passes, keep a downloading model's `download` block and message as fresh as its progress."""
        status = self.statuses.get(name)
        if status is None:
            return
        status.download = self.downloads.status_of(name)
        if status.phase == Phase.DOWNLOADING and status.download is not None:
            status.message = self.downloads.message(name, status.download.repo_id)

    def _write(self, model: ModelSpec, verdicts: PassVerdicts) -> None:
        now = self.clock()
        fingerprint = self.spec_of(model).fingerprint
        status = self.statuses.setdefault(model.name, ModelStatus())
        phase, reason, message = self.phase_of(model, fingerprint, verdicts)
        route = self.routes.get(model.name)
        entry = self.ledger.get(route.worker_id) if route else None
        if phase != status.phase and phase == Phase.UNSCHEDULABLE:  # the other phases have their own events
            self.events.record(model.name, reason, message, kind="Warning")
        placement = self.placements().get(model.name)
        status.host, status.placement = (placement.host, placement.reason) if placement else (None, None)
        if placement is not None and not placement.here and phase == Phase.UNLOADED:
            reason = "OnAnotherHost" if placement.host else "NoHost"
            message = f"runs on {placement.host}: {placement.reason}" if placement.host else placement.reason
        status.phase, status.reason, status.message = phase, reason, message
        status.pid = entry.pid if entry else None
        status.address = entry.address if entry else None
        status.started_at = entry.started_at if entry else None
        status.load_seconds = self.ledger.last_load_seconds.get(model.name)
        status.restarts = self.ledger.restarts[model.name]
        status.last_error = self.ledger.last_errors.get(model.name)
        status.estimated_bytes = self.accounts.estimate(self.spec_of(model), model.memory_bytes()) \
            .started(verdicts.forked).total_bytes
        status.measured_bytes = entry.measured_bytes if entry else None
        status.counted_bytes = sum(self._counted(e) for e in self.ledger.of(model.name)) or None
        status.download = self.downloads.status_of(model.name)
        kept = self.caches().get(model.name)
        status.prefix_cache = PrefixCacheStatus(**kept.to_dict()) if kept is not None else None
        status.observed_generation = verdicts.generation
        status.set_condition("Ready", phase == Phase.READY, reason, message, verdicts.generation, now)
        verdict = verdicts.unschedulable.get(model.name)
        if verdict is not None:
            scheduled = (False, "InsufficientMemory", verdict.message)
        elif phase == Phase.UNLOADED:
            scheduled = (False, "NotWanted", message)
        else:
            planned = self.worker_bytes(entry) if entry else self._planned(model, verdicts)
            scheduled = (True, "Fits", f"planned at {format_size(planned)} within the "
                                       f"{format_size(verdicts.budget_bytes)} budget")
        status.set_condition("Scheduled", *scheduled, verdicts.generation, now)

    def _counted(self, entry: WorkerEntry) -> int:
        """What the plan counts for one ledger entry: a worker's held figure, a load's planned one."""
        return entry.planned_bytes if entry.worker_id is None else self.worker_bytes(entry)

    def _planned(self, model: ModelSpec, verdicts: PassVerdicts) -> int:
        load = self.ledger.load_of(model.name)
        if load is not None:
            return load.planned_bytes
        return self.accounts.estimate(self.spec_of(model), model.memory_bytes()).started(verdicts.forked).total_bytes

    # -- the phase ------------------------------------------------------------------------
    def phase_of(self, model: ModelSpec, fingerprint: str, verdicts: PassVerdicts) -> tuple[Phase, str, str]:
        """The phase, reason and message of one model, from what the loop knows now."""
        name = model.name
        route = self.routes.get(name)
        failure = self.ledger.failures.get(name)
        serving_note = " (the previous spec keeps serving)" if route else ""
        if failure and failure.permanent and failure.fingerprint == fingerprint \
                and model.state != DesiredModelState.UNLOADED:
            return Phase.FAILED, "LoadFailed", failure.message + serving_note
        load = self.ledger.load_of(name)
        if load is not None:
            if load.phase == WorkerPhase.DOWNLOADING:
                return Phase.DOWNLOADING, "Downloading", self.downloads.message(name, self.spec_of(model).source)
            if load.phase == WorkerPhase.WAITING:
                return Phase.PENDING, "WaitingForMemory", load.why
            return Phase.LOADING, "Loading", "starting a worker"
        entry = self.ledger.get(route.worker_id) if route else None
        if route is not None and entry is not None and entry.fingerprint == fingerprint:
            return Phase.READY, "Ready", f"serving at {route.address}; {resident_because(model, entry)}"
        mine = self.ledger.of(name)
        draining = [e for e in mine if e.phase == WorkerPhase.DRAINING]
        if draining:
            return Phase.DRAINING, "Draining", draining[0].why
        if any(e.phase == WorkerPhase.STOPPING for e in mine):
            return Phase.UNLOADING, "Unloading", "stopping its worker"
        if failure and failure.blocks(fingerprint, self.clock()):
            return Phase.PENDING, "CrashLoopBackOff" if "crash-looping" in failure.message else "BackOff", (
                failure.message + serving_note)
        if name in self.downloads.sizing():
            return Phase.PENDING, "ReadingSize", f"reading the size of {model.source} from the hub"
        verdict = verdicts.unschedulable.get(name)
        if verdict is not None:
            return Phase.UNSCHEDULABLE, "InsufficientMemory", verdict.message
        waiting = verdicts.waiting.get(name)
        if waiting is not None:
            return Phase.PENDING, "WaitingForSwap", waiting.message
        if model.state == DesiredModelState.UNLOADED:
            return Phase.UNLOADED, "Unloaded", "state is unloaded"
        if model.state == DesiredModelState.ON_DEMAND and name not in self.demand():
            return Phase.UNLOADED, "Standby", "on-demand: loads when a request asks for it"
        return Phase.PENDING, "Pending", "waiting to be loaded"

    # -- waiting for a change ---------------------------------------------------------------
    def _notify(self) -> None:
        """Wake whoever waits for a change (each waiter holds the event of its own wait)."""
        if self._change is not None:
            self._change.set()
            self._change = None

    async def wait_for_change(self, timeout: float) -> None:
        """Return when statuses are written again, or after `timeout` seconds."""
        if self._change is None:
            self._change = asyncio.Event()
        change = self._change
        try:
            async with asyncio.timeout(timeout):
                await change.wait()
        except TimeoutError:
            pass


def resident_because(model: ModelSpec, entry: WorkerEntry) -> str:
    """Why a ready model is resident: desired in models.yaml, or demand (with its last request)."""
    if model.state == DesiredModelState.LOADED:
        return "resident because desired loaded in models.yaml"
    last = entry.traffic.last_used
    stamp = datetime.datetime.fromtimestamp(last, datetime.timezone.utc).strftime("%H:%M:%S UTC")
    ttl = f", idle_ttl {model.idle_ttl}" if model.idle_ttl is not None else ""
    return f"resident on demand: last request at {stamp}{ttl}"
