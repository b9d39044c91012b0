"""The observe half of a pass: read models.yaml (keeping the last good state on an error), and
measure the workers the ledger knows into what the planner reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opta_lmx.engine.memory import ModelDirectoryError, WorkerMemory
from opta_lmx.reconciler.plan import ObservedWorker
from opta_lmx.state.document import ConfigError, FieldProblem, read_document
from opta_lmx.state.spec import DesiredModelState
from opta_lmx.state.status import ConfigStatus

if TYPE_CHECKING:
    from opta_lmx.reconciler.controller import Reconciler

log = logging.getLogger(__name__)


# Reading and validating models.yaml runs in a thread, so a huge or hostile file never stalls
# the gateway; past this the pass goes on with the last good state (the read is not abandoned:
# a thread cannot be killed, and the file's own limits bound it).
READ_TIMEOUT = 30.0
# Estimating a model reads its directory (config.json, weights sizes) in a thread, this long at most.
ESTIMATE_TIMEOUT = 10.0


async def read_desired(rec: Reconciler) -> None:
    """Accept models.yaml as a new generation if it changed; a bad file leaves the last good state live.

    Read off the event loop (issue 12): parsing a large or slow file never blocks serving.
    """
    try:
        try:
            document = await asyncio.wait_for(asyncio.to_thread(read_document, rec.config_path), READ_TIMEOUT)
        except asyncio.TimeoutError:
            raise ConfigError(str(rec.config_path), [FieldProblem(
                "", f"reading the file took longer than {READ_TIMEOUT:.0f}s", None, None)]) from None
    except ConfigError as error:
        if rec.config_status.valid or rec.config_status.error != error.to_dict():
            if error.kind == "incomplete":  # a file being written (truncated, then filled): not "no models"
                log.info("models.yaml is empty for now; the last good state stays live")
                rec.events.record("config", "ConfigIncomplete", error.describe())
            else:
                log.error("models.yaml rejected; the last good state stays live:\n%s", error.describe())
                rec.events.record("config", "InvalidConfig", error.describe(), kind="Warning")
        rec.config_status = ConfigStatus(
            path=str(rec.config_path), valid=False, error=error.to_dict(),
            last_good_etag=rec.document.etag if rec.document else None, checked_at=rec.clock(),
        )
        return
    if rec.document is None or document.etag != rec.document.etag:
        rec.generation += 1
        rec.events.record("config", "ConfigAccepted",
                          f"generation {rec.generation} ({len(document.state.models)} models)")
        log.info("models.yaml accepted as generation %d", rec.generation)
        rec.document = document
        rec.desired = document.state

        def unchanged(name: str, failure) -> bool:  # a changed entry is tried again from scratch
            model = document.state.model(name)
            return model is not None and rec.worker_spec(model).fingerprint == failure.fingerprint

        rec.ledger.forget_failures(unchanged)
    rec.config_status = ConfigStatus(
        path=str(rec.config_path), valid=True, last_good_etag=document.etag, checked_at=rec.clock()
    )


async def estimate_models(rec: Reconciler) -> None:
    """Estimate each model not yet estimated, in a thread with a deadline (it reads the model's
    directory). A directory that cannot be read fails its model for good (until the entry
    changes), a timeout or another error with backoff; the other models go on."""
    if rec.desired is None:
        return
    for model in rec.desired.models:
        try:
            spec, override = rec.worker_spec(model), model.memory_bytes()
        except Exception as error:  # noqa: BLE001 - a value validation let through: this model alone fails
            log.exception("model %s: its entry cannot be turned into a worker spec", model.name)
            rec.events.record(model.name, "InvalidEntry", f"{type(error).__name__}: {error}", kind="Warning")
            continue
        if rec.accounts.known(spec, override):
            continue
        try:
            await rec.accounts.estimate_off_loop(spec, override, ESTIMATE_TIMEOUT)
        except asyncio.TimeoutError:
            rec.actions.fail(model.name, spec.fingerprint, f"reading the model directory {spec.source} took longer "
                             f"than {ESTIMATE_TIMEOUT:.0f}s", permanent=False)
        except ModelDirectoryError as error:
            rec.actions.fail(model.name, spec.fingerprint, f"cannot use {spec.source}: {error}", permanent=True)
        except Exception as error:  # noqa: BLE001 - OSError, OverflowError...: this model alone backs off
            log.exception("estimating %s raised", model.name)
            rec.actions.fail(model.name, spec.fingerprint, f"estimating its memory failed: "
                             f"{type(error).__name__}: {error}", permanent=False)


def observe(rec: Reconciler, fingerprints: dict[str, str], figures: Mapping[str, WorkerMemory]) -> list[ObservedWorker]:
    """The ledger's workers (serving, draining, loading) with what each holds: the figures the pool
    measured this pass (a worker it could not measure counts as before), and a load what it was
    planned at (the figure stays put until the worker runs and is measured)."""
    assert rec.desired is not None
    observed = []
    for entry in rec.ledger.processes():
        figure = figures.get(entry.worker_id or "")
        if figure is not None:
            entry.measured_bytes, entry.mlx_bytes = figure.counted_bytes, figure.mlx_bytes
            rec.accounts.measured(entry.fingerprint, entry.measured_bytes, entry.forked)
        observed.append(ObservedWorker(entry.model, entry.key, entry.fingerprint, True, rec.worker_bytes(entry),
                                       entry.traffic.in_flight))
    for entry in rec.ledger:
        if entry.loading:
            observed.append(ObservedWorker(entry.model, entry.key, entry.fingerprint, False, entry.planned_bytes))
    return observed


def blocked(rec: Reconciler, fingerprints: dict[str, str], now: float) -> frozenset[str]:
    """Models that must not start now: backing off, failed for this spec, or still being sized."""
    return rec.ledger.blocked(fingerprints, now) | rec.downloads.sizing()


def wake_times(rec: Reconciler, now: float) -> list[float]:
    """When a later pass has something to do: a backoff ends, an idle TTL or a demand expires."""
    assert rec.desired is not None
    times = [f.retry_at for f in rec.ledger.failures.values() if not f.permanent]
    for name, seconds in rec.idle_seconds(now).items():
        model = rec.desired.model(name)
        ttl = model.idle_ttl_seconds() if model and model.state == DesiredModelState.ON_DEMAND else None
        if ttl is not None:
            times.append(now + max(ttl - seconds, 0.0))
    times += [t + rec.settings.demand_ttl for t in rec.demand.values()]
    return [t for t in times if t > now]
