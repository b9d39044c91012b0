"""`lmx plan`'s preview: the same planner over an observation (or nothing), described for people."""

from __future__ import annotations

from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.preview import describe, preview
from opta_lmx.state.spec import DesiredState

MiB = 1024**2


def desired(tiny_model, tiny_model_b) -> DesiredState:
    return DesiredState.model_validate({
        "memory": {"budget": "1000MiB", "reserve": 0},
        "models": [
            {"name": "a", "source": str(tiny_model), "memory": "600MiB"},
            {"name": "b", "source": str(tiny_model_b), "memory": "600MiB", "priority": 5},
            {"name": "c", "source": str(tiny_model)},  # estimated from its files
        ],
    })


def test_from_nothing_admits_by_priority_and_explains(tmp_path, tiny_model, tiny_model_b):
    result = preview(tmp_path / "models.yaml", desired(tiny_model, tiny_model_b))
    assert [a.name for a in result.plan.loads()] == ["b"]
    assert set(result.plan.unschedulable) == {"a", "c"}
    text = describe(result, "test")
    assert "held now 0 B -> after 600.0 MiB" in text
    assert "unschedulable a: needs 600.0 MiB" in text and "200.0 MiB missing" in text
    # b is planned at its `memory:` override, c from its files (weights + KV cache + worker)
    assert "1. load   b: 600.0 MiB = 600.0 MiB (memory: in models.yaml)" in text, text
    assert result.estimates["c"].override_bytes is None and "weights" in result.estimates["c"].describe()


def test_against_an_observation_evicts_the_lower_priority_worker(tmp_path, tiny_model, tiny_model_b):
    state = desired(tiny_model, tiny_model_b)
    # What GET /admin/models reports as `observed` when `a` runs (its fingerprint as the loop computes it).
    fp = WorkerSpec("a", str(tiny_model), state.effective_engine(state.model("a"))).fingerprint
    observation = {
        "memory": {"physical_bytes": 16 * 1024 * MiB, "available_bytes": 8 * 1024 * MiB},
        "workers": [{"name": "a", "worker_id": "a-1", "fingerprint": fp, "ready": True, "bytes": 600 * MiB}],
    }
    result = preview(tmp_path / "models.yaml", state, observation)
    text = describe(result, "test")
    assert "1. unload a [evicted]" in text and "2. load   b after 1" in text, text
    assert result.plan.held_bytes == result.plan.after_bytes == 600 * MiB


def test_a_request_shows_what_it_would_evict_and_who_is_protected(tmp_path, tiny_model, tiny_model_b):
    state = DesiredState.model_validate({
        "memory": {"budget": "1000MiB", "reserve": 0},
        "models": [
            {"name": "a", "source": str(tiny_model), "memory": "600MiB", "state": "on-demand"},
            {"name": "b", "source": str(tiny_model_b), "memory": "600MiB", "state": "on-demand",
             "aliases": ["bee"]},
            {"name": "hi", "source": str(tiny_model), "memory": "600MiB", "state": "on-demand", "priority": 3},
        ],
    })
    fp = WorkerSpec("a", str(tiny_model), state.effective_engine(state.model("a"))).fingerprint
    observation = {
        "memory": {"physical_bytes": 16 * 1024 * MiB, "available_bytes": 8 * 1024 * MiB},
        "workers": [{"name": "a", "worker_id": "a-1", "fingerprint": fp, "ready": True, "bytes": 600 * MiB,
                     "in_flight": 0, "ready_seconds": 120.0}],
        "idle_seconds": {"a": 60.0},
    }
    text = describe(preview(tmp_path / "models.yaml", state, observation, request="bee"), "test")
    assert "a request for b now: loads it, evicting a" in text, text
    assert "unload a [demand] worker a-1" in text and "evicted by demand for b" in text
    # The same request while a has just become ready waits for a's min_residency instead.
    observation["workers"][0]["ready_seconds"] = 4.0
    text = describe(preview(tmp_path / "models.yaml", state, observation, request="b"), "test")
    assert "a request for b now: waits: waits for memory: a is resident for 4s of its 10s min_residency" in text
    # A higher-priority holder is not evicted for a lower one.
    hi_fp = WorkerSpec("hi", str(tiny_model), state.effective_engine(state.model("hi"))).fingerprint
    observation["workers"] = [{"name": "hi", "worker_id": "hi-1", "fingerprint": hi_fp, "ready": True,
                               "bytes": 600 * MiB, "ready_seconds": 120.0}]
    text = describe(preview(tmp_path / "models.yaml", state, observation, request="b"), "test")
    assert "refused (503)" in text and "hi (on-demand with priority 3, higher than b's 0)" in text
