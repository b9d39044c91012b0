"""Control-plane log formats and finding/printing a model's worker log."""

from __future__ import annotations

import io
import os
import json
import logging
import threading

from opta_lmx.cli import logs
from opta_lmx.cli import main


def test_json_formatter_emits_one_object_per_line():
    record = logging.LogRecord("opta_lmx.x", logging.WARNING, __file__, 1, "worker %s exited", ("a",), None)
    line = logs.JsonFormatter().format(record)
    payload = json.loads(line)
    assert payload["level"] == "WARNING" and payload["logger"] == "opta_lmx.x"
    assert payload["msg"] == "worker a exited" and payload["time"].endswith("Z")
    assert "\n" not in line


def test_uvicorn_config_follows_the_format():
    assert logs.uvicorn_log_config("human") is None
    config = logs.uvicorn_log_config("json")
    assert config["formatters"]["json"]["()"] == "opta_lmx.cli.logs.JsonFormatter"


def test_worker_log_dir_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("LMX_LOG_DIR", raising=False)
    assert logs.worker_log_dir(tmp_path, state_dir_given=True) == tmp_path / "logs"
    monkeypatch.setenv("LMX_LOG_DIR", str(tmp_path / "L"))
    assert logs.worker_log_dir(tmp_path, state_dir_given=True) == tmp_path / "L" / "workers"


def _write_record(state_dir, worker_id, name, log_path, started_at):
    records = state_dir / "workers" / "records"
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{worker_id}.json").write_text(
        json.dumps({"worker_id": worker_id, "name": name, "log_path": str(log_path), "started_at": started_at}))


def test_model_log_path_is_the_newest_started_workers_file_and_never_a_records_path(tmp_path):
    state, log_dir = tmp_path / "state", tmp_path / "logs"
    assert logs.model_log_path("a", log_dir) is None
    log_dir.mkdir()
    (log_dir / "a.log").write_text("old\n")
    assert logs.model_log_path("a", log_dir) == log_dir / "a.log"  # an older version's single log
    (log_dir / "a").mkdir()
    for name in ("20261204T101010000000001-a-1.log", "20261204T101010000000002-a-2.log"):
        (log_dir / "a" / name).write_text(name)
    os.utime(log_dir / "a" / "20261204T101010000000001-a-1.log", (2e9, 2e9))  # the older one written last
    assert logs.model_log_path("a", log_dir) == log_dir / "a" / "20261204T101010000000002-a-2.log"
    # A record naming a file elsewhere (planted, or root-only) is never read.
    _write_record(state, "a-3", "a", tmp_path / "secret.log", 3.0)
    assert logs.model_log_path("a", log_dir).parent == log_dir / "a"
    # A name that is not a model's name is not a path.
    (tmp_path / "x.log").write_text("one level up")
    assert logs.model_log_path("..", log_dir / "a") is None and logs.model_log_path("a/../..", log_dir) is None
    # A link is never read through.
    (log_dir / "b").mkdir()
    (log_dir / "b" / "20261204T101010000000001-b-1.log").symlink_to(tmp_path / "x.log")
    assert logs.model_log_path("b", log_dir) is None


def test_tail_and_follow_across_rotation(tmp_path):
    path = tmp_path / "a.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    out = io.StringIO()
    offset = logs.tail(path, 3, out)
    assert out.getvalue() == "line 97\nline 98\nline 99\n"

    out = io.StringIO()
    stop = threading.Event()
    follower = threading.Thread(target=logs.follow, args=(path, offset, out, 0.02, stop.is_set))
    follower.start()

    def wait_for(text: str) -> None:
        for _ in range(250):
            if text in out.getvalue():
                return
            stop.wait(0.02)

    with open(path, "a") as handle:
        handle.write("appended\n")
    wait_for("appended")  # the follower has the file open now
    with open(path, "a") as handle:
        handle.write("last words\n")  # written just before rotation: still printed, from the old file
    path.rename(tmp_path / "a.log.1")
    path.write_text("fresh\n")
    wait_for("fresh")
    stop.set()
    follower.join(5)
    assert out.getvalue() == "appended\nlast words\nfresh\n"


def test_lmx_logs_command(tmp_path, capsys):
    state = tmp_path / "state"
    worker_log = state / "logs" / "a" / "20261204T101010000000001-a-1.log"
    worker_log.parent.mkdir(parents=True)
    worker_log.write_text("loading\nready on port 1\n")
    assert main(["logs", "a", "--state-dir", str(state), "-n", "1"]) == 0
    assert capsys.readouterr().out == "ready on port 1\n"
    assert main(["logs", "nope", "--state-dir", str(state)]) == 1
    assert "no worker log for `nope`" in capsys.readouterr().err
