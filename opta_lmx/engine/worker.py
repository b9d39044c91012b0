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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from opta_lmx.engine.memory import tree_bytes
from opta_lmx.engine.options import serve_args
from opta_lmx.engine import readiness
from opta_lmx.engine.readiness import WorkerStartError  # noqa: F401 (re-exported: the engine's start error)
from opta_lmx.engine.announce import Announcements
from opta_lmx.engine.ports import listening_socket
from opta_lmx.engine.prefix_cache import LINK_PARENT, SSD_DIR
from opta_lmx.engine.process_group import any_alive, group_members, signal_group
from opta_lmx.engine.records import WorkerRecord, process_create_time
from opta_lmx.engine.worker_main import SERVING, parse_failure
from opta_lmx.engine.worker_auth import KEY_VARIABLE, read_secret, worker_key
from opta_lmx.engine.worker_log import (  # noqa: F401 (rotate_log, LOG_* re-exported)
    LOG_KEEP,
    LOG_MAX_BYTES,
    WORKER_LOGS_KEPT,
    last_error_line,
    log_stamp,
    open_log,
    prune_worker_logs,
    rotate_log,
)
from opta_lmx.state.spec import EngineOptions

if TYPE_CHECKING:
    from opta_lmx.engine.announce import PreparedStart

log = logging.getLogger(__name__)

_STOPS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lmx-stop")  # stopping waits (grace, exit)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker runs. Two specs with the same fingerprint are the same worker."""

    name: str
    source: str
    engine: EngineOptions = field(default_factory=EngineOptions)
    kept_cache: bool = False  # its prefix cache outlives it (engine/prefix_cache.py)
    warm_prompts: str | None = None  # a JSON file of prompts vllm-mlx runs at start
    ranks: tuple[tuple[str, str], ...] = ()  # distributed: (ssh host, ring address) per rank (engine/distributed.py)
    split: str | None = None  # distributed: tensor or pipeline

    @property
    def fingerprint(self) -> str:
        what: dict = {"source": self.source, "engine": self.engine.model_dump(exclude_none=True)}
        if self.ranks:
            what["ranks"], what["split"] = [list(rank) for rank in self.ranks], self.split
        if self.kept_cache:  # a different command line: a different worker (unset: as before)
            what["kept_cache"] = True
        if self.warm_prompts:
            what["warm_prompts"] = self.warm_prompts
        payload = json.dumps(what, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Worker:
    fast_starts = True  # may start through the template or a spare (engine/prepared.py)

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
        # A new worker's socket is bound here, by the control plane, and handed to the worker
        # (engine/ports.py): no one can take its port first. An adopted worker's port is given.
        self._listener: socket.socket | None = None
        if port:
            self.port = port
        else:
            self._listener = listening_socket(host)
            self.port = self._listener.getsockname()[1]
        self.address = f"http://{host}:{self.port}"
        # One log per worker process (<log_dir>/<model>/<worker id>.log): failure classification
        # reads only this worker's output, never an older worker's (whose clients' prompts may say
        # "Error: ..."); `lmx logs` follows the model's newest file across swaps.
        self._per_model_dir = log_path is None and log_dir is not None
        if log_path:
            self.log_path = Path(log_path)
        elif log_dir:
            # Named by its start so the newest worker's log is the last by name (state/worker_logs.py).
            self.log_path = Path(log_dir) / spec.name / f"{log_stamp()}-{self.id}.log"
        else:
            self.log_path = self.run_dir / "worker.log"
        self._python = python
        self._extra_env = env or {}
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: psutil.Process | None = None  # not our child: a previous run's, or forked by the template
        self.adopted = False  # a previous run's worker, rebuilt from its record
        self.create_time: float | None = None
        self.stopping = False
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.spare_id: str | None = None  # the spare or template this worker was started through
        self.started_through = "cold"  # cold | spare | template (engine/prepared.py)
        self._wake: Callable[[], None] | None = None  # wakes wait_ready when the worker announces
        self._served_announced = False
        self._announces = False  # runs engine/worker_main: ready only once it says it serves
        self.failure: tuple[bool, str] | None = None  # (permanent, why) it announced it cannot serve
        self._exited = threading.Event()  # set by the thread that watches it once it is gone
        self._announcements: Announcements | None = None
        self.unadoptable: str | None = None  # why a previous run's worker must be stopped, not adopted
        self._api_key: str | None = None
        self.ssd_cache_max_gb = 4.0  # its SSD tier's bound: half its model's kept-cache budget (the pool sets it)

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
        spec = WorkerSpec(record.name, record.source, engine, kept_cache=record.kept_cache,
                          warm_prompts=record.warm_prompts)
        worker = cls(spec, run_dir=Path(record.run_dir).parent, host=record.host, port=record.port,
                     on_exit=on_exit, log_path=Path(record.log_path))
        worker.id = record.worker_id
        worker.run_dir = Path(record.run_dir)
        worker._adopted = process
        worker.adopted = True
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
            kept_cache=self.spec.kept_cache, warm_prompts=self.spec.warm_prompts,
        )

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
    def load_seconds(self) -> float | None:
        if self.started_at is None or self.ready_at is None:
            return None
        return self.ready_at - self.started_at

    def serve_argv(self) -> list[str]:
        """The `vllm-mlx` arguments this worker runs (its key is added by the launcher, never here).

        A kept cache (engine/prefix_cache.py): vllm-mlx's SSD tier in the worker's HOME, where the
        pool links it to the model's kept cache, bounded to half the model's disk budget."""
        argv = ["serve", self.spec.source, "--host", self.host, "--port", str(self.port),
                "--served-model-name", self.spec.name, *serve_args(self.spec.engine)]
        if self.spec.kept_cache:
            argv += ["--ssd-cache-dir", str(self.run_dir / "home" / LINK_PARENT / SSD_DIR),
                     "--ssd-cache-max-gb", f"{self.ssd_cache_max_gb:g}"]
        if self.spec.warm_prompts:
            argv += ["--warm-prompts", self.spec.warm_prompts]
        return argv

    def command(self, announce_fd: int, listen_fd: int) -> list[str]:
        """A cold worker's command line: the launcher (engine/worker_main.py), which takes its key
        from the environment and serves on the socket it inherits, then vllm-mlx's arguments."""
        return [self._python, "-m", "opta_lmx.engine.worker_main", "--announce-fd", str(announce_fd),
                "--listen-fd", str(listen_fd), "--", *self.serve_argv()]

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
        if self._listener is None:
            raise RuntimeError(f"worker {self.id} has no socket of its own to serve on (started once already?)")
        if prepared is not None:
            self._spawn_from(prepared)  # raises if the spare or template failed: the socket stays for a cold start
        else:
            self._spawn_cold()
        self.close_listener()  # the worker has it now: ours goes (a start that failed leaves it to the pool's drop)

    def _spawn_cold(self) -> None:
        read_fd, write_fd = os.pipe()
        assert self._listener is not None
        listen_fd = self._listener.fileno()
        try:
            command = self.command(write_fd, listen_fd)
            self._announces = "opta_lmx.engine.worker_main" in command  # a test's stand-in does not announce
            popen(self, command, pass_fds=(write_fd, listen_fd))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._announcements = Announcements(read_fd, self.id)
        self._announcements.listen(self._announced)
        threading.Thread(target=self._wait_for_exit, name=f"wait-{self.id}", daemon=True).start()

    def close_listener(self) -> None:
        """Close the control plane's copy of the worker's socket (the worker keeps its own)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _spawn_from(self, prepared: "PreparedStart") -> None:
        arguments = self.serve_argv()
        environment = self.environment()
        key = environment.pop(KEY_VARIABLE, None)  # over the spare's or template's socket, never on a command line
        self.started_at = time.time()
        log.info("starting worker %s through %s: %s", self.id, prepared.id, " ".join(arguments))
        assert self._listener is not None
        launched = prepared.launch(arguments, environment, self.log_path, self._announced, key=key,
                                   listener=self._listener)
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
        failure = parse_failure(word)
        if failure is not None:
            self.failure = failure
        elif word != SERVING:
            return
        else:
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
        if not self.stopping:
            log.warning("worker %s (pid %s) exited with %s", self.id, self.pid, code)
        self._exited.set()
        if self._on_exit:
            self._on_exit(self)

    async def wait_ready(self, timeout: float) -> None:
        """Return once the worker serves its model and proves it holds its key (engine/readiness.py);
        raise WorkerStartError otherwise, permanent only where the worker said so."""
        await readiness.wait_ready(self, timeout)

    def owns_port(self) -> bool:
        """Whether this process (not another) listens on its port (reads /proc: off the event loop)."""
        return readiness.owns_port(self.pid, self.port)

    async def healthy(self, timeout: float = 2.0) -> bool:
        """Whether it answers /health with its model loaded and proves it holds its key (adoption)."""
        return await readiness.healthy(self, timeout)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds.

        `grace=0` kills at once, without SIGTERM: for a drained worker (nothing in flight), whose
        graceful shutdown would only save a prefix cache into its own HOME, which no later worker
        reads (the pool deletes it). Measured: 0.2 s sooner per unload (docs/reconciler.md)."""
        self.stopping = True
        if self.pid is None:
            return
        # Threads of their own: the default pool is the file reads' and the admin API's.
        await asyncio.get_running_loop().run_in_executor(_STOPS, self.stop_sync, grace)

    def stop_sync(self, grace: float = 10.0) -> None:
        self.stopping = True
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


def popen(worker: Worker, command: list[str], pass_fds: tuple[int, ...] = ()) -> None:
    """Start `worker`'s process cold: logging to its own file, in a process group of its own (stop()
    kills the tree); its start and create times noted (engine/distributed.py starts its launcher so)."""
    shown = command[command.index("--") + 1:] if "--" in command else command
    log.info("starting worker %s: %s", worker.id, " ".join(shown))
    with open_log(worker.log_path) as log_file:
        worker.started_at = time.time()
        worker._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=worker.environment(), start_new_session=True, close_fds=True, pass_fds=pass_fds,
        )
    worker.create_time = process_create_time(worker._proc.pid) or worker.started_at
