"""A state directory that cannot be written fails with one clear line (issue 15 item 10)."""

from __future__ import annotations

import errno
import os
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
