"""The one atomic file replacement, and the writers that use it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from opta_lmx.state.atomic import write_atomic


def test_replaces_whole_keeps_mode_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_atomic(target, "new text")
    assert target.read_text() == "new text"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    write_atomic(tmp_path / "fresh", b"\x00bytes", mode=0o600)
    assert (tmp_path / "fresh").read_bytes() == b"\x00bytes"
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json", "fresh"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "file"
    target.write_text("old")

    def refuse(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("opta_lmx.state.atomic.os.replace", refuse)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_worker_records_use_it_and_an_older_record_with_extra_still_loads(tmp_path):
    from opta_lmx.engine.records import WorkerRecord, WorkerRecords

    records = WorkerRecords(tmp_path)
    record = WorkerRecord("w1", "m", "fp", "/src", {}, 123, 1.0, "127.0.0.1", 9, "http://x", "/log", "/run")
    records.write(record)
    assert [p.name for p in tmp_path.iterdir()] == ["w1.json"]
    assert records.load_all() == [record]
    old = json.loads((tmp_path / "w1.json").read_text()) | {"extra": {}}  # written by an older version
    (tmp_path / "w1.json").write_text(json.dumps(old))
    assert records.load_all() == [record]
