"""Memory accounting: the one place that says how many bytes a model or a worker counts for.

Used by the loop and by `lmx plan` alike, so a preview plans with the loop's own rules: an
estimate is cached per fingerprint and knows how its worker will start (forked from the
template, or a fresh process), a planning estimate is raised to what a worker of the same spec,
started the same way, was measured at (no re-admission on a guess), and a `memory:` override
wins over both. What the helpers of fast starts cost is learned here too (reconciler/starts.py).
The model as a whole: docs/reconciler.md, "Memory accounting".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.engine.prepared import SPARE, TEMPLATE, HelperMemory
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.plan import MemoryFigures
from opta_lmx.reconciler.starts import HelperCosts
from opta_lmx.state.spec import DesiredState, ModelSpec

log = logging.getLogger(__name__)


def resolve_source(config_path: Path, source: str) -> str:
    """Local paths are taken relative to models.yaml; anything else is a hub id."""
    if source.startswith(("/", "./", "../", "~")):
        try:
            path = Path(source).expanduser()
            if not path.is_absolute():
                path = (Path(config_path).parent / path).resolve()
        except (RuntimeError, OSError, ValueError):  # `~nosuchuser/x`: the estimate fails the model
            return source
        return str(path)
    return source


def worker_spec(config_path: Path, desired: DesiredState, model: ModelSpec) -> WorkerSpec:
    """What a worker of `model` runs (its fingerprint says whether a running worker still matches)."""
    warm = model.prefix_cache.warm_prompts
    ranks: tuple[tuple[str, str], ...] = ()
    if model.distributed is not None:  # validated: every rank's host is in the fleet, with an address
        hosts = [desired.fleet.host(name) for name in model.distributed.hosts]
        ranks = tuple((host.ssh or host.hostname(), host.ring_ip() or "") for host in hosts if host is not None)
    return WorkerSpec(name=model.name, source=resolve_source(config_path, model.source),
                      engine=desired.effective_engine(model), kept_cache=desired.keeps_cache(model) and not ranks,
                      warm_prompts=resolve_path(config_path, warm) if warm and not ranks else None,
                      ranks=ranks, split=model.distributed.split if model.distributed else None)


def resolve_path(config_path: Path, path: str) -> str:
    """A file named in models.yaml: relative to the file, `~` expanded."""
    try:
        resolved = Path(path).expanduser()
    except RuntimeError:
        return path
    return str(resolved if resolved.is_absolute() else (Path(config_path).parent / resolved).resolve())


def memory_figures(desired: DesiredState, physical: int, available: int | None,
                   fixed_bytes: int = 0) -> MemoryFigures:
    """The budget left for workers: `fixed_bytes` (the engine's waiting template or spares,
    measured) comes off the top, since they hold that memory whatever runs."""
    budget = max(desired.memory.budget_bytes(physical) - fixed_bytes, 0)
    return MemoryFigures(budget, desired.memory.reserve_bytes(), available)


def planning_bytes(estimate: MemoryEstimate, measured_max: int) -> int:
    """What a model not yet running is planned at: its override, else max(estimate, measured)."""
    if estimate.override_bytes is not None:
        return estimate.override_bytes
    return max(estimate.total_bytes, measured_max)


def measured_key(fingerprint: str, forked: bool) -> str:
    """Measurements are kept per spec and per way of starting: a forked worker holds far less."""
    return f"{fingerprint}:forked" if forked else fingerprint


def held_bytes(current: MemoryEstimate | None, old_override: int | None, measured: int | None,
               measured_max: int = 0) -> int:
    """What a running worker counts for. `current`: the model's estimate if the worker runs its
    current spec (its override wins, else the measurement); an old spec keeps the override it was
    planned with, else its measurement."""
    if current is not None:
        if current.override_bytes is not None:
            return current.override_bytes
        return measured if measured is not None else current.total_bytes
    if old_override is not None:
        return old_override
    return measured or measured_max


class HubSizes(Protocol):
    """Hub models' estimates from the hub's file listing, read off the loop (reconciler/downloads.py)."""

    def covers(self, source: str) -> bool: ...

    def estimate(self, key: str, spec: WorkerSpec, override: int | None) -> MemoryEstimate | None: ...


class MemoryAccounts:
    """The loop's memory book: estimates per fingerprint, the most measured per fingerprint."""

    def __init__(self, estimator: Callable[..., MemoryEstimate] = engine_memory.estimate, *,
                 hub: HubSizes | None = None):
        self._estimator = estimator
        self._hub = hub  # hub ids are sized by it; None: by `estimator`, from the local cache only (lmx plan)
        self._estimates: dict[str, MemoryEstimate] = {}  # fingerprint[:override] -> estimate
        self._override: dict[str, int] = {}  # fingerprint -> the `memory:` override it was planned with
        self.measured_max: dict[str, int] = {}  # measured_key -> most measured for a worker of it
        self.helper_costs = HelperCosts()  # what the fast starts were measured at in this run
        self._warming_most = 0  # the most a template held during its current warm-up

    def estimate(self, spec: WorkerSpec, override: int | None) -> MemoryEstimate:
        """The footprint planned before a worker of `spec` runs (cached per fingerprint).

        The loop fills the cache off the event loop first (`estimate_off_loop`, or the hub's
        sizing for a hub id); this reads the directory itself only for `lmx plan`, where a
        directory that cannot be read gives an unknown estimate (not cached) instead of a traceback.
        """
        key = self._key(spec, override)
        if override is not None:
            self._override[spec.fingerprint] = override
        else:
            self._override.pop(spec.fingerprint, None)
        if key not in self._estimates and self._hub is not None and self._hub.covers(spec.source):
            found = self._hub.estimate(key, spec, override)
            if found is None:  # still being read from the hub: the model is held back meanwhile
                return MemoryEstimate(override_bytes=override, known=False)
            self._estimates[key] = found
        if key not in self._estimates:
            try:
                self._estimates[key] = self._estimator(spec.source, spec.engine, override)
            except Exception as error:  # noqa: BLE001 - the loop reports it (observing.estimate_models)
                log.warning("cannot estimate %s: %s: %s", spec.source, type(error).__name__, error)
                return MemoryEstimate(known=False)
        return self._estimates[key]

    def known(self, spec: WorkerSpec, override: int | None) -> bool:
        """Whether the loop need not estimate `spec` in a thread now (a hub id is sized by the hub's)."""
        return self._key(spec, override) in self._estimates or (self._hub is not None and self._hub.covers(spec.source))

    @staticmethod
    def _key(spec: WorkerSpec, override: int | None) -> str:
        return spec.fingerprint + (f":{override}" if override is not None else "")

    async def estimate_off_loop(self, spec: WorkerSpec, override: int | None, timeout: float) -> MemoryEstimate:
        """Estimate in a thread (the estimator reads the model's directory), at most `timeout` s.

        On an error or a timeout an unknown estimate is cached (planning never reads the
        directory on the loop) and the error raised for the caller to fail the model; a read
        that finishes after its timeout still replaces the placeholder with its result.
        """
        key = self._key(spec, override)
        reading = asyncio.ensure_future(asyncio.to_thread(self._estimator, spec.source, spec.engine, override))
        try:
            async with asyncio.timeout(timeout):
                result = await asyncio.shield(reading)
        except BaseException:
            self._estimates[key] = MemoryEstimate(known=False)
            if not reading.done():  # timed out (or cancelled): its result may still come
                reading.add_done_callback(lambda done: self._late(key, done))
            raise
        self._estimates[key] = result
        return self.estimate(spec, override)

    def _late(self, key: str, done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None:
            self._estimates[key] = done.result()
        else:  # read again (in a thread) once the failure's backoff ends, to say why
            self._estimates.pop(key, None)

    def measured(self, fingerprint: str, measured: int, forked: bool = False) -> None:
        key = measured_key(fingerprint, forked)
        self.measured_max[key] = max(self.measured_max.get(key, 0), measured)

    def planning(self, estimate: MemoryEstimate, fingerprint: str, forked: bool = False) -> int:
        """What a model not running yet is planned at, for a worker started this way."""
        return planning_bytes(estimate.started(forked), self.measured_max.get(measured_key(fingerprint, forked), 0))

    def held(self, current: MemoryEstimate | None, fingerprint: str, measured: int | None,
             forked: bool = False) -> int:
        return held_bytes(current.started(forked) if current else None, self._override.get(fingerprint), measured,
                          self.measured_max.get(measured_key(fingerprint, forked), 0))

    def learn_helper(self, helper: HelperMemory) -> None:
        """Replace the helpers' default figures with what they were measured at in this run: a
        waiting template or spare's size, and the most a template held while it warmed up."""
        costs = self.helper_costs
        if helper.mode == TEMPLATE and helper.starting:
            self._warming_most = max(self._warming_most, helper.starting_bytes)
        elif helper.mode == TEMPLATE and helper.waiting and helper.waiting_bytes:
            # A warm-up seen only in part (passes are not timed to it) must not lower the default.
            warming = max(self._warming_most, costs.template_warming_bytes, helper.waiting_bytes)
            self.helper_costs = HelperCosts(helper.waiting_bytes, warming, costs.spare_bytes)
            self._warming_most = 0
        elif helper.mode == SPARE and helper.waiting and helper.waiting_bytes:
            self.helper_costs = HelperCosts(costs.template_bytes, costs.template_warming_bytes,
                                            helper.waiting_bytes // helper.waiting)


def planning_estimates(accounts: MemoryAccounts, desired: DesiredState, spec_of: Callable[[ModelSpec], WorkerSpec],
                       fingerprints: dict[str, str], forked: bool = False) -> dict[str, int]:
    """Each model's planning figure for workers started this way (`forked`: from a waiting template),
    raised to what a worker of the same spec started the same way was measured at."""
    return {m.name: accounts.planning(accounts.estimate(spec_of(m), m.memory_bytes()), fingerprints[m.name], forked)
            for m in desired.models}


def worker_bytes(accounts: MemoryAccounts, desired: DesiredState | None, spec_of: Callable[[ModelSpec], WorkerSpec],
                 entry) -> int:
    """What a running worker (a ledger entry) counts for: its `memory:` override, else its measurement."""
    model = desired.model(entry.model) if desired is not None else None
    current = None
    if model is not None:
        spec = spec_of(model)
        if spec.fingerprint == entry.fingerprint:
            current = accounts.estimate(spec, model.memory_bytes())
    return accounts.held(current, entry.fingerprint, entry.measured_bytes, entry.forked)
