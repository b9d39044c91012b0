"""The single-instance lock: held across processes, named in the refusal, released by any death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from opta_lmx.state.instance import AlreadyRunning, InstanceLock, holder_pid
from tests.lmx_harness import REPO, lmx_env

HOLDER = textwrap.dedent("""
    import sys, time
    from opta_lmx.state.instance import InstanceLock
    lock = InstanceLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/state."""
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state)], stdout=subprocess.PIPE,
                            env=lmx_env(), cwd=REPO, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc, state
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_second_process_is_refused_with_the_holders_pid(holder):
    proc, state = holder
    with pytest.raises(AlreadyRunning) as caught:
        InstanceLock(state).acquire()
    assert caught.value.pid == proc.pid
    assert f"pid {proc.pid}" in str(caught.value)
    assert holder_pid(state) == proc.pid


def test_second_lmx_serve_exits_nonzero_naming_the_pid(holder, tmp_path):
    proc, state = holder
    config = tmp_path / "models.yaml"
    config.write_text("models: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "opta_lmx.cli", "serve", "--config", str(config), "--state-dir", str(state),
         "--port", "0"],
        capture_output=True, text=True, env=lmx_env(), cwd=REPO, timeout=60,
    )
    assert result.returncode != 0
    assert f"pid {proc.pid}" in result.stderr
    assert "already running" in result.stderr


def test_lock_is_free_again_after_the_holder_is_killed(holder):
    proc, state = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert holder_pid(state) is None
    with InstanceLock(state) as lock:
        assert holder_pid(state) == os.getpid()
        assert lock.path.read_text().strip() == str(os.getpid())
    assert holder_pid(state) is None


def test_release_lets_the_same_process_lock_again(tmp_path):
    lock = InstanceLock(tmp_path)
    lock.acquire()
    assert holder_pid(tmp_path) == os.getpid()
    with pytest.raises(AlreadyRunning):  # held: a second lock (another open file) is refused
        InstanceLock(tmp_path).acquire()
    lock.release()
    assert holder_pid(tmp_path) is None
    again = InstanceLock(tmp_path)
    again.acquire()  # would raise AlreadyRunning if release had not dropped the flock
    assert holder_pid(tmp_path) == os.getpid()
    again.release()
