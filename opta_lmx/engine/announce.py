"""How a worker started from a spare or a template tells the control plane it serves.

The worker writes one word a line on a pipe (engine/worker_main.py: `waiting`, `serving`); a
thread here reads them and calls the listeners, so `Worker.wait_ready` wakes at once instead
of at its next poll. What a prepared start hands to a Worker is a `Launched`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opta_lmx.engine.worker_main import WAITING


class Announcements:
    """The words read from one announcement pipe, and who wants to hear the next ones."""

    def __init__(self, read_fd: int, name: str):
        self.words: list[str] = []
        self.waiting = threading.Event()
        self.ended = threading.Event()  # the pipe closed: every word its writers wrote has been heard
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(read_fd,), name=f"announce-{name}", daemon=True).start()

    def listen(self, listener: Callable[[str], None]) -> None:
        """Call `listener(word)` for each later word, and at once for the past ones."""
        with self._lock:
            self._listeners.append(listener)
            past = list(self.words)
        for word in past:
            listener(word)

    def _read(self, read_fd: int) -> None:
        try:
            self._read_words(read_fd)
        finally:
            self.ended.set()

    def _read_words(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            buffered = b""
            while chunk := pipe.read(256):
                buffered += chunk
                while b"\n" in buffered:
                    raw, buffered = buffered.split(b"\n", 1)
                    word = raw.decode("utf-8", "replace")
                    with self._lock:
                        self.words.append(word)
                        listeners = list(self._listeners)
                    if word == WAITING:
                        self.waiting.set()
                    for listener in listeners:
                        listener(word)


@dataclass
class Launched:
    """A worker process started by a spare or a template; `popen` only if it is our child."""

    pid: int
    create_time: float
    popen: subprocess.Popen[bytes] | None
    source_id: str


class PreparedStart(Protocol):
    """A spare or a template: starts `vllm-mlx <argv>` faster than a cold process would, serving on
    `listener` (a socket the control plane bound) with `key` (sent over a pipe, never argv)."""

    id: str

    def launch(self, argv: list[str], env: dict[str, str], log_path: Path,
               on_announce: Callable[[str], None], *, key: str | None, listener: socket.socket) -> Launched: ...
