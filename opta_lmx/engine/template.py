"""The control plane's side of the template process (engine/template_main.py, Linux only).

`WorkerTemplate.launch()` asks the template to fork a worker and hands the Worker its pid; the
worker is then watched through psutil (it is the template's child, not ours), exactly as an
adopted one. A template that dies is restarted on the next `ensure()`; `close()` ends it, and
it also ends by itself when its socket closes (the control plane died). Workers it forked are
in their own sessions and stay (stopping them is the Worker's business, as ever).
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
from typing import Any

from opta_lmx.engine.announce import Announcements, Launched
from opta_lmx.engine.records import process_create_time
from opta_lmx.engine.worker_log import open_log
from opta_lmx.engine.spare import comparable_env

log = logging.getLogger(__name__)

#: How long the template may take to answer a fork request.
FORK_TIMEOUT = 10.0


def fork_supported() -> bool:
    """Forking a pre-imported parent is safe only where no Metal/Objective-C state exists."""
    return sys.platform.startswith("linux")


class TemplateError(RuntimeError):
    pass


class WorkerTemplate:
    """One pre-imported template process that forks workers on request."""

    def __init__(self, run_dir: Path, env: dict[str, str], *, python: str = sys.executable,
                 warm_up_model: Path | None = None):
        if not fork_supported():
            raise TemplateError("worker templates fork: Linux only (use spares elsewhere)")
        self.id = f"template-{os.urandom(3).hex()}"
        self.run_dir = Path(run_dir)
        self.env = dict(env)
        self.warm_up_model = warm_up_model  # its imports are listed from a warm-up on it (None: skip)
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._reader: Any = None  # the channel's file, for reading answers
        self._lock = threading.Lock()
        self.waiting = threading.Event()
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure(self) -> None:
        """Start the template if it is not running (first time, or after it died)."""
        with self._lock:
            if self.alive():
                return
            if self._proc is not None:
                log.warning("worker template (pid %s) exited with %s; restarting it", self._proc.pid,
                            self._proc.returncode)
                self.restarts += 1
                self._close_channel()
            self._start()

    def _start(self) -> None:
        (self.run_dir / "home").mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [self._python, "-m", "opta_lmx.engine.template_main", "--socket-fd", str(theirs.fileno())]
        if self.warm_up_model is not None:
            command += ["--warm-up-model", str(self.warm_up_model)]
        self.waiting.clear()
        try:
            with open_log(self.run_dir / "template.log") as log_file:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env={**self.env, "HOME": str(self.run_dir / "home")}, start_new_session=True,
                    close_fds=True, pass_fds=(theirs.fileno(),),
                )
        finally:
            theirs.close()
        self._channel = ours
        self._reader = ours.makefile("rb")
        threading.Thread(target=self._await_waiting, args=(self._reader,), daemon=True).start()

    def _await_waiting(self, reader) -> None:
        try:
            line = reader.readline()
        except (OSError, ValueError):
            return
        if line and json.loads(line).get("waiting"):
            self.waiting.set()

    def suits(self, env: dict[str, str]) -> bool:
        return self.alive() and self.waiting.is_set() and comparable_env(env) == comparable_env(self.env)

    def launch(self, argv: list[str], env: dict[str, str], log_path: Path,
               on_announce: Callable[[str], None], *, key: str | None, listener: socket.socket) -> Launched:
        """Fork `vllm-mlx <argv>` from the template, serving on `listener` (see PreparedStart)."""
        request = json.dumps({"argv": argv, "env": env, "key": key, "log_path": str(log_path), "cwd": os.getcwd()})
        with self._lock:
            if not self.alive() or self._channel is None or not self.waiting.is_set():
                raise TemplateError("the worker template is not ready")
            read_fd, write_fd = os.pipe()
            try:
                self._channel.settimeout(FORK_TIMEOUT)
                socket.send_fds(self._channel, [request.encode() + b"\n"], [write_fd, listener.fileno()])
                answer = json.loads((self._reader.readline() if self._reader else b"") or b"{}")
            except (OSError, ValueError) as error:
                os.close(read_fd)
                raise TemplateError(f"the worker template did not fork: {error}") from error
            finally:
                os.close(write_fd)
        if "pid" not in answer:
            os.close(read_fd)
            raise TemplateError(f"the worker template refused: {answer.get('error', answer)}")
        pid = answer["pid"]
        announcements = Announcements(read_fd, f"forked-{pid}")
        announcements.listen(on_announce)
        return Launched(pid, process_create_time(pid) or time.time(), None, self.id)

    def _close_channel(self) -> None:
        # Shut the socket down first: a thread blocked in `_await_waiting`'s readline holds the
        # reader's lock, so closing the reader alone would wait for it forever (template warming up).
        try:
            if self._channel is not None:
                self._channel.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for closable in (self._reader, self._channel):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass
        self._reader = self._channel = None

    def close(self, grace: float = 5.0) -> None:
        """End the template: close its socket (it exits by itself), then SIGTERM, SIGKILL."""
        with self._lock:
            self._close_channel()
            proc, self._proc = self._proc, None
        if proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        # Its group: the template and a warm-up child; workers are in their own sessions.
                        os.killpg(proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                try:
                    proc.wait(timeout=grace / 3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.run_dir, ignore_errors=True)  # its HOME and log: nothing piles up in the state dir
