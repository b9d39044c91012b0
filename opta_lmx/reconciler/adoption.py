"""Workers the loop did not start: a previous run's (adopted or stopped) and the ones that exited.

A previous run's workers are recovered once (the pool rebuilds them from their records, which it
checks: engine/records.py) and stay pending here until each is adopted (an entry in the ledger,
routed) or stopped (gone from the pool). A pass cancelled in the middle (the watchdog, a
shutdown) leaves the rest pending for the next pass: no worker is ever alive in the pool and
outside the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from opta_lmx.engine.pool import Pool, RejectedRecord, WorkerHandle
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.ledger import Ledger, WorkerEntry, WorkerPhase
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import EventLog

log = logging.getLogger(__name__)

RouteReady = Callable[[WorkerEntry, WorkerHandle], Awaitable[None]]
CHECK_TIMEOUT = 5.0  # one recovered worker's port, health and identity checks, at most


class Adopter:
    """A previous run's workers, from their records to the ledger or to a stop."""

    def __init__(self, pool: Pool, ledger: Ledger, events: EventLog, stop_grace: float, route_ready: RouteReady):
        self.pool, self.ledger, self.events = pool, ledger, events
        self.stop_grace = stop_grace
        self.route_ready = route_ready
        self.pending: list[WorkerHandle] | None = None  # None: the records are not read yet

    async def adopt(self, desired: DesiredState | None, spec_of: Callable[[ModelSpec], WorkerSpec]) -> None:
        """Keep the previous run's workers that are healthy and still wanted as they are; stop the rest.

        Adopted workers are not reloaded (same pid). Of two workers of one model (a crash
        mid-swap) only the newer one is kept, so a restart never leaves a duplicate. Every worker
        here is one this user started (`engine.records.belongs_to_us`), so stopping one is safe.
        """
        if self.pending is None:
            found = await asyncio.to_thread(self.pool.recover)  # reads the records: off the event loop
            self._report(found.rejected)
            self.pending = list(found.workers)
        if not self.pending or desired is None:
            return
        recovered = list(self.pending)
        health = await asyncio.gather(*(_adoptable(w) for w in recovered), return_exceptions=True)
        healthy = {w.id for w, ok in zip(recovered, health) if ok is True}
        to_stop = self._decide(recovered, healthy, desired, spec_of)
        for worker in [w for w in recovered if all(w is not s for s, _ in to_stop)]:
            entry = self.ledger.adopt(worker.spec.name, worker.spec.fingerprint, worker,
                                      f"kept worker pid {worker.pid} at {worker.address} from the previous run")
            self.pending.remove(worker)  # in the ledger from here on: a cancel below still leaves it counted
            log.info("adopted worker %s of %s (pid %s) at %s", worker.id, worker.spec.name, worker.pid, worker.address)
            await self.route_ready(entry, worker)
        await self._stop(to_stop)

    def _decide(self, recovered: list[WorkerHandle], healthy: set[str], desired: DesiredState,
                spec_of: Callable[[ModelSpec], WorkerSpec]) -> list[tuple[WorkerHandle, str]]:
        """Which recovered workers are stopped, and why (the others are adopted)."""
        adopted_names: set[str] = set()
        to_stop: list[tuple[WorkerHandle, str]] = []
        for worker in sorted(recovered, key=lambda w: w.started_at or 0.0, reverse=True):
            name = worker.spec.name
            model = desired.model(name)
            if worker.unadoptable:
                to_stop.append((worker, worker.unadoptable))
            elif model is None or model.state == DesiredModelState.UNLOADED:  # on-demand ones are kept (idle TTL)
                to_stop.append((worker, "no longer desired"))
            elif spec_of(model).fingerprint != worker.spec.fingerprint:
                to_stop.append((worker, "its spec changed"))
            elif worker.id not in healthy:
                to_stop.append((worker, "not healthy, or could not prove it holds its key on its port"))
            elif name in adopted_names:
                to_stop.append((worker, "a duplicate"))
            else:
                adopted_names.add(name)
        return to_stop

    async def _stop(self, to_stop: list[tuple[WorkerHandle, str]]) -> None:
        for worker, why in to_stop:
            self.events.record(worker.spec.name, "StoppedLeftover",
                               f"stopping worker pid {worker.pid} from the previous run: {why}")
            log.info("stopping worker %s (pid %s) from the previous run: %s", worker.id, worker.pid, why)

        async def stop(worker: WorkerHandle) -> None:
            await self.pool.stop(worker, self.stop_grace)
            if self.pending is not None and worker in self.pending:
                self.pending.remove(worker)  # only once it is gone: a cancel meanwhile retries it next pass

        stopped = await asyncio.gather(*(stop(w) for w, _ in to_stop), return_exceptions=True)
        for (worker, _), outcome in zip(to_stop, stopped):
            if isinstance(outcome, BaseException):
                log.error("stopping worker %s (pid %s) from the previous run raised: %r", worker.id, worker.pid, outcome)

    def _report(self, rejected: list[RejectedRecord]) -> None:
        """Records that did not prove their process is ours: deleted by the pool, never signalled."""
        for record in rejected:
            self.events.record(record.name, "RecordRejected", f"worker record {record.worker_id} deleted; its "
                               f"process is left alone: {record.why}", kind="Warning")


async def _adoptable(worker: WorkerHandle) -> bool:
    """It owns the port its record names, answers /health with its model loaded, and proves it
    holds its key there (engine/worker_auth.py): only then are requests and its key sent to it.
    Bounded (CHECK_TIMEOUT): a check that does not answer counts as unhealthy, so it is stopped."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await asyncio.to_thread(worker.owns_port) and await worker.healthy()
    except TimeoutError:
        return False


def reap_exited(pool: Pool, ledger: Ledger, drop_route: Callable[[WorkerEntry], None], now: float,
                stable_after: float) -> None:
    """Serving workers that exited by themselves: forget them and back off before a restart."""
    for worker in pool.workers():
        entry = ledger.get(worker.id)
        if worker.alive() or worker.stopping or entry is None or not entry.serving:
            continue
        pool.forget(worker)
        drop_route(entry)
        ledger.move(entry, WorkerPhase.GONE)
        uptime = now - (worker.ready_at or now)
        ledger.crashed(entry.model, entry.fingerprint, worker.returncode, uptime, stable_after)
