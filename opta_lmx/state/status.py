"""Observed status: what the control loop saw and did, kept apart from the spec."""

from __future__ import annotations

import collections
import enum
import itertools
import threading
import time
from typing import Any

from pydantic import BaseModel, Field


class Phase(str, enum.Enum):
    PENDING = "Pending"
    DOWNLOADING = "Downloading"  # a hub model's files are being fetched before its worker starts
    LOADING = "Loading"
    READY = "Ready"
    DRAINING = "Draining"
    UNLOADING = "Unloading"
    UNLOADED = "Unloaded"
    FAILED = "Failed"
    UNSCHEDULABLE = "Unschedulable"


class Condition(BaseModel):
    """A Kubernetes-shaped condition: one fact about a model, with why and since when."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    last_transition_time: float
    observed_generation: int


class DownloadStatus(BaseModel):
    """How far a model's download from the hub is (present only while it downloads)."""

    repo_id: str
    done_bytes: int = 0  # files already in the cache count as done
    total_bytes: int | None = None  # None until the hub has listed the repo's files
    rate_bytes_per_s: float = 0.0  # over the last few seconds
    started_at: float


class PrefixCacheStatus(BaseModel):
    """A model's kept prefix cache (docs/reconciler.md, "Kept prefix caches")."""

    key: str  # what makes it valid: the weights and the KV-affecting engine options
    size_bytes: int
    entries: int
    age_seconds: float  # since a worker last held it
    in_use: bool  # a running worker holds it


class ModelStatus(BaseModel):
    phase: Phase = Phase.PENDING
    pid: int | None = None
    address: str | None = None
    started_at: float | None = None
    load_seconds: float | None = None
    estimated_bytes: int | None = None  # what it is planned at before it runs (for the way it would start now)
    measured_bytes: int | None = None  # what its serving worker was last measured at
    counted_bytes: int | None = None  # what the plan counts for it now (docs/reconciler.md, "Memory accounting")
    download: DownloadStatus | None = None
    prefix_cache: PrefixCacheStatus | None = None  # its kept prefix cache, when it has one on disk
    host: str | None = None  # in a fleet: the host it runs on (docs/fleet.md)
    placement: str | None = None  # in a fleet: why there
    restarts: int = 0
    last_error: str | None = None
    reason: str | None = None
    message: str | None = None
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)

    def set_condition(
        self, type_: str, status: bool, reason: str, message: str, generation: int, now: float
    ) -> None:
        """Set a condition, keeping its transition time when its status did not change."""
        value = "True" if status else "False"
        for index, condition in enumerate(self.conditions):
            if condition.type == type_:
                since = condition.last_transition_time if condition.status == value else now
                self.conditions[index] = Condition(
                    type=type_, status=value, reason=reason, message=message,
                    last_transition_time=since, observed_generation=generation,
                )
                return
        self.conditions.append(
            Condition(type=type_, status=value, reason=reason, message=message,
                      last_transition_time=now, observed_generation=generation)
        )


class ConfigStatus(BaseModel):
    """Whether the last read of models.yaml was accepted."""

    path: str
    valid: bool = True
    error: dict[str, Any] | None = None
    last_good_etag: str | None = None
    checked_at: float | None = None


class Event(BaseModel):
    seq: int
    time: float
    kind: str  # "Normal" | "Warning"
    object: str  # model name, or "config"
    reason: str
    message: str


class EventLog:
    """A bounded ring of events, numbered so a reader can ask for what is new."""

    def __init__(self, capacity: int = 1000, clock=time.time):
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._clock = clock
        self._listeners: list[Any] = []

    def record(self, object_: str, reason: str, message: str, kind: str = "Normal") -> Event:
        with self._lock:
            event = Event(seq=next(self._seq), time=self._clock(), kind=kind,
                          object=object_, reason=reason, message=message)
            self._events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        return event

    def since(self, seq: int = 0, limit: int | None = None) -> list[Event]:
        with self._lock:
            events = [e for e in self._events if e.seq > seq]
        return events[-limit:] if limit else events

    def subscribe(self, listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
