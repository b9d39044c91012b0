"""The soak's invariant checks (bench/_soak_checks.py) on recorded data: each one can fail."""

from __future__ import annotations

from types import SimpleNamespace

from bench._soak_actors import Edit, Kill, Outcome, WriterStats
from bench._soak_checks import MIB, attribute_failures, memory_segments, summary
from bench.soak import SoakOptions, plan_faults


def _failed(model: str, start: float, end: float, error: str = "APIError: the worker failed mid-stream") -> Outcome:
    return Outcome("stream", model, start, end, error)


def test_a_failure_is_explained_only_by_a_kill_of_its_model_in_its_window():
    kill = Kill("a", pid=100, at=10.0, recovered_at=20.0, new_pid=101)
    outcomes = [
        _failed("a", 9.0, 10.2),  # in flight at the kill
        _failed("a", 12.0, 12.1),  # sent before a was Ready again
        _failed("b", 9.0, 10.2),  # another model: not explained
        _failed("a", 30.0, 30.5),  # long after the recovery: not explained
        _failed("a", 12.0, 12.1, "NotFoundError 404: The model `a` does not exist"),  # not what a kill does
        Outcome("plain", "a", 9.0, 10.2, None),  # not a failure
    ]
    causes = [f["cause"] for f in attribute_failures(outcomes, [kill], [], end=60.0)]
    assert len(causes) == 5
    assert "in flight" in causes[0] and "before the model was Ready" in causes[1]
    assert causes[2] is None and causes[3] is None and causes[4] is None


def test_a_pid_named_in_the_error_must_be_the_killed_one():
    kill = Kill("a", pid=100, at=10.0, recovered_at=20.0)
    wrong = Outcome("plain", "a", 9.0, 10.2, "the worker pid 555 did not answer", worker_pid=555)
    right = Outcome("plain", "a", 9.0, 10.2, "the worker pid 100 did not answer", worker_pid=100)
    causes = [f["cause"] for f in attribute_failures([wrong, right], [kill], [], end=60.0)]
    assert causes[0] is None and "pid 100" in causes[1]


def test_memory_growth_is_measured_per_process_after_the_warmup():
    flat = [(float(t), 1, 80 * MIB) for t in range(0, 120, 2)]
    growing = [(float(t), 2, int((80 + t / 10) * MIB)) for t in range(120, 300, 2)]
    first, second = memory_segments(flat + growing, warmup=20.0)
    assert first["pid"] == 1 and first["growth_mib"] == 0 and first["slope_mib_per_min"] == 0
    assert second["pid"] == 2 and second["growth_mib"] > 10 and abs(second["slope_mib_per_min"] - 6.0) < 0.1


def _soak(writers, edits, outcomes=(), kills=(), rss=()):
    return SimpleNamespace(outcomes=list(outcomes), kills=list(kills), edits=list(edits), writers=writers,
                           rss=list(rss), events=[])


def _final(priority_a: int, aliases: list, b_tokens: int) -> dict:
    return {"a": {"name": "a", "priority": priority_a, "aliases": aliases},
            "b": {"name": "b", "priority": 0, "engine": {"max_tokens": b_tokens}}}


def test_lost_admin_writes_and_hand_edits_are_violations():
    writers = [WriterStats("a", acked=5, conflicts_412=2), WriterStats("a", acked=3)]
    edits = [Edit("in-place", 1.0, "a aliases -> [a-alias]", "[a-alias]"), Edit("atomic", 2.0, "b -> 65", "65")]
    held = summary(_soak(writers, edits), SoakOptions(), [], _final(8, ["a-alias"], 65), {}, 0, [], 60.0)
    assert held["violations"] == [] and held["admin_writes"]["conflicts_412"] == 2

    broken = summary(_soak(writers, edits), SoakOptions(), [], _final(7, [], 64), {}, 0, ["123 vllm_mlx"], 60.0)
    text = "\n".join(broken["violations"])
    assert "1 acknowledged admin writes lost" in text
    assert "hand edit lost: b max_tokens" in text and "hand edit lost: a aliases" in text
    assert "left running after the stop: 123 vllm_mlx" in text


def test_a_model_removed_by_the_control_plane_is_a_violation():
    soak = _soak([], [])
    soak.events = [{"seq": 1, "reason": "Ready", "object": "a", "message": "serving", "server_pid": 9},
                   {"seq": 2, "reason": "Removed", "object": "a", "message": "removed from models.yaml",
                    "server_pid": 9}]
    figures = summary(soak, SoakOptions(), [], _final(0, [], 64), {}, 0, [], 60.0)
    assert figures["events"]["reasons"] == {"Ready": 1, "Removed": 1}
    assert any("removed a model the file never dropped" in v for v in figures["violations"])


def test_an_unrecovered_kill_a_bad_exit_and_a_missed_adoption_are_violations():
    restart = {"signal": "SIGKILL", "pids_before": {"a": 1, "b": 2}, "kept_pid": ["a"], "adopted_events": ["a"],
               "at_s": 5.0, "back_at_s": 7.0}
    figures = summary(_soak([], [], kills=[Kill("a", 1, 3.0)]), SoakOptions(), [restart], _final(0, [], 64), {},
                      1, [], 60.0)
    text = "\n".join(figures["violations"])
    assert "never came back Ready" in text and "exited with 1" in text and "did not adopt every worker" in text


def test_faults_are_planned_inside_the_run_and_off_the_restart():
    plan = plan_faults(SoakOptions(minutes=3.0), __import__("random").Random(1))
    restart = [t for t, action in plan if action == "restart"]
    assert restart == [60.0]
    others = [t for t, action in plan if action != "restart"]
    assert len([a for _t, a in plan if a == "kill"]) == 6 and len(others) == 6 + 12
    assert all(0 < t <= 162 and abs(t - 60.0) >= 2.0 for t in others)
