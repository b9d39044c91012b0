"""Workers the loop did not start: a previous run's (adopted or stopped) and the ones that exited."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from opta_lmx.engine.pool import RejectedRecord
from opta_lmx.engine.worker import Worker
from opta_lmx.reconciler.ledger import WorkerPhase
from opta_lmx.state.spec import DesiredModelState
from opta_lmx.state.status import ModelStatus

if TYPE_CHECKING:
    from opta_lmx.reconciler.controller import Reconciler

log = logging.getLogger(__name__)


def report_rejected(rec: Reconciler, rejected: list[RejectedRecord]) -> None:
    """Records that did not prove their process is ours: deleted by the pool, never signalled."""
    for record in rejected:
        rec.events.record(record.name, "RecordRejected", f"worker record {record.worker_id} deleted; its process "
                          f"is left alone: {record.why}", kind="Warning")


async def _adoptable(worker: Worker) -> bool:
    """It owns the port its record names, answers /health with its model loaded, and proves it
    holds its key there (engine/worker_auth.py): only then are requests and its key sent to it."""
    return await asyncio.to_thread(worker.owns_port) and await worker.healthy()


async def adopt_recovered(rec: Reconciler, recovered: list[Worker]) -> None:
    """Keep the previous run's workers that are healthy and still wanted as they are; stop the rest.

    Adopted workers are not reloaded (same pid). Of two workers of one model (a crash
    mid-swap) only the newer one is kept, so a restart never leaves a duplicate. Every worker
    here is one this user started (`engine.records.belongs_to_us`), so stopping one is safe.
    """
    assert rec.desired is not None
    health = await asyncio.gather(*(_adoptable(w) for w in recovered), return_exceptions=True)
    healthy = {w.id for w, ok in zip(recovered, health) if ok is True}
    adopted_names: set[str] = set()
    to_stop: list[tuple[Worker, str]] = []
    for worker in sorted(recovered, key=lambda w: w.started_at or 0.0, reverse=True):
        name = worker.spec.name
        model = rec.desired.model(name)
        if getattr(worker, "unadoptable", None):
            to_stop.append((worker, worker.unadoptable))
        elif model is None or model.state == DesiredModelState.UNLOADED:  # on-demand ones are kept (idle TTL)
            to_stop.append((worker, "no longer desired"))
        elif rec.worker_spec(model).fingerprint != worker.spec.fingerprint:
            to_stop.append((worker, "its spec changed"))
        elif worker.id not in healthy:
            to_stop.append((worker, "not healthy, or could not prove it holds its key on its port"))
        elif name in adopted_names:
            to_stop.append((worker, "a duplicate"))
        else:
            adopted_names.add(name)
            entry = rec.ledger.adopt(name, worker.spec.fingerprint, worker,
                                     f"kept worker pid {worker.pid} at {worker.address} from the previous run")
            rec.statuses.setdefault(name, ModelStatus()).load_seconds = worker.load_seconds
            log.info("adopted worker %s of %s (pid %s) at %s", worker.id, name, worker.pid, worker.address)
            await rec.actions.route_ready(entry, worker)
    for worker, why in to_stop:
        rec.events.record(worker.spec.name, "StoppedLeftover",
                          f"stopping worker pid {worker.pid} from the previous run: {why}")
        log.info("stopping worker %s (pid %s) from the previous run: %s", worker.id, worker.pid, why)
    stopped = await asyncio.gather(*(rec.pool.stop(w, rec.settings.stop_grace) for w, _ in to_stop),
                                   return_exceptions=True)
    for (worker, _), outcome in zip(to_stop, stopped):
        if isinstance(outcome, BaseException):
            log.error("stopping worker %s (pid %s) from the previous run raised: %r", worker.id, worker.pid, outcome)


def reap_exited(rec: Reconciler) -> None:
    """Serving workers that exited by themselves: forget them and back off before a restart."""
    for worker in rec.pool.workers():
        entry = rec.ledger.get(worker.id)
        if worker.alive() or worker.stopping or entry is None or not entry.serving:
            continue
        rec.pool.forget(worker)
        rec.actions.drop_route(entry)
        rec.ledger.move(entry, WorkerPhase.GONE)
        uptime = rec.clock() - (worker.ready_at or rec.clock())
        failure = rec.ledger.crashed(entry.model, entry.fingerprint, worker.returncode, uptime,
                                     rec.settings.stable_after)
        status = rec.statuses.setdefault(entry.model, ModelStatus())
        status.restarts += 1
        status.last_error = failure.message
