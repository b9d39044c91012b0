"""Issue 15 item 6: one log per worker process; a crash is classified by its own output only,
and a model's log still reads as one stream (`lmx logs -f` switches to a new worker's file)."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading

import pytest

from opta_lmx.cli import logs
from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError, prune_worker_logs

PROMPT = "please explain: Error: the file does not exist"


class ScriptWorker(Worker):
    """A worker whose process is a small script instead of vllm-mlx (its output is the point)."""

    script = ""

    def command(self, *_fds) -> list[str]:
        return [sys.executable, "-c", self.script]


def test_a_crash_of_a_new_worker_is_classified_by_its_own_log(tmp_path):
    spec = WorkerSpec("a", "/models/a")
    old = ScriptWorker(spec, run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    old.script = f"import time; print({PROMPT!r}, flush=True); time.sleep(60)"  # a client's prompt, logged
    new = ScriptWorker(spec, run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    new.script = "import sys; print('killed by the OOM killer', flush=True); sys.exit(137)"
    assert old.log_path != new.log_path and old.log_path.parent == tmp_path / "logs" / "a"

    async def scenario():
        old.spawn()
        try:
            for _ in range(200):
                if PROMPT in old.log_tail():
                    break
                await asyncio.sleep(0.05)
            assert PROMPT in old.log_tail()
            new.spawn()
            with pytest.raises(WorkerStartError) as caught:
                await new.wait_ready(30)
            return caught.value
        finally:
            await old.stop(grace=2)
            await new.stop(grace=2)

    error = asyncio.run(scenario())
    assert not error.permanent  # the old worker's "Error: ... does not exist" is not read
    assert "does not exist" not in str(error) and PROMPT not in error.log_tail
    assert "OOM" in str(error)


def test_old_worker_logs_are_pruned(tmp_path):
    for index in range(8):
        path = tmp_path / f"a-{index}.log"
        path.write_text("x")
        import os
        os.utime(path, (index, index))
    prune_worker_logs(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-5.log", "a-6.log", "a-7.log"]


def _record(state_dir, worker_id, name, log_path, started_at):
    records = state_dir / "workers" / "records"
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{worker_id}.json").write_text(json.dumps(
        {"worker_id": worker_id, "name": name, "log_path": str(log_path), "started_at": started_at}))


def test_model_log_path_finds_the_newest_worker_file_without_records(tmp_path):
    import os

    log_dir = tmp_path / "logs"
    (log_dir / "a").mkdir(parents=True)
    for index, name in enumerate(["a-1.log", "a-2.log"]):
        (log_dir / "a" / name).write_text(name)
        os.utime(log_dir / "a" / name, (index + 1, index + 1))
    assert logs.model_log_path("a", log_dir) == log_dir / "a" / "a-2.log"  # unstamped (older versions): by time


def test_follow_switches_to_a_new_workers_log(tmp_path):
    first, second = tmp_path / "a-1.log", tmp_path / "a-2.log"
    first.write_text("old worker\n")
    target = {"path": first}
    out, stop = io.StringIO(), threading.Event()
    follower = threading.Thread(target=logs.follow, args=(first, 0, out, 0.02, stop.is_set),
                                kwargs={"current": lambda: target["path"]})
    follower.start()

    def wait_for(text):
        for _ in range(500):
            if text in out.getvalue():
                return
            stop.wait(0.02)

    try:
        wait_for("old worker")
        with open(first, "a") as handle:
            handle.write("old worker's last words\n")
        second.write_text("new worker\n")
        target["path"] = second  # a swap: the model's newest worker changed
        wait_for("new worker\n")
    finally:
        stop.set()
        follower.join(5)
    text = out.getvalue()
    assert "old worker's last words" in text and text.index("old worker's last words") < text.index("new worker\n")
