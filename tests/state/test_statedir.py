"""A state directory that cannot be written fails with one clear line (issue 15 item 10); one that
another user owns or can write is refused, and what others could only read is made private (issue 22)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest

from opta_lmx.state.statedir import StateDirError, prepare_state_dir


def test_a_writable_state_dir_is_created_and_left_clean(tmp_path):
    state_dir = prepare_state_dir(tmp_path / "a" / "state")
    assert state_dir.is_dir() and list(state_dir.iterdir()) == []


def test_a_state_dir_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StateDirError) as refused:
        prepare_state_dir(tmp_path / "file" / "state")
    assert "not a writable directory" in str(refused.value) and "\n" not in str(refused.value)


def test_a_read_only_file_system_is_refused_in_one_line(tmp_path, monkeypatch):
    """Root writes through a 0500 directory, so the fault (EROFS, as on a read-only mount) is injected."""
    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(StateDirError, match="Read-only file system.*--state-dir"):
        prepare_state_dir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_directory_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StateDirError, match="Permission denied"):
            prepare_state_dir(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_a_state_dir_others_can_write_is_refused_and_nothing_in_it_is_touched(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "records").mkdir()
    state.chmod(0o777)
    with pytest.raises(StateDirError, match="can be written by other users.*chmod -R go-w"):
        prepare_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o777  # refused, not silently "fixed"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
@pytest.mark.parametrize("planted", ["the directory", "a record in it"])
def test_a_state_dir_or_a_file_owned_by_another_user_is_refused(tmp_path, planted):
    state = tmp_path / "state"
    (state / "workers" / "records").mkdir(parents=True)
    record = state / "workers" / "records" / "w.json"
    record.write_text("{}")
    os.chown(state if planted == "the directory" else record, 65534, 65534)
    with pytest.raises(StateDirError, match="uid 65534"):
        prepare_state_dir(state)


def test_what_others_may_only_read_is_made_private(tmp_path):
    state = tmp_path / "state"
    (state / "logs" / "a").mkdir(parents=True)
    log = state / "logs" / "a" / "w.log"
    log.write_text("a prompt")
    for path, mode in ((state, 0o755), (state / "logs", 0o755), (log, 0o644)):
        path.chmod(mode)
    (state / "link").symlink_to("/etc/hostname")
    prepare_state_dir(state)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (state, state / "logs", state / "logs" / "a", log)] == [
        0o700, 0o700, 0o700, 0o600]
    assert stat.S_IMODE(os.stat("/etc/hostname").st_mode) & 0o004  # a link's target is never changed
