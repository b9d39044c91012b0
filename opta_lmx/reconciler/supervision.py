"""The supervised loop: the one way a pass runs, on every signal; it survives a pass that raises.

A pass that raises, or overruns its deadline (the watchdog), is logged with its traceback,
recorded as a Warning event (ReconcileError), counted, and retried after a short exponential
backoff (capped, reset by the next good pass): one bad pass never ends the loop
(controller-runtime's habit). If the task ends anyway, `health()` says so and why, and readiness
fails. Whoever needs a pass now (an admin write that must answer with the generation its content
was accepted as) asks for one and awaits it (`request_pass`): it runs here, with the same watchdog,
events and counts as every other pass; no caller runs a pass of its own.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from opta_lmx.reconciler.ledger import Backoff
from opta_lmx.reconciler.view import LoopHealth
from opta_lmx.state.quantities import format_size
from opta_lmx.state.status import EventLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorSettings:
    resync_interval: float
    pass_timeout: float
    stop_grace: float
    watch_debounce_ms: int
    watch_step_ms: int
    memory_check_interval: float


class Supervisor:
    """Runs one loop's passes and its watchers; the loop's health lives here."""

    def __init__(self, run_pass: Callable[[], Awaitable[None]], settings: SupervisorSettings, events: EventLog, *,
                 config_path: Path, memory_probe: Callable[[], tuple[int, int]],
                 reserve: Callable[[], int | None], backoff: Backoff = Backoff(0.1, 5.0)):
        self.run_pass = run_pass
        self.settings = settings
        self.events = events
        self.config_path = config_path
        self.memory_probe = memory_probe
        self.reserve = reserve  # the reserve in force (None before a valid models.yaml)
        self.backoff = backoff
        self.wake = asyncio.Event()
        self.stopping = False
        self.running = False
        self.pass_failures = 0
        self.failures_in_a_row = 0
        self.last_error: str | None = None
        self.task: asyncio.Task | None = None
        self.started = 0  # passes begun...
        self.finished = 0  # ...and ended (well or not)
        self._finished = asyncio.Condition()
        self._lock = asyncio.Lock()

    def health(self) -> LoopHealth:
        return LoopHealth(running=self.running, pass_failures=self.pass_failures, last_error=self.last_error)

    def nudge(self) -> None:
        """Ask for a pass soon. Safe to call from any coroutine on the loop."""
        self.wake.set()

    async def request_pass(self, timeout: float) -> None:
        """Return once a pass that began after this call has ended (at most `timeout` s). The loop
        runs it; before the loop runs (or after it ended) it runs here, supervised the same way."""
        if self.task is None or self.task.done():
            await self.guarded_pass()
            return
        target = self.started + 1
        self.nudge()
        async with asyncio.timeout(timeout):
            async with self._finished:
                await self._finished.wait_for(lambda: self.finished >= target)

    async def run(self) -> None:
        """Reconcile until stopped or cancelled: on file changes, nudges, and every resync interval."""
        self.task = asyncio.current_task()
        self.running = True
        watchers = [asyncio.create_task(self._watch_file(), name="watch-models-yaml"),
                    asyncio.create_task(self._watch_memory(), name="watch-memory")]
        ended = "stopped"
        try:
            while not self.stopping:
                delay = await self.guarded_pass()
                await self._sleep_until_woken(delay)
        except asyncio.CancelledError:
            ended = "cancelled"
            raise
        except BaseException as error:  # noqa: BLE001 - recorded, then re-raised
            ended = f"ended by {type(error).__name__}: {error}"
            raise
        finally:
            self.running = False
            if not self.stopping:  # a shutdown sets `stopping` first; anything else is worth saying
                self.last_error = f"the control loop task {ended}"
                log.log(logging.WARNING if ended == "cancelled" else logging.ERROR,
                        "%s; nothing converges any more", self.last_error)
            for watcher in watchers:
                watcher.cancel()

    async def guarded_pass(self) -> float:
        """Run one pass, bounded by the pass deadline (the watchdog: a pass stuck on an await would
        otherwise freeze the loop for good); an exception or an overrun becomes a log, an event and a
        count. Seconds to wait after it."""
        deadline = max(self.settings.pass_timeout, 3 * self.settings.stop_grace)  # adoption stops leftovers
        async with self._lock:
            self.started += 1
            try:
                async with asyncio.timeout(deadline):
                    await self.run_pass()
            except Exception as error:  # noqa: BLE001 - the loop must outlive any one pass
                return self._failed(error, deadline)
            finally:
                self.finished += 1
                async with self._finished:
                    self._finished.notify_all()
        self.failures_in_a_row = 0
        return self.settings.resync_interval

    def _failed(self, error: Exception, deadline: float) -> float:
        self.pass_failures += 1
        self.failures_in_a_row += 1
        if isinstance(error, TimeoutError):
            self.last_error = f"PassTimeout: a reconcile pass did not finish within {deadline:.0f}s; cancelled"
        else:
            self.last_error = f"{type(error).__name__}: {error}"
        delay = self.backoff.delay(self.failures_in_a_row)
        log.error("reconcile pass failed; retrying in %.1fs\n%s", delay, traceback.format_exc())
        self.events.record("loop", "ReconcileError", f"{self.last_error}; retrying in {delay:.1f}s", kind="Warning")
        return delay

    async def _sleep_until_woken(self, delay: float) -> None:
        """Wait for a nudge or `delay`; after a failed pass, the whole backoff (nudges do not cut it).

        asyncio.timeout, not wait_for: a cancel that arrives here is never swallowed."""
        if self.failures_in_a_row:
            await asyncio.sleep(delay)
        else:
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass
        self.wake.clear()

    async def _watch_memory(self) -> None:
        """Nudge when the machine's free memory falls below the reserve (pressure), between resyncs."""
        was_short = False
        while not self.stopping:
            await asyncio.sleep(self.settings.memory_check_interval)
            reserve = self.reserve()
            if reserve is None:
                continue
            try:
                _physical, available = self.memory_probe()
            except Exception:  # noqa: BLE001 - a failed probe must not stop the loop
                log.exception("reading the machine's memory failed")
                continue
            short = available < reserve
            if short and not was_short:
                log.warning("free memory %s is below the reserve %s", format_size(available), format_size(reserve))
            if short:
                self.nudge()
            was_short = short

    async def _watch_file(self) -> None:
        """Nudge on any change to models.yaml, including replace-by-rename and symlink targets."""
        config_path = self.config_path
        watched = {config_path.parent.resolve()}
        names = {config_path.name}
        if config_path.is_symlink():
            target = config_path.resolve()
            watched.add(target.parent)
            names.add(target.name)
        try:
            async for _changes in watchfiles.awatch(
                *watched,
                watch_filter=lambda _change, path: Path(path).name in names,
                debounce=self.settings.watch_debounce_ms,
                step=self.settings.watch_step_ms,
                recursive=False,
            ):
                self.nudge()
        except Exception:  # the periodic resync still converges without the watcher
            log.exception("watching %s failed; relying on periodic resync", config_path)

    async def stop(self, timeout: float) -> None:
        """Cancel the loop task (after `stopping` is set, so no other pass starts) and wait for it, bounded."""
        self.stopping = True
        self.wake.set()
        task = self.task
        if task is None or task.done() or task is asyncio.current_task():
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.error("the control loop did not stop within %.0fs", timeout)
