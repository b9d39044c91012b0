"""A Worker: one vllm-mlx server for one model, in its own process group on loopback.

Process isolation is the point: unloading returns the memory for real, and a crash costs
one model. Every wait has a deadline, and stopping escalates SIGTERM -> SIGKILL for the
whole process group so that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil

from opta_lmx.engine.options import serve_args
from opta_lmx.engine.records import WorkerRecord, process_create_time
from opta_lmx.engine.worker_main import SERVING
from opta_lmx.state.spec import EngineOptions

if TYPE_CHECKING:
    from opta_lmx.engine.announce import PreparedStart

log = logging.getLogger(__name__)


class WorkerStartError(Exception):
    """A worker did not become ready. `permanent` errors are not worth retrying unchanged."""

    def __init__(self, message: str, *, permanent: bool, log_tail: str = ""):
        super().__init__(message)
        self.permanent = permanent
        self.log_tail = log_tail


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker runs. Two specs with the same fingerprint are the same worker."""

    name: str
    source: str
    engine: EngineOptions = field(default_factory=EngineOptions)

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(
            {"source": self.source, "engine": self.engine.model_dump(exclude_none=True)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Markers in a worker's log that mean retrying the same spec will fail the same way.
_PERMANENT_MARKERS = (
    "No such file or directory",
    "does not exist",
    "not a valid model",
    "Model type",
    "not supported",
    "RepositoryNotFoundError",
    "LocalEntryNotFoundError",
    "safetensors_rust.SafetensorError",
    "HeaderTooLarge",
    "Error: ",
    "usage: vllm-mlx",
    "invalid choice",
)


class Worker:
    def __init__(
        self,
        spec: WorkerSpec,
        *,
        run_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        on_exit: Callable[["Worker"], None] | None = None,
        log_path: Path | None = None,
    ):
        self.spec = spec
        self.id = f"{spec.name}-{spec.fingerprint[:8]}-{os.urandom(3).hex()}"
        self.run_dir = Path(run_dir) / self.id
        self.host = host
        self.port = port or free_tcp_port(host)
        self.address = f"http://{host}:{self.port}"
        self.log_path = Path(log_path) if log_path else self.run_dir / "worker.log"
        self._python = python
        self._extra_env = env or {}
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: psutil.Process | None = None  # a previous run's worker (not our child)
        self.create_time: float | None = None
        self._stopping = False
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.spare_id: str | None = None  # the spare or template this worker was started through
        self.started_through = "cold"  # cold | spare | template (engine/prepared.py)
        self._wake: Callable[[], None] | None = None  # wakes wait_ready when the worker announces
        self._served_announced = False
        self._announces = False  # started through a spare or template: ready only once it says so

    # -- identity -----------------------------------------------------------------
    @classmethod
    def from_record(
        cls, record: WorkerRecord, process: psutil.Process, on_exit: Callable[["Worker"], None] | None = None
    ) -> "Worker":
        """A worker that a previous control plane started: watched through psutil, not Popen."""
        spec = WorkerSpec(record.name, record.source, EngineOptions.model_validate(record.engine))
        worker = cls(spec, run_dir=Path(record.run_dir).parent, host=record.host, port=record.port,
                     on_exit=on_exit, log_path=Path(record.log_path))
        worker.id = record.worker_id
        worker.run_dir = Path(record.run_dir)
        worker._adopted = process
        worker.create_time = record.create_time
        worker.started_at = record.started_at
        worker.ready_at = record.ready_at
        worker.started_through = record.started_through
        threading.Thread(target=worker._wait_for_exit, name=f"wait-{worker.id}", daemon=True).start()
        return worker

    def record(self) -> WorkerRecord:
        """What the state directory keeps about this worker (see engine/records.py)."""
        assert self.pid is not None and self.create_time is not None
        return WorkerRecord(
            worker_id=self.id, name=self.spec.name, fingerprint=self.spec.fingerprint,
            source=self.spec.source, engine=self.spec.engine.model_dump(mode="json", exclude_none=True),
            pid=self.pid, create_time=self.create_time, host=self.host, port=self.port,
            address=self.address, log_path=str(self.log_path), run_dir=str(self.run_dir),
            started_at=self.started_at, ready_at=self.ready_at, started_through=self.started_through,
        )

    @property
    def adopted(self) -> bool:
        return self._adopted is not None

    @property
    def pid(self) -> int | None:
        if self._proc:
            return self._proc.pid
        return self._adopted.pid if self._adopted else None

    @property
    def returncode(self) -> int | None:
        """The exit code; None while running, and always for an adopted worker (not our child)."""
        return self._proc.poll() if self._proc else None

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if self._adopted is not None:
            return _any_alive([self._adopted])
        return False

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def load_seconds(self) -> float | None:
        if self.started_at is None or self.ready_at is None:
            return None
        return self.ready_at - self.started_at

    def command(self) -> list[str]:
        return [
            self._python, "-m", "vllm_mlx.cli", "serve", self.spec.source,
            "--host", self.host, "--port", str(self.port),
            "--served-model-name", self.spec.name,
            *serve_args(self.spec.engine),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        home = env.get("HOME", str(Path.home()))
        # vllm-mlx keeps its prefix cache under ~/.cache/vllm-mlx/<model>: give each worker
        # its own HOME so two workers of one model (a swap) never share it, while the
        # model hub cache stays the user's.
        env.setdefault("HF_HOME", env.get("HF_HOME") or os.path.join(home, ".cache", "huggingface"))
        env["HOME"] = str(self.run_dir / "home")
        env.setdefault("VLLM_MLX_SIMPLE_ENGINE_LOCK_ADMISSION", "wait")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._extra_env)
        return env

    # -- lifecycle ----------------------------------------------------------------
    def spawn(self, prepared: "PreparedStart | None" = None) -> None:
        """Start the worker: cold, or through a waiting spare or a template (engine/announce.py)."""
        (self.run_dir / "home").mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path)
        if prepared is not None:
            self._spawn_from(prepared)
            return
        log_file = open(self.log_path, "ab", buffering=0)
        self.started_at = time.time()
        log.info("starting worker %s: %s", self.id, " ".join(self.command()))
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,  # its own process group: stop() kills the whole tree
            close_fds=True,
        )
        log_file.close()
        self.create_time = process_create_time(self._proc.pid) or self.started_at
        threading.Thread(target=self._wait_for_exit, name=f"wait-{self.id}", daemon=True).start()

    def _spawn_from(self, prepared: "PreparedStart") -> None:
        command = self.command()
        if command[1:3] != ["-m", "vllm_mlx.cli"]:
            raise ValueError(f"a prepared start runs vllm_mlx.cli arguments, not {command[:3]}")
        self.started_at = time.time()
        log.info("starting worker %s through %s: %s", self.id, prepared.id, " ".join(command))
        launched = prepared.launch(command[3:], self.environment(), self.log_path, self._announced)
        if launched.popen is not None:
            self._proc = launched.popen
        else:  # forked by a template: not our child, watched like an adopted worker
            self._adopted = psutil.Process(launched.pid)
        self.create_time = launched.create_time
        self.spare_id = launched.source_id
        self.started_through = "spare" if launched.popen is not None else "template"
        self._announces = True
        threading.Thread(target=self._wait_for_exit, name=f"wait-{self.id}", daemon=True).start()

    def _announced(self, word: str) -> None:
        if word == SERVING:
            self._served_announced = True
            if self._wake is not None:
                self._wake()

    def _wait_for_exit(self) -> None:
        if self._proc is not None:
            code = self._proc.wait()
        else:
            assert self._adopted is not None
            # Not our child: no wait() to block in, so poll (gently: this runs for weeks).
            # Zombies count as gone; is_running() also checks the create time (pid reuse).
            while _any_alive([self._adopted]):
                time.sleep(0.5)
            code = None
        if not self._stopping:
            log.warning("worker %s (pid %s) exited with %s", self.id, self.pid, code)
        if self._on_exit:
            self._on_exit(self)

    async def wait_ready(self, timeout: float) -> None:
        """Return once the worker answers /health; raise WorkerStartError otherwise."""
        deadline = time.monotonic() + timeout
        announced = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._wake = lambda: loop.call_soon_threadsafe(announced.set)
        if self._served_announced:
            announced.set()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not self.alive():
                    tail = self.log_tail()
                    raise WorkerStartError(
                        f"worker exited with code {self.returncode} while loading: {last_error_line(tail)}",
                        permanent=any(marker in tail for marker in _PERMANENT_MARKERS),
                        log_tail=tail,
                    )
                # An announcing worker must have said so: another process may answer on its port.
                if (announced.is_set() or not self._announces) and await self._serves(client):
                    self.ready_at = time.time()
                    return
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    await self.stop(grace=2.0)
                    raise WorkerStartError(
                        f"worker not ready after {timeout:.0f}s", permanent=False, log_tail=tail
                    )
                if announced.is_set():  # announced but /health not yet right: poll, do not spin
                    await asyncio.sleep(0.05)
                    continue
                try:  # a prepared start announces when it serves: no polling delay
                    await asyncio.wait_for(announced.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass

    async def healthy(self, timeout: float = 2.0) -> bool:
        """Whether the worker answers /health with its model loaded (used to adopt it)."""
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await self._serves(client)

    async def _serves(self, client: httpx.AsyncClient) -> bool:
        """The one readiness test: /health answers 200 with the model loaded."""
        try:
            response = await client.get(f"{self.address}/health")
            return response.status_code == 200 and bool(response.json().get("model_loaded"))
        except (httpx.HTTPError, ValueError):
            return False

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
        self._stopping = True
        if self.pid is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.stop_sync, grace)

    def stop_sync(self, grace: float = 10.0) -> None:
        self._stopping = True
        if self.pid is None or (self._adopted is not None and not self.alive()):
            return  # an adopted pid that is gone may be reused by now: never signal it
        pgid = self.pid  # started with start_new_session: its pid is its process group id
        members = _group_members(pgid)
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.alive() or _any_alive(members)):
            time.sleep(0.05)
        if self.alive() or _any_alive(members):
            log.warning("worker %s did not stop within %.1fs; killing it", self.id, grace)
            _signal_group(pgid, signal.SIGKILL)
            for proc in members:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            if self._proc is not None:
                self._proc.wait(timeout=5)

    # -- observation --------------------------------------------------------------
    def memory_bytes(self) -> int | None:
        """Resident memory of the worker and its children (what unloading gives back).

        A worker forked from the template shares its imported pages: RSS would count them once
        per worker, so its proportional share (PSS) is read instead."""
        if not self.alive():
            return None
        total = 0
        for proc in [*_try_process(self.pid), *_children(self.pid)]:
            try:
                if self.started_through == "template":
                    total += getattr(proc.memory_full_info(), "pss", 0) or proc.memory_info().rss
                else:
                    total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> None:
    """At a worker's start: if its log has grown past `max_bytes`, shift it to .1 (keeping `keep`)."""
    try:
        if path.stat().st_size <= max_bytes:
            return
    except FileNotFoundError:
        return
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    if keep > 0:
        os.replace(path, path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def last_error_line(text: str) -> str:
    """The most telling line of a worker's log: its last error, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in [*_try_process(pgid), *_children(pgid)]:
        members.append(proc)
    return members


def _try_process(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid)]
    except psutil.Error:
        return []


def _any_alive(processes: list[psutil.Process]) -> bool:
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
