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

from opta_lmx.engine.memory import tree_bytes
from opta_lmx.engine.options import serve_args
from opta_lmx.engine.ports import free_tcp_port, reserve_port
from opta_lmx.engine.process_group import any_alive, group_members, signal_group
from opta_lmx.engine.records import WorkerRecord, process_create_time
from opta_lmx.engine.worker_main import SERVING
from opta_lmx.engine.worker_auth import KEY_VARIABLE, LAUNCHER, loopback_client, read_secret, worker_key
from opta_lmx.engine.worker_log import (  # noqa: F401 (rotate_log, LOG_* re-exported)
    LOG_KEEP,
    LOG_MAX_BYTES,
    WORKER_LOGS_KEPT,
    last_error_line,
    prune_worker_logs,
    rotate_log,
)
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
        log_dir: Path | None = None,
    ):
        self.spec = spec
        self.id = f"{spec.name}-{spec.fingerprint[:8]}-{os.urandom(3).hex()}"
        self.run_dir = Path(run_dir) / self.id
        self.host = host
        if port:
            reserve_port(port)  # given (an adopted worker's): no worker started later gets it
        self.port = port or free_tcp_port(host)  # released by the pool when it drops the worker
        self.address = f"http://{host}:{self.port}"
        # One log per worker process (<log_dir>/<model>/<worker id>.log): failure classification
        # reads only this worker's output, never an older worker's (whose clients' prompts may say
        # "Error: ..."); `lmx logs` follows the model's newest file across swaps.
        self._per_model_dir = log_path is None and log_dir is not None
        if log_path:
            self.log_path = Path(log_path)
        elif log_dir:
            self.log_path = Path(log_dir) / spec.name / f"{self.id}.log"
        else:
            self.log_path = self.run_dir / "worker.log"
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
        self.unadoptable: str | None = None  # why a previous run's worker must be stopped, not adopted
        self._api_key: str | None = None

    # -- identity -----------------------------------------------------------------
    @classmethod
    def from_record(
        cls, record: WorkerRecord, process: psutil.Process, on_exit: Callable[["Worker"], None] | None = None
    ) -> "Worker":
        """A worker that a previous control plane started: watched through psutil, not Popen.

        A record that could not be read (`record.problem`) still gives a worker to stop: it is
        marked `unadoptable` with the reason, so the loop stops it instead of adopting it.
        """
        engine = EngineOptions() if record.problem else EngineOptions.model_validate(record.engine)
        spec = WorkerSpec(record.name, record.source, engine)
        worker = cls(spec, run_dir=Path(record.run_dir).parent, host=record.host, port=record.port,
                     on_exit=on_exit, log_path=Path(record.log_path))
        worker.id = record.worker_id
        worker.run_dir = Path(record.run_dir)
        worker._adopted = process
        worker.create_time = record.create_time
        worker.started_at = record.started_at
        worker.ready_at = record.ready_at
        worker.unadoptable = record.problem
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
            return any_alive([self._adopted])
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
        # LAUNCHER appends `--api-key` from the environment: a key on the command line is public.
        return [
            self._python, "-c", LAUNCHER, "vllm_mlx.cli", "serve", self.spec.source,
            "--host", self.host, "--port", str(self.port),
            "--served-model-name", self.spec.name,
            *serve_args(self.spec.engine),
        ]

    def api_key(self) -> str | None:
        """This worker's key (engine/worker_auth.py), or None if the control plane made no secret.

        Kept once found: the loop asks on every measurement, and a secret, once made, never changes."""
        if self._api_key is None:
            secret = read_secret(self.run_dir.parent)
            self._api_key = worker_key(secret, self.address) if secret else None
        return self._api_key

    def environment(self) -> dict[str, str]:
        # No LMX_* variable (the gateway's keys among them) reaches a worker or the model code it runs.
        env = {name: value for name, value in os.environ.items() if not name.startswith("LMX_")}
        env.pop(KEY_VARIABLE, None)
        key = self.api_key()
        if key:
            env[KEY_VARIABLE] = key
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
        if self._per_model_dir:
            prune_worker_logs(self.log_path.parent, WORKER_LOGS_KEPT)
        else:
            rotate_log(self.log_path)
        if prepared is not None:
            self._spawn_from(prepared)
            return
        log_file = open(self.log_path, "ab", buffering=0)
        self.started_at = time.time()
        command = self.command()  # logged from `vllm_mlx.cli` on: the launcher's code is noise
        shown = command[command.index("vllm_mlx.cli"):] if "vllm_mlx.cli" in command else command
        log.info("starting worker %s: %s", self.id, " ".join(shown))
        self._proc = subprocess.Popen(
            command,
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
        if "vllm_mlx.cli" not in command:
            raise ValueError(f"a prepared start runs vllm_mlx.cli arguments, not {command[:3]}")
        arguments = command[command.index("vllm_mlx.cli") + 1:]
        environment = self.environment()
        key = environment.pop(KEY_VARIABLE, None)  # what LAUNCHER does for a cold worker
        self.started_at = time.time()
        log.info("starting worker %s through %s: %s", self.id, prepared.id, " ".join(arguments))
        # The key goes over the spare's pipe or the template's socket, never onto a command line.
        launched = prepared.launch([*arguments, *(["--api-key", key] if key else [])], environment,
                                   self.log_path, self._announced)
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
            while any_alive([self._adopted]):
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
        async with loopback_client(2.0) as client:
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
        async with loopback_client(timeout) as client:
            return await self._serves(client)

    async def _serves(self, client: httpx.AsyncClient) -> bool:
        """The one readiness test: /health answers 200 with the model loaded, under this worker's
        served name (another process on the port, say another model's worker, is not this one)."""
        try:
            response = await client.get(f"{self.address}/health")
            body = response.json()
            return (response.status_code == 200 and bool(body.get("model_loaded"))
                    and body.get("model_name") in (None, self.spec.name))
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds.

        `grace=0` kills at once, without SIGTERM: for a drained worker (nothing in flight), whose
        graceful shutdown would only save a prefix cache into its own HOME, which no later worker
        reads (the pool deletes it). Measured: 0.2 s sooner per unload (docs/reconciler.md)."""
        self._stopping = True
        if self.pid is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.stop_sync, grace)

    def stop_sync(self, grace: float = 10.0) -> None:
        self._stopping = True
        if self.pid is None or (self._adopted is not None and not self.alive()):
            return  # an adopted pid that is gone may be reused by now: never signal it
        pgid = self.pid  # started with start_new_session: its pid is its process group id
        members = group_members(pgid)
        if grace > 0:
            signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.alive() or any_alive(members)):
                time.sleep(0.05)
            if self.alive() or any_alive(members):
                log.warning("worker %s did not stop within %.1fs; killing it", self.id, grace)
        if self.alive() or any_alive(members):
            signal_group(pgid, signal.SIGKILL)
            for proc in members:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            if self._proc is not None:
                self._proc.wait(timeout=5)
            deadline = time.monotonic() + 5.0  # the kernel returns its memory as the process goes
            while time.monotonic() < deadline and (self.alive() or any_alive(members)):
                time.sleep(0.005)

    # -- observation --------------------------------------------------------------
    @property
    def forked(self) -> bool:
        """Forked from the template: it shares that process's pages (engine/memory.py counts them there)."""
        return self.started_through == "template"

    def memory_bytes(self) -> int | None:
        """What this worker and its children cost the machine (engine/memory.py's `tree_bytes`):
        anonymous memory, or the unique pages of a worker forked from the template. Reads /proc
        (a forked worker's smaps_rollup takes milliseconds): called off the event loop."""
        if not self.alive() or self.pid is None:
            return None
        return tree_bytes(self.pid, private=self.forked)

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
