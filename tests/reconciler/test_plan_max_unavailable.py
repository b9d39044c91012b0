"""maxUnavailable 0 (issue 19): a serving worker is drained only for a successor that the plan
admits in the space the drain frees, and with stable figures a swap always ends with one of the
two serving. Property tests over the planner, stepping its plans as the loop would carry them out."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opta_lmx.reconciler.plan import LoadModel, MemoryFigures, ObservedWorker, UnloadReason, plan
from opta_lmx.state.spec import DesiredState

NAMES = ["a", "b", "c", "d"]


def step(observed: list[ObservedWorker], actions, counter: list[int]) -> list[ObservedWorker]:
    """One round of the loop: unloads end; loads already under way become ready; new loads start."""
    gone = {a.worker_id for a in actions if not isinstance(a, LoadModel)}
    after = [w if w.ready else ObservedWorker(w.name, w.worker_id, w.fingerprint, True, w.bytes)
             for w in observed if w.worker_id not in gone]
    for load in [a for a in actions if isinstance(a, LoadModel)]:
        counter[0] += 1
        after.append(ObservedWorker(load.name, f"new{counter[0]}", load.fingerprint, False, load.bytes))
    return after


@st.composite
def swaps(draw, successors_fit: bool):
    """Loaded models, some serving an old spec (their entry changed), budget holding what runs;
    with `successors_fit`, every model runs already (no newcomer may outrank it) and its new spec
    needs no more than its old worker holds."""
    chosen = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=4))
    models = [{"name": n, "source": f"/m/{n}", "priority": draw(st.integers(0, 2)), "pinned": draw(st.booleans())}
              for n in chosen]
    desired = DesiredState.model_validate({"models": models})
    fingerprints = {n: "new-" + n for n in chosen}
    observed, estimates = [], {}
    for index, name in enumerate(chosen):
        running = draw(st.sampled_from(["old", "current"] if successors_fit else ["old", "current", "none"]))
        size = draw(st.integers(10, 60))
        if running != "none":
            observed.append(ObservedWorker(name, f"w{index}", ("old-" if running == "old" else "new-") + name,
                                           True, size))
        estimates[name] = draw(st.integers(1, size)) if successors_fit else draw(st.integers(1, 80))
    held = sum(w.bytes for w in observed)
    budget = held + draw(st.integers(0, 60))
    available = draw(st.one_of(st.none(), st.integers(0, 200)))
    blocked = frozenset(draw(st.lists(st.sampled_from(chosen), unique=True, max_size=1)))
    return desired, fingerprints, observed, estimates, MemoryFigures(budget, 0, available), blocked


def serving(observed: list[ObservedWorker], name: str) -> bool:
    return any(w.name == name and w.ready for w in observed)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(swaps(successors_fit=False))
def test_a_serving_worker_is_drained_only_for_a_successor_under_way(scenario):
    desired, fingerprints, observed, estimates, memory, blocked = scenario
    counter = [0]
    for _round in range(6):
        result = plan(desired, fingerprints, observed, blocked, memory=memory, estimates=estimates)
        after = step(observed, result.actions, counter)
        for name in {w.name for w in observed if w.ready}:
            if serving(after, name):
                continue
            # Nothing of it serves any more: only for a successor of its current spec, under way,
            # and never because of a replacement the plan could not carry through.
            replaced = [u for u in result.unloads() if u.name == name and u.reason == UnloadReason.REPLACED]
            if replaced:
                assert any(w.name == name and w.fingerprint == fingerprints[name] for w in after), result.actions
        observed = after


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(swaps(successors_fit=True))
def test_with_stable_figures_a_swap_that_fits_ends_with_one_of_them_serving(scenario):
    """A Ready model whose successor fits the space its old worker frees always ends served (by the
    old worker or the new one), whatever the budget, the machine's free memory or a backoff do."""
    desired, fingerprints, observed, estimates, memory, blocked = scenario
    ready_at_start = {w.name for w in observed if w.ready}
    counter = [0]
    for _round in range(8):
        result = plan(desired, fingerprints, observed, blocked, memory=memory, estimates=estimates)
        if not result.actions and all(w.ready for w in observed):
            break
        observed = step(observed, result.actions, counter)
        for name in ready_at_start:  # at every step: serving, or its successor is loading
            assert serving(observed, name) or any(
                w.name == name and w.fingerprint == fingerprints[name] for w in observed), (name, result.actions)
    else:
        raise AssertionError(f"no fixed point after 8 rounds: {result.actions}")
    assert all(serving(observed, name) for name in ready_at_start), observed


def test_a_successor_the_machine_cannot_hold_leaves_the_old_worker_serving():
    """The case the old planner got wrong: the budget admits the swap, but the machine's free memory
    above the reserve cannot hold the successor even once the old worker is gone."""
    desired = DesiredState.model_validate({"models": [{"name": "a", "source": "/m/a"}]})
    old = ObservedWorker("a", "w-old", "old-a", True, 50)
    result = plan(desired, {"a": "new-a"}, [old], memory=MemoryFigures(60, 0, 3), estimates={"a": 55})
    assert result.unloads() == [] and result.loads() == []
    assert "a" in result.unschedulable
