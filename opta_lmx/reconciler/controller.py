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
import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.engine.pool import Pool
from opta_lmx.engine.prepared import HelperMemory, resolve_mode
from opta_lmx.engine.worker import Worker, WorkerSpec
from opta_lmx.reconciler import adoption, observing, starts, statuses
from opta_lmx.reconciler.starts import engine_start
from opta_lmx.reconciler.accounting import MemoryAccounts, memory_figures, resolve_source, worker_spec
from opta_lmx.reconciler.acting import Actions
from opta_lmx.reconciler.demand import Waiting
from opta_lmx.reconciler.downloads import Downloads, HubClient
from opta_lmx.reconciler.ledger import Backoff, Failure, Ledger, Traffic, WorkerEntry, WorkerPhase
from opta_lmx.reconciler.plan import MemoryFigures, ObservedWorker, Plan, Unschedulable, plan
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
    watch_debounce_ms: int = 100  # a burst of changes is grouped for at most this long...
    watch_step_ms: int = 10  # ...and reported once none came for this long (watchfiles' `step`; was 50)
    drain_timeout: float = 30.0  # in-flight requests of a worker being unloaded get this long
    memory_wait_timeout: float = 300.0  # a load waiting for unloads to free memory gives up after this
    demand_ttl: float = 120.0  # an on-demand request counts as demand this long (its wait bound)
    demand_grace: float = 2.0  # ...but only this long once no request waits for it (then its load is cancelled)
    memory_check_interval: float = 2.0  # how often free memory is compared with the reserve
    pass_backoff_base: float = 0.1  # a pass that raised is retried after this, doubling per failure...
    pass_backoff_max: float = 5.0  # ...up to this
    pass_timeout: float = 120.0  # the watchdog: a pass still running after this is cancelled and retried


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
        hub: HubClient | None = None,
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
        self.routes = RouteTable(self.expects_ready, on_waiters_changed=self.nudge)
        self.downloads = Downloads(self.events, self.nudge, self._download_failed, lambda: self.clock(),
                                   hub or HubClient(), lambda name: statuses.show_download(self, name))
        self.accounts = MemoryAccounts(hub=self.downloads)
        self.actions = Actions(self)
        self.supervisor = Supervisor(self, Backoff(settings.pass_backoff_base, settings.pass_backoff_max))
        self.memory_probe = memory_probe  # () -> (physical bytes, available bytes)
        self.memory = MemoryFigures()
        self.physical_bytes = 0
        self.helper = HelperMemory()  # what the fast starts held at the last pass
        self.start_choice: starts.StartChoice | None = None  # how workers start, and why (reconciler/starts.py)
        self._yielded: str | None = None
        self.demand: dict[str, float] = {}  # on-demand model -> when a request last asked for it
        self.verdicts: dict[str, Unschedulable] = {}
        self.waiting: dict[str, Waiting] = {}  # requested models waiting for protected holders (demand.py)
        self.unloads_by_reason: collections.Counter[str] = collections.Counter()  # workers unloaded, by reason
        self.demand_evictions: collections.Counter[tuple[str, str]] = collections.Counter()  # (evicted, for)
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
            took = time.perf_counter() - started
            log.debug("pass %d took %.3fs", self.passes, took)
            for listener in self.pass_listeners:
                listener(took)

    async def _reconcile_once(self) -> None:
        await observing.read_desired(self)
        if self._recovered is None:
            found = self.pool.recover()
            adoption.report_rejected(self, found.rejected)
            self._recovered = found.workers
        if self._recovered and self.desired is not None:
            recovered, self._recovered = self._recovered, []
            await adoption.adopt_recovered(self, recovered)
        adoption.reap_exited(self)
        if self.desired is None:
            return
        await observing.estimate_models(self)
        fingerprints = self.fingerprints()
        measurements = await self.pool.measure()  # every worker and the helpers, off the event loop
        self.accounts.learn_helper(measurements.helper)
        now = self.clock()
        observed = with_traffic(self, observing.observe(self, fingerprints, measurements.workers), now)
        physical, available = self.memory_probe()
        self.physical_bytes = physical
        self.helper = measurements.helper
        self.planning_estimates(fingerprints)  # starts reading hub models' sizes (off the loop): held back meanwhile
        blocked = observing.blocked(self, fingerprints, now)
        demand, idle, waited = self.active_demand(), self.idle_seconds(now), self.routes.waited_seconds()

        def plan_for(option: starts.StartOption) -> Plan:
            return plan(self.desired, fingerprints, observed, blocked,
                        memory=memory_figures(self.desired, physical, available, option.fixed_bytes),
                        estimates=self.planning_estimates(fingerprints, option.forked),
                        demand=demand, idle=idle, waited=waited)

        wanted = engine_start(self.desired)
        choice = starts.choose(starts.options(resolve_mode(wanted.mode), wanted.spares, measurements.helper,
                                              self.accounts.helper_costs), plan_for)
        self._yielded = starts.announce(self.events, self._yielded, choice)
        self.start_choice = choice
        self.pool.configure_starts(choice.option.engine_start(wanted))  # fast starts (engine/prepared.py)
        self.memory = memory_figures(self.desired, physical, available, choice.option.fixed_bytes)
        result = choice.plan
        self.verdicts, self.waiting = result.unschedulable, result.waiting
        count_unloads(self, result)
        self.actions.apply(result.actions)
        self.downloads.keep({m.name: self.worker_spec(m).source for m in self.desired.models
                             if m.state != DesiredModelState.UNLOADED})
        statuses.update_statuses(self, fingerprints, blocked)
        self.observed_generation = self.generation
        wake_times = observing.wake_times(self, now) + [now + w.retry_after for w in result.waiting.values()]
        wake_times += [since + self.settings.demand_grace for since in self.demand.values()
                       if since + self.settings.demand_grace > now]
        if wake_times:
            asyncio.get_running_loop().call_later(min(wake_times) - now + 0.01, self.nudge)

    def _download_failed(self, name: str, fingerprint: str, message: str, permanent: bool) -> float:
        """Reading a hub model's size failed: a failure like a load's; when it may be tried again."""
        self.actions.fail(name, fingerprint, message, permanent=permanent)
        return self.ledger.failures[name].retry_at

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

    def planning_estimates(self, fingerprints: dict[str, str], forked: bool = False) -> dict[str, int]:
        """Estimates for workers started this way (`forked`: from a waiting template), raised to what
        a worker of the same spec started the same way was measured at (no re-admission on a guess)."""
        assert self.desired is not None
        return {m.name: self.accounts.planning(self.estimate(m), fingerprints[m.name], forked)
                for m in self.desired.models}

    def worker_bytes(self, entry: WorkerEntry) -> int:
        """What a worker counts for in planning: the entry's `memory:` override, else its measurement."""
        assert self.desired is not None
        model = self.desired.model(entry.model)
        current = None
        if model is not None and self.worker_spec(model).fingerprint == entry.fingerprint:
            current = self.estimate(model)
        return self.accounts.held(current, entry.fingerprint, entry.measured_bytes, entry.forked)

    # -- demand and idleness (observations the planner reads) -------------------------
    def request_model(self, name: str) -> None:
        """A request is waiting for on-demand model `name`: an observation the next pass reads."""
        self.demand[name] = self.clock()
        self.nudge()

    def active_demand(self) -> frozenset[str]:
        """Models requests wait for: asked for within `demand_grace`, or with a waiter registered
        on the route table (bounded by `demand_ttl`). A model with a route is served, not in demand."""
        now = self.clock()
        for name, since in list(self.demand.items()):
            abandoned = now - since > self.settings.demand_grace and not self.routes.waiters(name)
            if now - since > self.settings.demand_ttl or name in self.routes or abandoned:
                del self.demand[name]
        return frozenset(self.demand)

    def idle_seconds(self, now: float) -> dict[str, float]:
        """Per model, seconds since its workers last served or became Ready (0 while any request is
        in flight or waits for it: a request woken by the route is not yet counted in flight)."""
        idle: dict[str, float] = {}
        for entry in self.ledger.processes():
            seconds = 0.0 if self.routes.waiters(entry.model) else entry.traffic.idle_seconds(now)
            ready_at = getattr(self.pool.get(entry.worker_id or ""), "ready_at", None)
            if ready_at:
                seconds = min(seconds, max(0.0, now - ready_at))
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
        if (self.desired is None or self.observed_generation != self.generation or self.actions.tasks
                or self.downloads.busy()):
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
        await self.downloads.cancel_all(self.settings.stop_grace)
        await self.pool.stop_all(self.settings.stop_grace)


def with_traffic(rec: Reconciler, observed: list[ObservedWorker], now: float) -> list[ObservedWorker]:
    """Observed workers with what demand swapping reads: seconds since Ready, requests in flight
    plus those queued for a concurrency slot."""
    result = []
    for worker in observed:
        process = rec.pool.get(worker.worker_id) if worker.ready else None
        ready_at = getattr(process, "ready_at", None)
        route = rec.routes.get(worker.name)
        queued = rec.routes.waiters(worker.name) if route and route.worker_id == worker.worker_id else 0
        entry = rec.ledger.get(worker.worker_id)
        draining = entry is not None and entry.phase in (WorkerPhase.DRAINING, WorkerPhase.STOPPING)
        result.append(dataclasses.replace(
            worker, ready_seconds=max(0.0, now - ready_at) if ready_at else 0.0,
            in_flight=worker.in_flight + queued, draining=draining, queued=queued))
    return result


def count_unloads(rec: Reconciler, result: Plan) -> None:
    """Count each worker's unload once, by reason, and record who demand evicted for whom."""
    for action in result.unloads():
        entry = rec.ledger.get(action.worker_id)
        if entry is None or not entry.serving:
            continue
        rec.unloads_by_reason[action.reason.value] += 1
        if action.reason.value == "demand":
            for name in [load.name for load in result.loads() if action.worker_id in load.after] or ["?"]:
                rec.demand_evictions[(action.name, name)] += 1
