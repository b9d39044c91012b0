"""The observe step of a pass: everything the planner reads, gathered once into a frozen `Observation`.

Models are estimated in threads (each reads its directory, bounded); workers are measured by the
pool (every pass, off the event loop); the ledger says what runs and what loads, the route table
what is in flight and queued, the request book what is asked for. The planner (plan.py) and the
status writer (statuses.py) read the observation and nothing else of this pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opta_lmx.engine.memory import ModelDirectoryError, WorkerMemory
from opta_lmx.engine.prepared import HelperMemory
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.accounting import MemoryAccounts
from opta_lmx.reconciler.ledger import Ledger, WorkerEntry, WorkerPhase
from opta_lmx.reconciler.plan import ObservedWorker
from opta_lmx.reconciler.routes import RouteTable
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import EventLog

log = logging.getLogger(__name__)

# Estimating a model reads its directory (config.json, weights sizes) in a thread, this long at most.
ESTIMATE_TIMEOUT = 10.0

SpecOf = Callable[[ModelSpec], WorkerSpec]
Fail = Callable[..., None]  # (model, fingerprint, message, *, permanent) -> None


@dataclass(frozen=True)
class Observation:
    """One pass's view of the world: what the planner and the status writer read."""

    now: float
    desired: DesiredState
    generation: int
    fingerprints: Mapping[str, str]
    workers: tuple[ObservedWorker, ...]
    blocked: frozenset[str]
    demand: frozenset[str]
    idle: Mapping[str, float]
    waited: Mapping[str, float]
    physical_bytes: int
    available_bytes: int
    helper: HelperMemory = field(default_factory=HelperMemory)


async def estimate_models(desired: DesiredState, spec_of: SpecOf, accounts: MemoryAccounts, fail: Fail,
                          events: EventLog) -> None:
    """Estimate each model not yet estimated, in a thread with a deadline (it reads the model's
    directory). A directory that cannot be read fails its model for good (until the entry
    changes), a timeout or another error with backoff; the other models go on."""
    for model in desired.models:
        try:
            spec, override = spec_of(model), model.memory_bytes()
        except Exception as error:  # noqa: BLE001 - a value validation let through: this model alone fails
            log.exception("model %s: its entry cannot be turned into a worker spec", model.name)
            events.record(model.name, "InvalidEntry", f"{type(error).__name__}: {error}", kind="Warning")
            continue
        if accounts.known(spec, override):
            continue
        try:
            await accounts.estimate_off_loop(spec, override, ESTIMATE_TIMEOUT)
        except asyncio.TimeoutError:
            fail(model.name, spec.fingerprint, f"reading the model directory {spec.source} took longer "
                 f"than {ESTIMATE_TIMEOUT:.0f}s", permanent=False)
        except ModelDirectoryError as error:
            fail(model.name, spec.fingerprint, f"cannot use {spec.source}: {error}", permanent=True)
        except Exception as error:  # noqa: BLE001 - OSError, OverflowError...: this model alone backs off
            log.exception("estimating %s raised", model.name)
            fail(model.name, spec.fingerprint, f"estimating its memory failed: {type(error).__name__}: {error}",
                 permanent=False)


def observe_workers(ledger: Ledger, routes: RouteTable, figures: Mapping[str, WorkerMemory], accounts: MemoryAccounts,
                    worker_bytes: Callable[[WorkerEntry], int], now: float) -> tuple[ObservedWorker, ...]:
    """The ledger's workers (serving, draining, loading) with what each holds (the pool's figures of
    this pass; one it could not measure counts as before; a load what it was planned at) and what
    demand swapping reads of each: seconds since Ready, requests in flight plus those queued."""
    observed = []
    for entry in ledger.processes():
        figure = figures.get(entry.worker_id or "")
        if figure is not None:
            entry.measured_bytes, entry.mlx_bytes = figure.counted_bytes, figure.mlx_bytes
            accounts.measured(entry.fingerprint, entry.measured_bytes, entry.forked)
        route = routes.get(entry.model)
        queued = routes.waiters(entry.model) if route and route.worker_id == entry.worker_id else 0
        draining = entry.phase in (WorkerPhase.DRAINING, WorkerPhase.STOPPING)
        ready_seconds = max(0.0, now - entry.ready_at) if entry.ready_at else 0.0
        observed.append(ObservedWorker(entry.model, entry.key, entry.fingerprint, True, worker_bytes(entry),
                                       entry.traffic.in_flight + queued, ready_seconds, draining, queued))
    for entry in ledger:
        if entry.loading:
            observed.append(ObservedWorker(entry.model, entry.key, entry.fingerprint, False, entry.planned_bytes))
    return tuple(observed)


def wake_times(desired: DesiredState, ledger: Ledger, idle: Mapping[str, float], now: float) -> list[float]:
    """When a later pass has something to do: a backoff ends, an idle TTL runs out."""
    times = [f.retry_at for f in ledger.failures.values() if not f.permanent]
    for name, seconds in idle.items():
        model = desired.model(name)
        ttl = model.idle_ttl_seconds() if model and model.state == DesiredModelState.ON_DEMAND else None
        if ttl is not None:
            times.append(now + max(ttl - seconds, 0.0))
    return [t for t in times if t > now]
