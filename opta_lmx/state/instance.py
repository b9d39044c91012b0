"""One control plane per state directory: an flock'd file that also names the holder's pid.

Two control planes on one state directory would both adopt and stop the same workers, so a
second `lmx serve` must refuse to start. flock is released by the kernel when the holder dies
(even by SIGKILL), so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "lmx.lock"


class AlreadyRunning(Exception):
    """Another process holds the instance lock of this state directory."""

    def __init__(self, path: Path, pid: int | None):
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"another lmx serve ({who}) is already running on state dir {path.parent} "
            f"(lock {path}); stop it first, or use another --state-dir"
        )


class InstanceLock:
    """Held for the whole life of `lmx serve`; the file holds the holder's pid for messages."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning naming the holder. Non-blocking."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # os.open fds are not inherited (PEP 446): workers that outlive us never hold the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "InstanceLock":
        self.acquire()
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def holder_pid(state_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the running control plane on `state_dir`, or None if nobody holds the lock."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
