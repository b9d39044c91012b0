"""The planner's core rules, table-driven: no I/O, and a second pass plans nothing."""

from __future__ import annotations

import pytest

from opta_lmx.reconciler.plan import LoadModel, ObservedWorker, UnloadModel, plan
from opta_lmx.state.spec import DesiredState


def _desired(*entries: dict) -> DesiredState:
    return DesiredState.model_validate({"models": list(entries)})


A = {"name": "a", "source": "/m/a"}
B = {"name": "b", "source": "/m/b"}


def _kinds(actions):
    return [(type(a).__name__, a.name) for a in actions]


@pytest.mark.parametrize(
    ("desired", "fingerprints", "observed", "blocked", "expected"),
    [
        # nothing running: load every loaded model
        (_desired(A, B), {"a": "1", "b": "2"}, [], set(), [("LoadModel", "a"), ("LoadModel", "b")]),
        # removed from the file: unload
        (_desired(A), {"a": "1"}, [ObservedWorker("b", "wb", "2", True)], set(),
         [("LoadModel", "a"), ("UnloadModel", "b")][::-1]),
        # state: unloaded
        (_desired({**A, "state": "unloaded"}), {"a": "1"}, [ObservedWorker("a", "wa", "1", True)], set(),
         [("UnloadModel", "a")]),
        # spec changed: load the new one first, keep the old one serving
        (_desired(A), {"a": "new"}, [ObservedWorker("a", "wa", "old", True)], set(), [("LoadModel", "a")]),
        # successor ready: unload the old one
        (_desired(A), {"a": "new"}, [ObservedWorker("a", "wa", "old", True), ObservedWorker("a", "wa2", "new", True)],
         set(), [("UnloadModel", "a")]),
        # successor still loading: nothing to do
        (_desired(A), {"a": "new"}, [ObservedWorker("a", "wa", "old", True), ObservedWorker("a", "wa2", "new", False)],
         set(), []),
        # a stale worker still loading is cancelled
        (_desired(A), {"a": "new"}, [ObservedWorker("a", "wa", "old", False)], set(),
         [("UnloadModel", "a"), ("LoadModel", "a")]),
        # blocked (backing off or failed): not started
        (_desired(A), {"a": "1"}, [], {"a"}, []),
    ],
)
def test_plan_table(desired, fingerprints, observed, blocked, expected):
    assert _kinds(plan(desired, fingerprints, observed, frozenset(blocked)).actions) == expected


def _apply(observed, actions):
    """What the engine would have after the actions succeed."""
    result = list(observed)
    for action in actions:
        if isinstance(action, UnloadModel):
            result = [w for w in result if w.worker_id != action.worker_id]
        elif isinstance(action, LoadModel):
            result.append(ObservedWorker(action.name, f"w-{action.name}-{action.fingerprint}", action.fingerprint, True))
    return result


def test_second_pass_plans_nothing():
    desired = _desired(A, B, {"name": "c", "source": "/m/c", "state": "unloaded"})
    fingerprints = {"a": "1", "b": "2", "c": "3"}
    observed = [ObservedWorker("a", "wa", "0", True), ObservedWorker("c", "wc", "3", True),
                ObservedWorker("gone", "wg", "9", True)]
    for _ in range(3):  # a swap takes two passes (load, then unload the old one)
        observed = _apply(observed, plan(desired, fingerprints, observed).actions)
    assert plan(desired, fingerprints, observed).actions == []
    assert sorted((w.name, w.fingerprint) for w in observed) == [("a", "1"), ("b", "2")]
