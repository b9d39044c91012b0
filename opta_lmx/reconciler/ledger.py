"""The ledger: one entry per worker the loop knows (loading, serving, draining, stopping), and
one failure record per model that must back off.

A worker's phase changes only through `Ledger.move`, which checks the transition against one
table (llama-swap's `isValidTransition` habit) and records the event at the transition itself,
so the phase is written in one place and an impossible step fails loudly instead of silently.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from opta_lmx.state.status import EventLog


class WorkerPhase(str, enum.Enum):
    DOWNLOADING = "downloading"  # a hub model's files are fetched before any process starts
    WAITING = "waiting"  # a load waits for other workers to free memory
    LOADING = "loading"  # the process is starting and loading weights
    READY = "ready"  # serving requests
    DRAINING = "draining"  # no new requests; the ones in flight finish
    STOPPING = "stopping"  # the process is being stopped
    GONE = "gone"  # stopped, exited, failed or cancelled: the entry leaves the ledger


_TRANSITIONS: dict[WorkerPhase, frozenset[WorkerPhase]] = {
    WorkerPhase.DOWNLOADING: frozenset({WorkerPhase.WAITING, WorkerPhase.LOADING, WorkerPhase.GONE}),
    WorkerPhase.WAITING: frozenset({WorkerPhase.LOADING, WorkerPhase.GONE}),
    WorkerPhase.LOADING: frozenset({WorkerPhase.READY, WorkerPhase.GONE}),
    WorkerPhase.READY: frozenset({WorkerPhase.DRAINING, WorkerPhase.GONE}),
    WorkerPhase.DRAINING: frozenset({WorkerPhase.STOPPING, WorkerPhase.GONE}),
    WorkerPhase.STOPPING: frozenset({WorkerPhase.GONE}),
    WorkerPhase.GONE: frozenset(),
}


def _take(entry: WorkerEntry, worker) -> None:
    """What the ledger keeps of a running worker (the engine's WorkerHandle)."""
    entry.worker_id, entry.pid, entry.address = worker.id, worker.pid, worker.address
    entry.forked = bool(worker.forked)
    entry.started_at, entry.ready_at, entry.load_seconds = worker.started_at, worker.ready_at, worker.load_seconds


def is_valid_transition(old: WorkerPhase, new: WorkerPhase) -> bool:
    """The one rule of which phase may follow which."""
    return new in _TRANSITIONS[old]


class InvalidTransition(RuntimeError):
    pass


class Traffic:
    """A worker's in-flight requests, counted by the gateway and read by the loop (drain, idle)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.in_flight = 0
        self.last_used = clock()

    def begin(self) -> None:
        self.in_flight += 1
        self.last_used = self._clock()

    def end(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_used = self._clock()

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.in_flight else max(0.0, now - self.last_used)


@dataclass
class WorkerEntry:
    """Everything the loop knows about one worker, from the load's start to its end."""

    model: str
    fingerprint: str
    phase: WorkerPhase
    traffic: Traffic
    worker_id: str | None = None  # None until the process is up
    pid: int | None = None
    address: str | None = None
    why: str = ""  # why it waits for memory, or why it drains
    measured_bytes: int | None = None  # last measurement (engine/memory.py: what it costs the machine, + MLX)
    mlx_bytes: int = 0  # MLX active + cache bytes the worker reported (Metal; 0 on the CPU backend)
    planned_bytes: int = 0  # what its load was planned at (counted until it runs and is measured)
    forked: bool = False  # forked from the template: measured as its own pages, the template's counted apart
    started_at: float | None = None  # the process's start (wall clock), once it runs
    ready_at: float | None = None  # when it became Ready (demand's min_residency reads it)
    load_seconds: float | None = None

    @property
    def key(self) -> str:
        """The worker id, or `loading:<model>:<fingerprint>` for a load without a process yet."""
        return self.worker_id or f"loading:{self.model}:{self.fingerprint}"

    @property
    def loading(self) -> bool:
        return self.phase in (WorkerPhase.DOWNLOADING, WorkerPhase.WAITING, WorkerPhase.LOADING)

    @property
    def serving(self) -> bool:
        return self.phase == WorkerPhase.READY


@dataclass
class Failure:
    """Why a model may not (re)start now, and until when (`permanent`: not before its entry changes)."""

    fingerprint: str
    message: str
    permanent: bool
    attempts: int = 1
    retry_at: float = 0.0

    def blocks(self, fingerprint: str | None, now: float) -> bool:
        return self.fingerprint == fingerprint and (self.permanent or self.retry_at > now)


@dataclass(frozen=True)
class Backoff:
    """Exponential, capped: the one rule for how long a failed load or a crashed worker waits."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempts: int) -> float:
        return min(self.base * 2 ** (attempts - 1), self.cap)


@dataclass
class Ledger:
    events: EventLog
    clock: Callable[[], float] = time.time
    backoff: Backoff = field(default_factory=Backoff)
    entries: dict[str, WorkerEntry] = field(default_factory=dict)  # by entry key
    failures: dict[str, Failure] = field(default_factory=dict)  # by model
    on_gone: Callable[[], None] | None = None  # called when an entry leaves (a load waiting for memory wakes)
    # Per model, what its status shows of its history: unexpected exits, the last error, the last load time.
    restarts: collections.Counter = field(default_factory=collections.Counter)
    last_errors: dict[str, str] = field(default_factory=dict)
    last_load_seconds: dict[str, float | None] = field(default_factory=dict)

    # -- entries --------------------------------------------------------------------
    def begin_load(self, model: str, fingerprint: str, waiting_for: str, event: tuple[str, str] | None,
                   *, download: bool = False, planned_bytes: int = 0) -> WorkerEntry:
        """A load starts (DOWNLOADING if its files must be fetched first, else WAITING if `waiting_for`
        says why, else LOADING); `event` is (reason, message), None when the download records its own."""
        phase = WorkerPhase.WAITING if waiting_for else WorkerPhase.LOADING
        entry = WorkerEntry(model, fingerprint, WorkerPhase.DOWNLOADING if download else phase, Traffic(self.clock),
                            why=waiting_for, planned_bytes=planned_bytes)
        self.entries[entry.key] = entry
        if event is not None:
            self.events.record(model, *event)
        return entry

    def adopt(self, model: str, fingerprint: str, worker, message: str) -> WorkerEntry:
        """A worker of the previous run, kept as it is: it enters the ledger READY."""
        entry = WorkerEntry(model, fingerprint, WorkerPhase.READY, Traffic(self.clock))
        _take(entry, worker)
        self.entries[entry.key] = entry
        self.last_load_seconds[model] = entry.load_seconds
        self.events.record(model, "Adopted", message)
        return entry

    def move(self, entry: WorkerEntry, phase: WorkerPhase, event: tuple[str, str] | None = None,
             kind: str = "Normal", *, worker=None) -> None:
        """The one door for phase changes: validates, re-keys on READY, drops on GONE, records `event`."""
        if not is_valid_transition(entry.phase, phase):
            raise InvalidTransition(f"worker {entry.key} of {entry.model}: {entry.phase.value} -> {phase.value}")
        old_key = entry.key
        entry.phase = phase
        if worker is not None:
            _take(entry, worker)
            self.last_load_seconds[entry.model] = entry.load_seconds
        if phase in (WorkerPhase.LOADING, WorkerPhase.STOPPING):
            entry.why = ""
        if self.entries.get(old_key) is entry:
            del self.entries[old_key]
        if phase != WorkerPhase.GONE:
            self.entries[entry.key] = entry
        if event is not None:
            self.events.record(entry.model, *event, kind=kind)
        if phase == WorkerPhase.GONE and self.on_gone is not None:
            self.on_gone()

    def get(self, key: str) -> WorkerEntry | None:
        return self.entries.get(key)

    def __iter__(self) -> Iterator[WorkerEntry]:
        return iter(list(self.entries.values()))

    def of(self, model: str) -> list[WorkerEntry]:
        return [e for e in self.entries.values() if e.model == model]

    def processes(self) -> list[WorkerEntry]:
        """Entries with a process: serving, draining or stopping (they hold memory and are measured)."""
        return [e for e in self.entries.values() if e.worker_id is not None]

    def load_of(self, model: str) -> WorkerEntry | None:
        """The model's load in progress (one at most)."""
        return next((e for e in self.entries.values() if e.model == model and e.loading), None)

    def serving(self, model: str, besides: str | None = None) -> WorkerEntry | None:
        return next((e for e in self.entries.values()
                     if e.model == model and e.serving and e.worker_id != besides), None)

    def present(self, key: str) -> bool:
        """Whether a worker (or a load, by its `loading:` key) still holds memory."""
        return key in self.entries

    # -- failures -------------------------------------------------------------------
    def fail(self, model: str, fingerprint: str, message: str, *, permanent: bool) -> Failure:
        """A load failed: count the attempt and back off (not at all if it is permanent)."""
        previous = self.failures.get(model)
        attempts = previous.attempts + 1 if previous and previous.fingerprint == fingerprint else 1
        delay = 0.0 if permanent else self.backoff.delay(attempts)
        failure = Failure(fingerprint, message, permanent, attempts, self.clock() + delay)
        self.failures[model] = failure
        self.last_errors[model] = message
        self.events.record(model, "LoadFailed", message + ("" if permanent else f"; retrying in {delay:.0f}s"),
                           kind="Warning")
        return failure

    def crashed(self, model: str, fingerprint: str, returncode: int | None, uptime: float,
                stable_after: float) -> Failure:
        """A serving worker exited by itself: back off, reset once it had stayed up `stable_after`."""
        previous = self.failures.get(model)
        attempts = 1 if previous is None or uptime > stable_after else previous.attempts + 1
        delay = self.backoff.delay(attempts)
        message = f"worker exited unexpectedly with code {returncode}; restarting in {delay:.0f}s"
        if attempts > 1:
            message += f" (crash-looping: {attempts} crashes in a row)"
        failure = Failure(fingerprint, message, False, attempts, self.clock() + delay)
        self.failures[model] = failure
        self.restarts[model] += 1
        self.last_errors[model] = message
        self.events.record(model, "CrashLoopBackOff" if attempts > 1 else "WorkerExited", message, kind="Warning")
        return failure

    def blocked(self, fingerprints: dict[str, str], now: float) -> frozenset[str]:
        """Models that must not be (re)started now: backing off, or failed for this spec."""
        return frozenset(n for n, f in self.failures.items() if f.blocks(fingerprints.get(n), now))

    def forget_failures(self, keep: Callable[[str, Failure], bool]) -> None:
        for name in [n for n, f in self.failures.items() if not keep(n, f)]:
            del self.failures[name]
