"""The level-triggered control loop.

A file change, a worker exit, a finished load and a periodic resync all just say
"reconcile"; every pass re-reads the desired state and the engine's workers, plans, and
acts. Loads and unloads run as tasks so a slow load never blocks the loop from reacting
to the next edit. The rooms: ledger.py (workers and failures), routes.py (the gateway's
table), accounting.py (memory figures), acting.py (loads, unloads), adoption.py (a previous
run's workers, exits), observing.py (read and measure), statuses.py, supervision.py (the loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.engine.pool import Pool
from opta_lmx.engine.worker import Worker, WorkerSpec
from opta_lmx.reconciler import adoption, observing, statuses
from opta_lmx.reconciler.accounting import MemoryAccounts, memory_figures, resolve_source, worker_spec
from opta_lmx.reconciler.acting import Actions
from opta_lmx.reconciler.ledger import Backoff, Failure, Ledger, Traffic, WorkerEntry
from opta_lmx.reconciler.plan import MemoryFigures, Unschedulable, plan
from opta_lmx.reconciler.routes import Route, RouteTable
from opta_lmx.reconciler.supervision import Supervisor
from opta_lmx.reconciler.view import LoopHealth
from opta_lmx.state.document import Document
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import ConfigStatus, EventLog, ModelStatus, Phase

log = logging.getLogger(__name__)

__all__ = ["Failure", "LoopSettings", "Reconciler", "Route", "Traffic", "resolve_source"]


@dataclass(frozen=True)
class LoopSettings:
    resync_interval: float = 30.0
    ready_timeout: float = 600.0
    stop_grace: float = 10.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 120.0  # a worker up this long resets its crash backoff
    watch_debounce_ms: int = 100
    drain_timeout: float = 30.0  # in-flight requests of a worker being unloaded get this long
    memory_wait_timeout: float = 300.0  # a load waiting for unloads to free memory gives up after this
    demand_ttl: float = 120.0  # an on-demand request counts as demand this long (its wait bound)
    memory_check_interval: float = 2.0  # how often free memory is compared with the reserve
    pass_backoff_base: float = 0.1  # a pass that raised is retried after this, doubling per failure...
    pass_backoff_max: float = 5.0  # ...up to this


class Reconciler:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        pool: Pool,
        *,
        settings: LoopSettings = LoopSettings(),
        events: EventLog | None = None,
        clock=time.time,
        memory_probe: Callable[[], tuple[int, int]] = engine_memory.machine_memory,
    ):
        self.config_path = Path(config_path)
        self.pool = pool
        self.settings = settings
        self.events = events or EventLog(clock=clock)
        self.clock = clock
        self.desired: DesiredState | None = None
        self.document: Document | None = None
        self.generation = 0
        self.observed_generation = 0
        self.config_status = ConfigStatus(path=str(self.config_path))
        self.statuses: dict[str, ModelStatus] = {}
        self.ledger = Ledger(self.events, lambda: self.clock(), Backoff(settings.backoff_base, settings.backoff_max))
        self.routes = RouteTable(self.expects_ready)
        self.accounts = MemoryAccounts()
        self.actions = Actions(self)
        self.supervisor = Supervisor(self, Backoff(settings.pass_backoff_base, settings.pass_backoff_max))
        self.memory_probe = memory_probe  # () -> (physical bytes, available bytes)
        self.memory = MemoryFigures()
        self.physical_bytes = 0
        self.demand: dict[str, float] = {}  # on-demand model -> when a request last asked for it
        self.verdicts: dict[str, Unschedulable] = {}
        self.wake = asyncio.Event()
        self.stopping = False
        self.passes = 0
        self.pass_listeners: list = []  # called with each pass's duration in seconds
        self._pass_lock = asyncio.Lock()
        self._recovered: list[Worker] | None = None  # a previous run's workers, until adopted or stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        pool.add_exit_listener(self._worker_exited)

    # -- signals ------------------------------------------------------------------
    def nudge(self) -> None:
        """Ask for a pass soon. Safe to call from any coroutine on the loop."""
        self.wake.set()

    async def accept_now(self) -> int:
        """Read models.yaml and reconcile right away; the generation now in force.

        For a writer (the admin API) that just wrote the file and must answer with the
        generation its content was accepted as, without waiting for the file watcher.
        """
        await self.reconcile_once()
        return self.generation

    def _worker_exited(self, _worker: Worker) -> None:
        """A worker's waiter thread saw it exit: reconcile on the loop's thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.wake.set)

    # -- the loop -----------------------------------------------------------------
    async def run(self) -> None:
        """Reconcile until stopped or cancelled, surviving passes that raise (supervision.py)."""
        self._loop = asyncio.get_running_loop()
        await self.supervisor.run()

    def health(self) -> LoopHealth:
        """Whether the loop runs, and what went wrong in its passes (read by readiness and /metrics)."""
        return self.supervisor.health()

    async def reconcile_once(self) -> None:
        started = time.perf_counter()
        try:
            async with self._pass_lock:
                await self._reconcile_once()
        finally:
            self.passes += 1
            for listener in self.pass_listeners:
                listener(time.perf_counter() - started)

    async def _reconcile_once(self) -> None:
        observing.read_desired(self)
        if self._recovered is None:
            self._recovered = self.pool.recover()
        if self._recovered and self.desired is not None:
            recovered, self._recovered = self._recovered, []
            await adoption.adopt_recovered(self, recovered)
        adoption.reap_exited(self)
        if self.desired is None:
            return
        fingerprints = self.fingerprints()
        now = self.clock()
        observed = observing.observe(self, fingerprints)
        physical, available = self.memory_probe()
        self.physical_bytes = physical
        self.pool.configure_starts(self.desired.engine_start)  # fast starts (engine/prepared.py)
        self.memory = memory_figures(self.desired, physical, available, self.pool.fixed_bytes())
        blocked = self.ledger.blocked(fingerprints, now)
        result = plan(
            self.desired, fingerprints, observed, blocked, memory=self.memory,
            estimates=self.planning_estimates(fingerprints), demand=self.active_demand(),
            idle=self.idle_seconds(now),
        )
        self.verdicts = result.unschedulable
        self.actions.apply(result.actions)
        statuses.update_statuses(self, fingerprints, blocked)
        self.observed_generation = self.generation
        wake_times = observing.wake_times(self, now)
        if wake_times:
            asyncio.get_running_loop().call_later(min(wake_times) - now + 0.01, self.nudge)

    # -- specs and memory (accounting.py holds the rules) ------------------------------
    def worker_spec(self, model: ModelSpec) -> WorkerSpec:
        assert self.desired is not None
        return worker_spec(self.config_path, self.desired, model)

    def fingerprints(self) -> dict[str, str]:
        """Each desired model's wanted worker fingerprint."""
        return {m.name: self.worker_spec(m).fingerprint for m in self.desired.models} if self.desired else {}

    def estimate(self, model: ModelSpec) -> MemoryEstimate:
        """The footprint `model` is planned with before it runs (cached per fingerprint)."""
        return self.accounts.estimate(self.worker_spec(model), model.memory_bytes())

    def planning_estimates(self, fingerprints: dict[str, str]) -> dict[str, int]:
        """Estimates, raised to what a worker of the same spec was measured at (no re-admission on a guess)."""
        assert self.desired is not None
        return {m.name: self.accounts.planning(self.estimate(m), fingerprints[m.name]) for m in self.desired.models}

    def worker_bytes(self, entry: WorkerEntry) -> int:
        """What a worker counts for in planning: the entry's `memory:` override, else its measurement."""
        assert self.desired is not None
        model = self.desired.model(entry.model)
        current = None
        if model is not None and self.worker_spec(model).fingerprint == entry.fingerprint:
            current = self.estimate(model)
        return self.accounts.held(current, entry.fingerprint, entry.measured_bytes)

    # -- demand and idleness (observations the planner reads) -------------------------
    def request_model(self, name: str) -> None:
        """A request is waiting for on-demand model `name`: an observation the next pass reads."""
        self.demand[name] = self.clock()
        self.nudge()

    def active_demand(self) -> frozenset[str]:
        now = self.clock()
        for name, since in list(self.demand.items()):
            if now - since > self.settings.demand_ttl or name in self.routes:
                del self.demand[name]
        return frozenset(self.demand)

    def idle_seconds(self, now: float) -> dict[str, float]:
        """Per model, seconds since its workers last served (0 while any request is in flight)."""
        idle: dict[str, float] = {}
        for entry in self.ledger.processes():
            seconds = entry.traffic.idle_seconds(now)
            idle[entry.model] = min(idle.get(entry.model, seconds), seconds)
        return idle

    # -- what the gateway asks ------------------------------------------------------
    def resolve(self, name_or_alias: str) -> ModelSpec | None:
        return self.desired.resolve(name_or_alias) if self.desired else None

    def note_request(self, name: str) -> None:
        """The gateway saw a request for `name`: an observation the loop may read (idle, demand)."""
        model = self.desired.model(name) if self.desired else None
        if model is not None and model.state == DesiredModelState.ON_DEMAND and name not in self.routes:
            self.request_model(name)

    def route(self, name: str) -> Route | None:
        return self.routes.get(name)

    def expects_ready(self, name: str) -> bool:
        """Whether `name` may still become ready (so waiting is worthwhile): desired loaded, or
        on-demand and asked for; not failed for good, and not refused for want of memory."""
        model = self.desired.model(name) if self.desired else None
        if model is None or model.state == DesiredModelState.UNLOADED:
            return False
        loading = self.ledger.load_of(name) is not None
        if model.state == DesiredModelState.ON_DEMAND and name not in self.demand and not loading:
            return False
        if name in self.verdicts and not loading:
            return False
        failure = self.ledger.failures.get(name)
        return not (failure and failure.permanent and failure.fingerprint == self.worker_spec(model).fingerprint)

    # -- what the api reads (view.py) -------------------------------------------------
    def desired_phase(self, model: ModelSpec) -> Phase:
        return Phase.READY if model.state == DesiredModelState.LOADED else Phase.UNLOADED

    def converged(self) -> bool:
        if self.desired is None or self.observed_generation != self.generation or self.actions.tasks:
            return False
        for model in self.desired.models:
            phase = self.statuses.get(model.name, ModelStatus()).phase
            if model.state == DesiredModelState.ON_DEMAND:
                if phase not in (Phase.READY, Phase.UNLOADED):
                    return False
            elif phase != self.desired_phase(model):
                return False
        return True

    def observation(self) -> dict:
        """What the loop observes, as plain data: enough for `lmx plan` to plan against this server."""
        return statuses.observation(self)

    # -- shutdown -----------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop the loop, every load and unload, then every worker; bounded by the stop grace."""
        self.stopping = True  # before cancelling: the loop cannot start another pass
        self.wake.set()
        await self.supervisor.stop(self.settings.stop_grace)
        await self.actions.cancel_all()
        await self.pool.stop_all(self.settings.stop_grace)
