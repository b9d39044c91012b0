"""Hub models as their own phase: each model's download, its progress and events, and the hub's
file sizes for the memory estimate, all off the event loop.

A desired model whose source is a hub id is first sized from the hub's listing (in a thread, once
per spec), so the planner can refuse it before anything is fetched; while that runs the model is
held back like a model in backoff. A load of a model not in the local cache downloads it first
(`Downloading`), and only then starts the worker, so the readiness deadline never covers the
download. One download per model, owned here rather than by the load: a load cancelled because
only the engine options changed leaves the download running for the next load; removing the
model, setting it `unloaded`, or changing its source cancels it (`keep`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from opta_lmx.engine import download as hub
from opta_lmx.engine import download_process
from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.download import DownloadError, DownloadProgress, PermanentDownloadError
from opta_lmx.engine.memory import MemoryEstimate, ModelDirectoryError
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import EngineOptions
from opta_lmx.state.status import DownloadStatus, EventLog

log = logging.getLogger(__name__)

EVENT_STEP = 0.10  # a progress event each time another 10% is done...
EVENT_MIN_INTERVAL_S = 5.0  # ...but not more often than this


@dataclass(frozen=True)
class HubSize:
    """What sizing a hub model found: its estimate, and whether the files still have to be fetched."""

    estimate: MemoryEstimate
    needs_download: bool


def size_from_hub(source: str, engine: EngineOptions, override: int | None) -> HubSize:
    """Blocking (run in a thread): the estimate from the cache if the model is there, else from the hub."""
    if hub.cached_snapshot(source) is not None:
        return HubSize(engine_memory.estimate(source, engine, override), False)
    if hub.offline():
        raise PermanentDownloadError(source, f"{source} is not in the local model cache and HF_HUB_OFFLINE is set")
    return HubSize(hub.hub_estimate(source, engine, override), True)


@dataclass(frozen=True)
class HubClient:
    """The three things the loop asks of the hub; tests pass fakes."""

    size: Callable[[str, EngineOptions, int | None], HubSize] = size_from_hub  # blocking
    needs_download: Callable[[str], bool] = hub.needs_download  # blocking
    fetch: Callable[[str, Callable[[DownloadProgress], None]], Awaitable[Path]] = download_process.download_async


@dataclass
class Sizing:
    """One spec's size from the hub: running, done, or failed (then retried after `retry_at`)."""

    names: set[str]
    fingerprint: str
    task: asyncio.Task | None = None
    result: HubSize | None = None
    error: DownloadError | None = None
    retry_at: float = 0.0


@dataclass
class Download:
    """One model's download in progress."""

    model: str
    source: str
    started_at: float
    task: asyncio.Task | None = None
    progress: DownloadProgress | None = None
    next_step: float = EVENT_STEP  # the fraction done at which the next progress event is due
    last_event_at: float = 0.0
    announced: bool = False


def progress_event_due(d: Download, progress: DownloadProgress, now: float) -> bool:
    """Whether `progress` deserves an event: another 10% done, and 5 s since the last one."""
    if progress.finished or progress.total_bytes <= 0:
        return False
    return progress.done_bytes / progress.total_bytes >= d.next_step and now - d.last_event_at >= EVENT_MIN_INTERVAL_S


def describe(progress: DownloadProgress | None) -> str:
    """`6.8 GiB of 16.5 GiB (41%) at 54.6 MiB/s` (the status message while downloading)."""
    if progress is None:
        return "listing the repo's files"
    percent = 100 * progress.done_bytes / progress.total_bytes if progress.total_bytes else 0.0
    text = f"{format_size(progress.done_bytes)} of {format_size(progress.total_bytes)} ({percent:.0f}%)"
    return text + (f" at {format_size(progress.rate_bytes_per_s)}/s" if progress.rate_bytes_per_s > 0 else "")


@dataclass
class Downloads:
    """The loop's downloads and hub sizes. `fail` is the loop's one way to record a model's failure."""

    events: EventLog
    nudge: Callable[[], None]
    fail: Callable[[str, str, str, bool], float]  # (model, fingerprint, message, permanent) -> retry_at
    clock: Callable[[], float] = time.time
    client: HubClient = field(default_factory=HubClient)
    on_progress: Callable[[str], None] = lambda _model: None  # the status shows progress between passes
    sizes: dict[str, Sizing] = field(default_factory=dict)  # by accounting key (fingerprint[:override])
    active: dict[str, Download] = field(default_factory=dict)  # by model
    _needs: dict[str, bool] = field(default_factory=dict)  # by source: sizing's (or a download's) finding

    # -- sizes --------------------------------------------------------------------------
    @staticmethod
    def covers(source: str) -> bool:
        """Hub ids are sized from the hub (or the cache) off the loop; local paths are not ours."""
        return hub.hub_repo_id(source) is not None

    def estimate(self, key: str, spec: WorkerSpec, override: int | None) -> MemoryEstimate | None:
        """The hub estimate of `spec`, or None while it is being read (a thread is started if needed)."""
        sizing = self.sizes.get(key)
        if sizing is None:
            sizing = self.sizes[key] = Sizing({spec.name}, spec.fingerprint)
        sizing.names.add(spec.name)
        if sizing.result is not None:
            return sizing.result.estimate
        if sizing.task is None and self.clock() >= sizing.retry_at:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # asked from a thread (not the loop's): the next pass starts it
                return None
            sizing.error = None
            sizing.task = loop.create_task(self._size(sizing, spec, override))
        return None

    async def _size(self, sizing: Sizing, spec: WorkerSpec, override: int | None) -> None:
        try:
            sizing.result = await download_process.hub_call(self.client.size, spec.source, spec.engine, override)  # the hub's threads
            self._needs[spec.source] = sizing.result.needs_download
        except DownloadError as error:
            sizing.error = error
        except ModelDirectoryError as error:  # the cached snapshot cannot be read as a model
            sizing.error = PermanentDownloadError(spec.source, f"cannot use the cached {spec.source}: {error}")
        except Exception as error:  # noqa: BLE001 - an unexpected failure backs off like a temporary one
            log.exception("sizing %s raised", spec.source)
            sizing.error = hub.TemporaryDownloadError(spec.source, f"{type(error).__name__}: {error}")
        finally:
            sizing.task = None
        if sizing.error is not None:
            message = f"reading the size of {spec.source} from the hub failed: {sizing.error.message}"
            for name in sorted(sizing.names):
                retry_at = self.fail(name, sizing.fingerprint, message, sizing.error.permanent)
            sizing.retry_at = math.inf if sizing.error.permanent else retry_at  # permanent: until the entry changes
        self.nudge()

    def sizing(self) -> frozenset[str]:
        """Models held back because their size is still being read from the hub."""
        return frozenset(n for s in self.sizes.values() if s.result is None and s.error is None for n in s.names)

    # -- downloads ----------------------------------------------------------------------
    def will_download(self, source: str) -> bool:
        """Whether a load of `source` begins with a download (as sizing found it; the load checks again)."""
        return self.covers(source) and self._needs.get(source, False)

    async def fetch(self, model: str, source: str) -> None:
        """Make `source` local for `model`: join its download, or start one. Raises DownloadError."""
        current = self.active.get(model)
        if current is None or current.source != source:
            if current is not None and current.task is not None:
                current.task.cancel()
            current = Download(model, source, self.clock())
            current.task = asyncio.get_running_loop().create_task(self._download(current), name=f"download:{model}")
            self.active[model] = current
        assert current.task is not None
        await asyncio.shield(current.task)  # a cancelled load leaves the download to `keep`

    async def _download(self, d: Download) -> None:
        try:
            if not await download_process.hub_call(self.client.needs_download, d.source):
                return  # fetched meanwhile (`lmx pull`, another model of the same repo)
            await self.client.fetch(d.source, lambda progress: self._progress(d, progress))
            seconds = self.clock() - d.started_at
            total = d.progress.total_bytes if d.progress else 0
            self.events.record(d.model, "Downloaded", f"{d.source}: {format_size(total)} in {seconds:.1f}s")
            self._needs[d.source] = False
        except asyncio.CancelledError:
            self.events.record(d.model, "DownloadCancelled", f"{d.source}: stopped at {describe(d.progress)}; the "
                               "files already complete stay in the hub cache")
            raise
        except DownloadError as error:
            self.events.record(d.model, "DownloadFailed", error.message, kind="Warning")
            raise
        finally:
            if self.active.get(d.model) is d:
                del self.active[d.model]
                self.on_progress(d.model)

    def _progress(self, d: Download, progress: DownloadProgress) -> None:
        """Keep the latest figures; record the start, and every 10% (at most every 5 s)."""
        now = self.clock()
        d.progress = progress
        self.on_progress(d.model)
        if not d.announced:
            d.announced, d.last_event_at = True, now
            cached = f" ({format_size(progress.done_bytes)} already in the cache)" if progress.done_bytes else ""
            self.events.record(d.model, "Downloading",
                               f"downloading {d.source} from the hub: {format_size(progress.total_bytes)}{cached}")
            d.next_step = (progress.done_bytes / progress.total_bytes if progress.total_bytes else 0) + EVENT_STEP
        elif progress_event_due(d, progress, now):
            d.last_event_at = now
            d.next_step = progress.done_bytes / progress.total_bytes + EVENT_STEP
            self.events.record(d.model, "DownloadProgress", f"{d.source}: {describe(progress)}")

    def status_of(self, model: str) -> DownloadStatus | None:
        """The `download` block of a model's status while it downloads."""
        d = self.active.get(model)
        if d is None:
            return None
        p = d.progress
        return DownloadStatus(repo_id=d.source, done_bytes=p.done_bytes if p else 0,
                              total_bytes=p.total_bytes if p else None,
                              rate_bytes_per_s=p.rate_bytes_per_s if p else 0.0, started_at=d.started_at)

    def message(self, model: str, source: str) -> str:
        d = self.active.get(model)
        return f"downloading {source}: {describe(d.progress if d else None)}"

    def keep(self, wanted: Mapping[str, str]) -> None:
        """Cancel the downloads of models no longer wanted (`wanted`: model -> source)."""
        for name, d in list(self.active.items()):
            if wanted.get(name) != d.source and d.task is not None and not d.task.done():
                d.task.cancel()

    def busy(self) -> bool:
        return bool(self.active)

    async def cancel_all(self, timeout: float) -> None:
        """Stop every download and sizing (shutdown), waiting at most `timeout` for them to notice."""
        tasks = [d.task for d in self.active.values() if d.task] + [s.task for s in self.sizes.values() if s.task]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
