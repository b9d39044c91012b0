"""Planning: a pure function from (desired, observed) to ordered actions. No I/O.

Running it again on its own result plans nothing: every rule compares what is wanted
with what is there and acts only on a difference.
"""

from __future__ import annotations

from dataclasses import dataclass

from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec


@dataclass(frozen=True)
class ObservedWorker:
    """A worker the engine has, ready or still loading."""

    name: str
    worker_id: str
    fingerprint: str
    ready: bool


@dataclass(frozen=True)
class LoadModel:
    name: str
    fingerprint: str
    spec: ModelSpec
    reason: str


@dataclass(frozen=True)
class UnloadModel:
    name: str
    worker_id: str
    reason: str


Action = LoadModel | UnloadModel


def plan(
    desired: DesiredState,
    fingerprints: dict[str, str],
    observed: list[ObservedWorker],
    blocked: frozenset[str] = frozenset(),
) -> list[Action]:
    """What to do so that the running workers match `desired`.

    `fingerprints` gives each desired model's wanted worker fingerprint; `blocked` holds the
    models that must not be (re)started now (backing off, or failed for this spec). A
    replaced worker keeps serving until its successor is ready (make-before-break), and
    also while its successor cannot start, so a bad edit never takes a model away.
    """
    actions: list[Action] = []
    wanted = {
        m.name: m for m in desired.models if m.state == DesiredModelState.LOADED
    }
    by_name: dict[str, list[ObservedWorker]] = {}
    for worker in observed:
        by_name.setdefault(worker.name, []).append(worker)

    for worker in observed:
        spec = wanted.get(worker.name)
        if spec is None:
            reason = "removed from models.yaml" if desired.model(worker.name) is None else "state is unloaded"
            actions.append(UnloadModel(worker.name, worker.worker_id, reason))
            continue
        fingerprint = fingerprints[worker.name]
        if worker.fingerprint == fingerprint:
            continue
        successor_ready = any(
            w.fingerprint == fingerprint and w.ready for w in by_name[worker.name]
        )
        if successor_ready or not worker.ready:
            actions.append(UnloadModel(worker.name, worker.worker_id, "replaced by a newer spec"))

    for name, spec in wanted.items():
        fingerprint = fingerprints[name]
        if any(w.fingerprint == fingerprint for w in by_name.get(name, [])):
            continue
        if name in blocked:
            continue
        changed = bool(by_name.get(name))
        actions.append(
            LoadModel(name, fingerprint, spec, "spec changed" if changed else "desired in models.yaml")
        )
    # Unloads first: they free memory and ports before anything new starts.
    return [a for a in actions if isinstance(a, UnloadModel)] + [
        a for a in actions if isinstance(a, LoadModel)
    ]
