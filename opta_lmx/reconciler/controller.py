"""The level-triggered control loop: one pass as a pipeline of data.

A file change, a worker exit, a finished load and a periodic resync all just say "reconcile";
the supervisor (supervision.py) runs every pass. A pass reads models.yaml (intake.py), settles a
previous run's workers and the ones that exited (adoption.py), observes into a frozen
`Observation` (observing.py: estimates, the pool's measurements, the ledger, the routes, the
requests), plans (plan.py and starts.py: pure), acts through `Actions` (acting.py, tasks so a slow
load never blocks the next edit), and writes every status once (statuses.py). `Reconciler` owns
the parts and hands each one only what it needs; it is also what the api reads (view.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.pool import Pool, WorkerHandle
from opta_lmx.engine.prefix_cache import CacheFigures
from opta_lmx.engine.prepared import HelperMemory, resolve_mode
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler import accounting, observing, report, starts
from opta_lmx.reconciler.accounting import MemoryAccounts, memory_figures, resolve_source, worker_spec
from opta_lmx.reconciler.acting import ActingSettings, Actions
from opta_lmx.reconciler.adoption import Adopter, reap_exited
from opta_lmx.reconciler.downloads import Downloads, HubClient
from opta_lmx.reconciler.fleet import Fleet
from opta_lmx.reconciler.intake import ConfigIntake
from opta_lmx.reconciler.ledger import Backoff, Failure, Ledger, Traffic, WorkerEntry
from opta_lmx.reconciler.observing import Observation
from opta_lmx.reconciler.plan import MemoryFigures, Plan, plan
from opta_lmx.reconciler.requests import Requests
from opta_lmx.reconciler.routes import Route, RouteTable
from opta_lmx.reconciler.starts import engine_start
from opta_lmx.reconciler.statuses import PassVerdicts, StatusBook
from opta_lmx.reconciler.supervision import Supervisor, SupervisorSettings
from opta_lmx.reconciler.view import LoopHealth
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import EventLog, ModelStatus, Phase

log = logging.getLogger(__name__)

__all__ = ["Failure", "LoopSettings", "Reconciler", "Route", "Traffic", "engine_start", "resolve_source"]

ACCEPT_TIMEOUT = 30.0  # how long a writer waits for the pass that reads its edit


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
    def __init__(self, config_path: str | os.PathLike[str], pool: Pool, *, settings: LoopSettings = LoopSettings(),
                 events: EventLog | None = None, clock=time.time,
                 memory_probe: Callable[[], tuple[int, int]] = engine_memory.machine_memory,
                 hub: HubClient | None = None, fleet: Fleet | None = None):
        self.config_path = Path(config_path)
        self.fleet = fleet  # this host's view of the fleet (fleet.py); None: one host serves the whole file
        self._here: DesiredState | None = None  # the file's share this host reconciles (the fleet's placement)
        self.pool = pool
        self.settings = settings
        self.events = events or EventLog(clock=clock)
        self.clock = clock
        self.memory_probe = memory_probe  # () -> (physical bytes, available bytes)
        self.intake = ConfigIntake(self.config_path, self.events, lambda: self.clock())
        self.ledger = Ledger(self.events, lambda: self.clock(), Backoff(settings.backoff_base, settings.backoff_max))
        self.routes = RouteTable(self.expects_ready, on_waiters_changed=self.nudge)
        self.requests = Requests(self.routes, self.ledger, lambda: self.clock(), demand_ttl=settings.demand_ttl,
                                 demand_grace=settings.demand_grace, nudge=self.nudge)
        self.downloads = Downloads(self.events, self.nudge, lambda *failed: sizing_failed(self.actions, *failed),
                                   lambda: self.clock(),
                                   hub or HubClient(), lambda name: self.book.show_download(name))
        self.accounts = MemoryAccounts(hub=self.downloads)
        # what unloading a worker gives back (accounting.py holds the rule)
        self._worker_bytes: Callable[[WorkerEntry], int] = lambda entry: accounting.worker_bytes(
            self.accounts, self.here, self.worker_spec, entry)
        self.book = StatusBook(self.ledger, self.routes, self.downloads, self.accounts, self.events,
                               lambda: self.clock(), self.worker_spec, lambda: self.requests.demand, self._worker_bytes,
                               caches=lambda: self.caches, placements=lambda: self.fleet.placements if self.fleet else {})
        self.actions = Actions(self.ledger, pool, self.routes, self.downloads, self.events, ActingSettings(
            settings.ready_timeout, settings.memory_wait_timeout, settings.drain_timeout, settings.stop_grace),
            spec_of=self.worker_spec, on_ready=self.requests.served, on_settled=self.book.refresh, nudge=self.nudge)
        self.adopter = Adopter(pool, self.ledger, self.events, settings.stop_grace, self.actions.route_ready)
        self.supervisor = Supervisor(self.reconcile_once, SupervisorSettings(
            settings.resync_interval, settings.pass_timeout, settings.stop_grace, settings.watch_debounce_ms,
            settings.watch_step_ms, settings.memory_check_interval), self.events, config_path=self.config_path,
            memory_probe=memory_probe,
            reserve=lambda: self.desired.memory.reserve_bytes() if self.desired is not None else None,
            backoff=Backoff(settings.pass_backoff_base, settings.pass_backoff_max))
        self.memory = MemoryFigures()
        self.physical_bytes = 0
        self.helper = HelperMemory()  # what the fast starts held at the last pass
        self.caches: dict[str, CacheFigures] = {}  # each model's kept prefix cache, as last read
        self.start_choice: starts.StartChoice | None = None  # how workers start, and why (starts.py)
        self._yielded: str | None = None
        self.observed: Observation | None = None  # the last pass's observation
        self.observed_generation = 0
        self.unloads_by_reason: collections.Counter[str] = collections.Counter()  # workers unloaded, by reason
        self.demand_evictions: collections.Counter[tuple[str, str]] = collections.Counter()  # (evicted, for)
        self.passes = 0
        self.pass_listeners: list = []  # called with each pass's duration in seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        pool.add_exit_listener(self._worker_exited)

    # -- what the api reads (view.py) ---------------------------------------------------
    generation = property(lambda self: self.intake.generation)
    desired = property(lambda self: self.intake.desired)  # what the file says
    here = property(lambda self: self._here if self.fleet is not None and self._here is not None else self.intake.desired)
    document = property(lambda self: self.intake.document)
    config_status = property(lambda self: self.intake.status)
    statuses = property(lambda self: self.book.statuses)
    demand = property(lambda self: self.requests.demand)
    stopping = property(lambda self: self.supervisor.stopping)

    # -- signals ------------------------------------------------------------------------
    def nudge(self) -> None:
        """Ask for a pass soon. Safe to call from any coroutine on the loop."""
        self.supervisor.nudge()

    async def accept_now(self) -> int:
        """Ask for a pass that reads models.yaml as it is now, await it, and return the generation in
        force: for a writer (the admin API) that must answer with the generation of its edit."""
        await self.supervisor.request_pass(ACCEPT_TIMEOUT)
        return self.generation

    def _worker_exited(self, _worker: WorkerHandle) -> None:
        """A worker's waiter thread saw it exit: reconcile on the loop's thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.supervisor.wake.set)

    async def run(self) -> None:
        """Reconcile until stopped or cancelled, surviving passes that raise (supervision.py)."""
        self._loop = asyncio.get_running_loop()
        await self.supervisor.run()

    def health(self) -> LoopHealth:
        """Whether the loop runs, and what went wrong in its passes (read by readiness and /metrics)."""
        return self.supervisor.health()

    async def wait_for_change(self, timeout: float) -> None:
        """Return when statuses are written again (after a pass, or a model settling), or after `timeout`."""
        await self.book.wait_for_change(timeout)

    # -- one pass -----------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """One pass (the supervisor runs it): read, settle leftovers, observe, plan, act, write status."""
        started = time.perf_counter()
        try:
            await self._pass()
        finally:
            self.passes += 1
            took = time.perf_counter() - started
            log.debug("pass %d took %.3fs", self.passes, took)
            for listener in self.pass_listeners:
                listener(took)

    async def _pass(self) -> None:
        self._loop = asyncio.get_running_loop()
        if await self.intake.read():
            accepted = self.intake.desired
            assert accepted is not None
            self.ledger.forget_failures(lambda name, failure: _unchanged(accepted, self.worker_spec, name, failure))
        if self.fleet is not None and self.intake.desired is not None:
            self._here = self.fleet.share(self.intake.desired, {n: s.phase for n, s in self.statuses.items()},
                                          lambda m: self.accounts.estimate(self.worker_spec(m), m.memory_bytes())
                                          .started(False).total_bytes)
        await self.adopter.adopt(self.here, self.worker_spec)
        reap_exited(self.pool, self.ledger, self.actions.drop_route, self.clock(), self.settings.stable_after)
        desired = self.here
        if desired is None:
            return
        observation = await self._observe(desired)
        choice = self._choose(observation)
        result = choice.plan
        count_unloads(self, result)
        self.actions.apply(result.actions)
        self.downloads.keep({m.name: self.worker_spec(m).source for m in desired.models
                             if m.state != DesiredModelState.UNLOADED})
        self.book.write(PassVerdicts(desired, self.generation, result.unschedulable, result.waiting,
                                     self.memory.budget_bytes, choice.option.forked))
        self.observed_generation = self.generation
        self._schedule(observation, result)

    async def _observe(self, desired: DesiredState) -> Observation:
        await observing.estimate_models(desired, self.worker_spec, self.accounts, self.actions.fail, self.events)
        fingerprints = self.fingerprints()
        measurements = await self.pool.measure()  # every worker and the helpers, off the event loop
        self.accounts.learn_helper(measurements.helper)
        self.helper = measurements.helper
        self.caches = measurements.caches
        self.pool.configure_caches(desired.prefix_caches.per_model_bytes(), desired.prefix_caches.total_bytes())
        self.actions.save_timeout = desired.prefix_caches.save_timeout_seconds()
        now = self.clock()
        workers = observing.observe_workers(self.ledger, self.routes, measurements.workers, self.accounts,
                                            self._worker_bytes, now)
        physical, available = self.memory_probe()
        self.physical_bytes = physical
        accounting.planning_estimates(self.accounts, desired, self.worker_spec, fingerprints)  # starts sizing hub ids
        blocked = self.ledger.blocked(fingerprints, now) | self.downloads.sizing()
        self.observed = Observation(now, desired, self.generation, fingerprints, workers, blocked,
                                    self.requests.active(), self.requests.idle(now), self.routes.waited_seconds(),
                                    physical, available, measurements.helper)
        return self.observed

    def _choose(self, seen: Observation) -> starts.StartChoice:
        """Plan once per way of starting workers and keep the first that costs no model (starts.py)."""
        def plan_for(option: starts.StartOption) -> Plan:
            return plan(seen.desired, seen.fingerprints, list(seen.workers), seen.blocked,
                        memory=memory_figures(seen.desired, seen.physical_bytes, seen.available_bytes,
                                              option.fixed_bytes),
                        estimates=accounting.planning_estimates(self.accounts, seen.desired, self.worker_spec,
                                                                dict(seen.fingerprints), option.forked),
                        demand=seen.demand, idle=seen.idle, waited=seen.waited)

        wanted = engine_start(seen.desired)
        choice = starts.choose(starts.options(resolve_mode(wanted.mode), wanted.spares, seen.helper,
                                              self.accounts.helper_costs), plan_for, starts.priorities(seen.desired))
        self._yielded = starts.announce(self.events, self._yielded, choice)
        self.start_choice = choice
        self.pool.configure_starts(choice.option.engine_start(wanted))  # fast starts (engine/prepared.py)
        self.memory = memory_figures(seen.desired, seen.physical_bytes, seen.available_bytes,
                                     choice.option.fixed_bytes)
        return choice

    def _schedule(self, seen: Observation, result: Plan) -> None:
        """A later pass when something is due: a backoff or an idle TTL ends, demand runs out, a swap."""
        now = seen.now
        times = observing.wake_times(seen.desired, self.ledger, seen.idle, now) + self.requests.wake_times(now)
        times += [now + w.retry_after for w in result.waiting.values()]
        if times:
            asyncio.get_running_loop().call_later(min(times) - now + 0.01, self.nudge)

    # -- specs and memory (accounting.py holds the rules) ------------------------------
    def worker_spec(self, model: ModelSpec) -> WorkerSpec:
        assert self.desired is not None
        return worker_spec(self.config_path, self.desired, model)

    def fingerprints(self) -> dict[str, str]:
        """Each desired model's wanted worker fingerprint."""
        return {m.name: self.worker_spec(m).fingerprint for m in self.desired.models} if self.desired else {}

    # -- what the gateway asks (view.GatewayView) ---------------------------------------
    def resolve(self, name_or_alias: str) -> ModelSpec | None:
        return self.desired.resolve(name_or_alias) if self.desired else None

    def note_request(self, name: str) -> None:
        """The gateway saw a request for `name`: an on-demand model without a route is now in demand."""
        model = self.here.model(name) if self.here else None
        if model is not None and model.state == DesiredModelState.ON_DEMAND and name not in self.routes:
            self.requests.asked(name)

    def route(self, name: str) -> Route | None:
        return self.routes.get(name)

    def worker_alive(self, worker_id: str) -> bool:
        """Whether the worker behind a route still runs (a request to a dead one waits for the next route)."""
        worker = self.pool.get(worker_id)
        return worker is None or worker.alive()

    def expects_ready(self, name: str) -> bool:
        """Whether `name` may still become ready (so waiting is worthwhile): desired loaded, or
        on-demand and asked for; not failed for good, and not refused for want of memory."""
        model = self.here.model(name) if self.here else None
        if model is None or model.state == DesiredModelState.UNLOADED:
            return False
        loading = self.ledger.load_of(name) is not None
        if model.state == DesiredModelState.ON_DEMAND and name not in self.requests.demand and not loading:
            return False
        verdicts = self.book.verdicts
        if verdicts is not None and name in verdicts.unschedulable and not loading:
            return False
        failure = self.ledger.failures.get(name)
        return not (failure and failure.permanent and failure.fingerprint == self.worker_spec(model).fingerprint)

    # -- what the admin api reads (view.ControlLoopView) ---------------------------------
    def desired_phase(self, model: ModelSpec) -> Phase:
        here = self.here.model(model.name) if self.fleet is not None and self.here is not None else model
        return Phase.READY if (here or model).state == DesiredModelState.LOADED else Phase.UNLOADED

    def converged(self) -> bool:
        if (self.here is None or self.observed_generation != self.generation or self.actions.tasks
                or self.downloads.busy()):
            return False
        for model in self.here.models:
            phase = self.statuses.get(model.name, ModelStatus()).phase
            if model.state == DesiredModelState.ON_DEMAND:
                if phase not in (Phase.READY, Phase.UNLOADED):
                    return False
            elif phase != self.desired_phase(model):
                return False
        return True

    def kept_caches(self) -> dict[str, dict]:
        """Each model's kept prefix cache (engine/prefix_cache.py), as the last pass read it."""
        return {name: figures.to_dict() for name, figures in sorted(self.caches.items())}

    async def clear_caches(self, model: str | None) -> tuple[list[str], list[str]]:
        """Remove kept prefix caches (of `model`, else all) that no running worker holds:
        (removed as `model/key`, models whose cache a running worker holds)."""
        removed, held = await self.pool.clear_caches(model)
        for what in removed:
            self.events.record(what.split("/", 1)[0], "CacheCleared", f"kept prefix cache {what} removed")
        self.caches = {name: f for name, f in self.caches.items()
                       if f.in_use or (model is not None and name != model)}
        self.nudge()
        return removed, held

    def observation(self) -> dict:
        """What the loop observes, as plain data: enough for `lmx plan` to plan against this server."""
        now = self.clock()
        return report.observation(ledger=self.ledger, accounts=self.accounts, memory=self.memory,
                                  physical_bytes=self.physical_bytes, choice=self.start_choice, helper=self.helper,
                                  worker_bytes=self._worker_bytes, demand=self.requests.demand,
                                  waited=self.routes.waited_seconds(), idle=self.requests.idle(now), now=now)

    # -- shutdown -----------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop the loop, every load and unload, then every worker; bounded by the stop grace."""
        await self.supervisor.stop(self.settings.stop_grace)  # sets `stopping` first: no pass starts after
        await self.actions.cancel_all()
        await self.downloads.cancel_all(self.settings.stop_grace)
        await self.pool.stop_all(self.settings.stop_grace)


def _unchanged(desired: DesiredState, spec_of: Callable[[ModelSpec], WorkerSpec], name: str, failure: Failure) -> bool:
    """Whether a failure's entry is unchanged (a changed entry is tried again from scratch)."""
    model = desired.model(name)
    return model is not None and spec_of(model).fingerprint == failure.fingerprint


def sizing_failed(actions: Actions, name: str, fingerprint: str, message: str, permanent: bool) -> float:
    """Reading a hub model's size failed: a failure like a load's; when it may be tried again."""
    actions.fail(name, fingerprint, message, permanent=permanent)
    return actions.ledger.failures[name].retry_at


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
