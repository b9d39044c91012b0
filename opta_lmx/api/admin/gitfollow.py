"""Following models.yaml's git remote (docs/fleet.md): a sync every interval and on demand,
off the event loop, each outcome an event; `GET /admin/git`, `POST /admin/git/sync`."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Request

from opta_lmx.api.errors import APIError
from opta_lmx.state.gitsync import GitFollower, GitSyncError, SyncResult
from opta_lmx.state.status import EventLog

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin")


class GitFollow:
    """Runs `follower.sync` every `interval` seconds and when asked, one at a time, in its own
    thread (git may wait on a slow remote for up to a minute: never on the loop that relays tokens)."""

    def __init__(self, follower: GitFollower, events: EventLog, nudge, interval: float = 30.0):
        self.follower, self.events, self.nudge, self.interval = follower, events, nudge, interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="git-follow")
        self._wake = asyncio.Event()
        self._last_error: str | None = None
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except GitSyncError:
                pass  # said as an event; the next sync tries again
            except Exception:
                log.exception("git sync failed")
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def sync(self) -> SyncResult:
        async with self._lock:
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._executor, self.follower.sync)
            except GitSyncError as error:
                if str(error) != self._last_error:
                    self.events.record("config", "GitSyncFailed", str(error), kind="Warning")
                self._last_error = str(error)
                raise
            if self._last_error is not None:
                self.events.record("config", "GitSyncRecovered", f"following {self.follower.remote} again")
            self._last_error = None
        remote = f"{self.follower.remote}/{self.follower.branch}"
        if result.applied:
            self.events.record("config", "GitApplied", f"fast-forwarded to {remote} at {result.applied[:12]}")
            self.nudge()
        if result.refused:
            refused = result.refused
            self.events.record("config", "GitRefused", f"commit {refused.commit[:12]} ({refused.subject}) on {remote} "
                               f"does not validate; keeping the last good state: {'; '.join(refused.problems[:3])}",
                               kind="Warning")
        if result.pushed:
            self.events.record("config", "GitPushed", f"pushed {result.pushed[:12]} to {remote}")
        return result

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _follow(request: Request) -> GitFollow:
    follow = getattr(request.app.state, "git_follow", None)
    if follow is None:
        raise APIError(404, "this server does not follow a git remote (lmx serve --git-follow REMOTE)", "not_found")
    return follow


@router.get("/git")
async def git_state(request: Request) -> dict:
    """The remote followed, the heads, the last sync and a refused commit (if any)."""
    return _follow(request).follower.state.to_dict()


@router.post("/git/sync")
async def git_sync(request: Request) -> dict:
    """Fetch now; fast-forward if the remote's head validates. Answers what happened."""
    follow = _follow(request)
    try:
        result = await follow.sync()
    except GitSyncError as error:
        raise APIError(502, f"git sync failed: {error}", "git_failed") from None
    return {"applied": result.applied, "pushed": result.pushed,
            "refused": result.refused.to_dict() if result.refused else None,
            "state": follow.follower.state.to_dict()}
