"""Memory accounting: the one place that says how many bytes a model or a worker counts for.

Used by the loop and by `lmx plan` alike, so a preview plans with the loop's own rules: an
estimate is cached per fingerprint, a planning estimate is raised to what a worker of the same
spec was measured at (no re-admission on a guess), and a `memory:` override wins over both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.plan import MemoryFigures
from opta_lmx.state.spec import DesiredState, ModelSpec


def resolve_source(config_path: Path, source: str) -> str:
    """Local paths are taken relative to models.yaml; anything else is a hub id."""
    if source.startswith(("/", "./", "../", "~")):
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = (Path(config_path).parent / path).resolve()
        return str(path)
    return source


def worker_spec(config_path: Path, desired: DesiredState, model: ModelSpec) -> WorkerSpec:
    """What a worker of `model` runs (its fingerprint says whether a running worker still matches)."""
    return WorkerSpec(name=model.name, source=resolve_source(config_path, model.source),
                      engine=desired.effective_engine(model))


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


class MemoryAccounts:
    """The loop's memory book: estimates per fingerprint, the most measured per fingerprint."""

    def __init__(self, estimator: Callable[..., MemoryEstimate] = engine_memory.estimate):
        self._estimator = estimator
        self._estimates: dict[str, MemoryEstimate] = {}  # fingerprint[:override] -> estimate
        self._override: dict[str, int] = {}  # fingerprint -> the `memory:` override it was planned with
        self.measured_max: dict[str, int] = {}  # fingerprint -> most measured for a worker of it

    def estimate(self, spec: WorkerSpec, override: int | None) -> MemoryEstimate:
        """The footprint planned before a worker of `spec` runs (cached per fingerprint)."""
        key = spec.fingerprint + (f":{override}" if override is not None else "")
        if key not in self._estimates:
            self._estimates[key] = self._estimator(spec.source, spec.engine, override)
        if override is not None:
            self._override[spec.fingerprint] = override
        else:
            self._override.pop(spec.fingerprint, None)
        return self._estimates[key]

    def measured(self, fingerprint: str, measured: int) -> None:
        self.measured_max[fingerprint] = max(self.measured_max.get(fingerprint, 0), measured)

    def planning(self, estimate: MemoryEstimate, fingerprint: str) -> int:
        return planning_bytes(estimate, self.measured_max.get(fingerprint, 0))

    def held(self, current: MemoryEstimate | None, fingerprint: str, measured: int | None) -> int:
        return held_bytes(current, self._override.get(fingerprint), measured, self.measured_max.get(fingerprint, 0))
