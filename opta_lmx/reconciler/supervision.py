"""The supervised loop: run passes on every signal, survive a pass that raises, say when it ended.

A pass that raises, or overruns its deadline (`pass_timeout`: the watchdog), is logged with its traceback, recorded as a Warning event (ReconcileError),
counted, and retried after a short exponential backoff (capped, reset by the next good pass):
one bad pass never ends the loop (controller-runtime's habit). If the task ends anyway,
`health()` says so and why, and readiness fails.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import watchfiles

from opta_lmx.reconciler.ledger import Backoff
from opta_lmx.reconciler.view import LoopHealth
from opta_lmx.state.quantities import format_size

if TYPE_CHECKING:
    from opta_lmx.reconciler.controller import Reconciler

log = logging.getLogger(__name__)


class Supervisor:
    """Runs one reconciler's passes and its watchers; the loop's health lives here."""

    def __init__(self, rec: Reconciler, backoff: Backoff = Backoff(0.1, 5.0)):
        self.rec = rec
        self.backoff = backoff
        self.running = False
        self.pass_failures = 0
        self.failures_in_a_row = 0
        self.last_error: str | None = None
        self.task: asyncio.Task | None = None

    def health(self) -> LoopHealth:
        return LoopHealth(running=self.running, pass_failures=self.pass_failures, last_error=self.last_error)

    async def run(self) -> None:
        """Reconcile until stopped or cancelled: on file changes, nudges, and every resync interval."""
        rec = self.rec
        self.task = asyncio.current_task()
        self.running = True
        watchers = [asyncio.create_task(self._watch_file(), name="watch-models-yaml"),
                    asyncio.create_task(self._watch_memory(), name="watch-memory")]
        ended = "stopped"
        try:
            while not rec.stopping:
                delay = await self.guarded_pass(rec.reconcile_once)
                await self._sleep_until_woken(delay)
        except asyncio.CancelledError:
            ended = "cancelled"
            raise
        except BaseException as error:  # noqa: BLE001 - recorded, then re-raised
            ended = f"ended by {type(error).__name__}: {error}"
            raise
        finally:
            self.running = False
            if not rec.stopping:  # a shutdown sets `stopping` first; anything else is worth saying
                self.last_error = f"the control loop task {ended}"
                log.log(logging.WARNING if ended == "cancelled" else logging.ERROR,
                        "%s; nothing converges any more", self.last_error)
            for watcher in watchers:
                watcher.cancel()

    async def guarded_pass(self, one_pass: Callable[[], Awaitable[None]]) -> float:
        """Run one pass, bounded by the pass deadline (the watchdog: a pass stuck on an await would
        otherwise freeze the loop for good); an exception or an overrun becomes a log, an event and a
        count. Seconds to wait after it."""
        settings = self.rec.settings
        deadline = max(settings.pass_timeout, 3 * settings.stop_grace)  # an adoption stops leftovers within grace
        try:
            async with asyncio.timeout(deadline):
                await one_pass()
        except Exception as error:  # noqa: BLE001 - the loop must outlive any one pass
            self.pass_failures += 1
            self.failures_in_a_row += 1
            if isinstance(error, TimeoutError):
                self.last_error = f"PassTimeout: a reconcile pass did not finish within {deadline:.0f}s; cancelled"
            else:
                self.last_error = f"{type(error).__name__}: {error}"
            delay = self.backoff.delay(self.failures_in_a_row)
            log.error("reconcile pass failed; retrying in %.1fs\n%s", delay, traceback.format_exc())
            self.rec.events.record("loop", "ReconcileError", f"{self.last_error}; retrying in {delay:.1f}s",
                                   kind="Warning")
            return delay
        self.failures_in_a_row = 0
        return self.rec.settings.resync_interval

    async def _sleep_until_woken(self, delay: float) -> None:
        """Wait for a nudge or `delay`; after a failed pass, the whole backoff (nudges do not cut it).

        asyncio.timeout, not wait_for: a cancel that arrives here is never swallowed."""
        wake = self.rec.wake
        if self.failures_in_a_row:
            await asyncio.sleep(delay)
        else:
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()
            except TimeoutError:
                pass
        wake.clear()

    async def _watch_memory(self) -> None:
        """Nudge when the machine's free memory falls below the reserve (pressure), between resyncs."""
        rec = self.rec
        was_short = False
        while not rec.stopping:
            await asyncio.sleep(rec.settings.memory_check_interval)
            if rec.desired is None:
                continue
            try:
                _physical, available = rec.memory_probe()
            except Exception:  # noqa: BLE001 - a failed probe must not stop the loop
                log.exception("reading the machine's memory failed")
                continue
            reserve = rec.desired.memory.reserve_bytes()
            short = available < reserve
            if short and not was_short:
                log.warning("free memory %s is below the reserve %s", format_size(available), format_size(reserve))
            if short:
                rec.nudge()
            was_short = short

    async def _watch_file(self) -> None:
        """Nudge on any change to models.yaml, including replace-by-rename and symlink targets."""
        config_path = self.rec.config_path
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
                debounce=self.rec.settings.watch_debounce_ms,
                step=self.rec.settings.watch_step_ms,
                recursive=False,
            ):
                self.rec.nudge()
        except Exception:  # the periodic resync still converges without the watcher
            log.exception("watching %s failed; relying on periodic resync", config_path)

    async def stop(self, timeout: float) -> None:
        """Cancel the loop task (the caller has set `stopping` first) and wait for it, bounded."""
        task = self.task
        if task is None or task.done() or task is asyncio.current_task():
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.error("the control loop did not stop within %.0fs", timeout)
