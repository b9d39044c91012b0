"""Spare workers: processes that have imported vllm-mlx and wait to be given a model.

Starting a worker cold costs its imports (~3 s of CPU here) before any weight is read. A
spare pays that in the background; `take()` hands one over and starts the next. Spares run
engine/worker_main.py in their own process group, like workers. A spare waits on a Unix socket
(its assignment comes with the worker's listening socket attached) and exits by itself when
that socket closes, so a control plane that dies, however it dies, leaves none behind.

This works the same on Linux and macOS: the spare is a fresh process, never a fork of one
that has touched Metal or the Objective-C runtime.

A spare is only used for a worker whose environment (HOME aside) is the one the spare was
started with: some libraries read their environment when imported (HF_HUB_OFFLINE, HF_HOME).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from opta_lmx.engine.worker_auth import KEY_VARIABLE
from opta_lmx.engine.announce import Announcements, Launched
from opta_lmx.engine.records import process_create_time
from opta_lmx.engine.worker_log import open_log
from opta_lmx.engine.worker_main import SERVING

log = logging.getLogger(__name__)

#: Variables that differ per worker and are applied at assignment, not at import.
PER_WORKER_VARIABLES = frozenset({"HOME", KEY_VARIABLE})  # its own HOME, and its own key (worker_auth)
#: A spare that dies this soon after starting makes the next replacement wait (crash loop).
RESTART_BACKOFF = (1.0, 60.0)


def worker_environment(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a cold worker of a pool with `extra_env` gets (HOME aside): a spare's."""
    from opta_lmx.engine.worker import Worker, WorkerSpec

    probe = Worker(WorkerSpec("spare", "spare"), run_dir=Path("/nonexistent"), port=1, env=extra_env)
    return comparable_env(probe.environment())


def comparable_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in PER_WORKER_VARIABLES}


class Spare:
    """One waiting process: its Popen, its announcement pipe and the environment it imported with."""

    def __init__(self, run_dir: Path, env: dict[str, str], python: str = sys.executable,
                 warm_up_model: Path | None = None):
        self.warm_up_model = warm_up_model
        self.id = f"spare-{os.urandom(3).hex()}"
        self.run_dir = Path(run_dir) / self.id
        self.env = dict(env)
        self.log_path = self.run_dir / "spare.log"
        self._python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.create_time: float | None = None
        self.started_at: float | None = None
        self.announcements: Announcements | None = None
        self.channel: socket.socket | None = None  # its assignment goes here; closing it ends a waiting spare

    def command(self, announce_fd: int, channel_fd: int) -> list[str]:
        command = [self._python, "-m", "opta_lmx.engine.worker_main", "--announce-fd", str(announce_fd),
                   "--channel-fd", str(channel_fd)]
        if self.warm_up_model is not None:
            command += ["--warm-up-model", str(self.warm_up_model)]
        return command

    def start(self) -> None:
        (self.run_dir / "home").mkdir(parents=True, exist_ok=True)
        env = {**self.env, "HOME": str(self.run_dir / "home")}
        read_fd, write_fd = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with open_log(self.log_path) as log_file:
                self.started_at = time.time()
                self.proc = subprocess.Popen(
                    self.command(write_fd, theirs.fileno()), stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                    close_fds=True, pass_fds=(write_fd, theirs.fileno()),
                )
        except BaseException:
            os.close(read_fd)
            ours.close()
            raise
        finally:
            os.close(write_fd)
            theirs.close()
        self.channel = ours
        self.create_time = process_create_time(self.proc.pid) or self.started_at
        self.announcements = Announcements(read_fd, self.id)

    @property
    def waiting(self) -> bool:
        """Whether it has imported and waits for its assignment."""
        return self.announcements is not None and self.announcements.waiting.is_set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def forget_files(self) -> None:
        """Once assigned, the process writes to its worker's log and HOME: drop the spare's."""
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def launch(self, argv: list[str], env: dict[str, str], log_path: Path,
               on_announce: Callable[[str], None], *, key: str | None, listener: socket.socket) -> Launched:
        """Make this spare the worker `vllm-mlx <argv>` would be, serving on `listener` (see PreparedStart)."""
        assert self.proc is not None and self.channel is not None and self.announcements is not None
        self.announcements.listen(on_announce)
        line = json.dumps({"argv": argv, "env": env, "key": key, "log_path": str(log_path), "cwd": os.getcwd()})
        try:
            socket.send_fds(self.channel, [line.encode() + b"\n"], [listener.fileno()])
        finally:
            self.channel.close()
            self.channel = None
        self.forget_files()
        assert self.create_time is not None
        return Launched(self.proc.pid, self.create_time, self.proc, self.id)

    def stop(self, grace: float = 5.0) -> None:
        """Close its channel (a waiting spare exits by itself), then SIGTERM, then SIGKILL its group."""
        if self.proc is None:
            return
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(timeout=grace / 3)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.run_dir, ignore_errors=True)


class SpareWorkers:
    """Keeps `count` spares waiting and replaces any that die; `take()` hands one over.

    The replacement for a taken spare starts `refill_delay` seconds after the new worker
    serves, or at the latest `refill_delay` + 60 s after the take: its imports compete for the
    CPU with the load and the first answers it would slow.
    """

    def __init__(self, run_dir: Path, env: dict[str, str], *, count: int = 1,
                 python: str = sys.executable, refill_delay: float = 5.0,
                 warm_up_model: Path | None = None):
        self.warm_up_model = warm_up_model  # a tiny model to load once while waiting (None: skip)
        self.run_dir = Path(run_dir)
        self.env = dict(env)
        self.count = count
        self.refill_delay = refill_delay
        self._python = python
        self._spares: list[Spare] = []
        self._lock = threading.Lock()
        self._closed = False
        self._failures = 0
        self.replaced = 0  # spares that died while waiting and were replaced (for status and tests)

    def spares(self) -> list[Spare]:
        with self._lock:
            return list(self._spares)

    def fill(self) -> None:
        """Start spares until `count` are alive (a no-op once closed)."""
        while True:
            with self._lock:
                self._spares = [s for s in self._spares if s.alive()]
                if self._closed or len(self._spares) >= self.count:
                    return
                spare = Spare(self.run_dir, self.env, python=self._python,
                              warm_up_model=self.warm_up_model)
                self._spares.append(spare)
            try:
                spare.start()
            except OSError as error:
                log.warning("could not start a spare worker: %s", error)
                with self._lock:
                    self._spares.remove(spare)
                return
            threading.Thread(target=self._watch, args=(spare,), name=f"watch-{spare.id}", daemon=True).start()

    def take(self, env: dict[str, str]) -> Spare | None:
        """A waiting spare that imported with this environment, or None (start cold then)."""
        wanted = comparable_env(env)
        with self._lock:
            for spare in self._spares:
                if spare.alive() and spare.waiting and comparable_env(spare.env) == wanted:
                    self._spares.remove(spare)
                    break
            else:
                return None
        refill = threading.Timer(self.refill_delay + 60.0, self.fill)
        refill.daemon = True
        refill.start()
        assert spare.announcements is not None
        spare.announcements.listen(lambda word: self._refill_soon(refill) if word == SERVING else None)
        return spare

    def _refill_soon(self, pending: threading.Timer) -> None:
        """The taken spare serves: refill `refill_delay` seconds from now, not at the deadline."""
        pending.cancel()
        timer = threading.Timer(self.refill_delay, self.fill)
        timer.daemon = True
        timer.start()

    def _watch(self, spare: Spare) -> None:
        """Replace a spare that died while waiting, with a backoff if they keep dying."""
        assert spare.proc is not None
        spare.proc.wait()
        with self._lock:
            if spare not in self._spares or self._closed:
                return  # taken (now a worker's business) or stopped on purpose
            self._spares.remove(spare)
            self._failures += 1
            delay = min(RESTART_BACKOFF[0] * 2 ** (self._failures - 1), RESTART_BACKOFF[1])
            self.replaced += 1
        log.warning("spare %s exited with %s; replacing it in %.0fs (log: %s)",
                    spare.id, spare.proc.returncode, delay, spare.log_path)
        shutil.rmtree(spare.run_dir, ignore_errors=True)
        if spare.waiting:
            delay = 0.0  # it had worked: not a crash loop
            self._failures = 0
        timer = threading.Timer(delay, self.fill)
        timer.daemon = True
        timer.start()

    def close(self, grace: float = 5.0) -> None:
        """Stop every spare and start no more."""
        with self._lock:
            self._closed = True
            spares, self._spares = self._spares, []
        for spare in spares:
            spare.stop(grace)
        shutil.rmtree(self.run_dir, ignore_errors=True)


