"""The loop's downloads, each in a process of its own, and the hub's small calls in threads of their own.

`download_async` runs engine/download_main.py (huggingface_hub's download, guarded: download.py)
at most DOWNLOAD_SLOTS at once, and reads its progress as JSON lines; cancelling it (the model left
models.yaml, the server stops) sends SIGTERM (it stops at its next chunk and huggingface_hub
removes its partial file), then SIGKILL: it is gone within a second whatever the hub does, and no
thread the control loop or the admin API needs is ever held by a download (issue 22). The hub's
small calls (listings, sizes, cache checks) run in `hub_call`'s two threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opta_lmx.engine.download import (
    DownloadCancelled,
    DownloadError,
    DownloadProgress,
    PermanentDownloadError,
    ProgressCallback,
    TemporaryDownloadError,
)

STOP_GRACE_S = 0.7  # a cancelled download process gets this long to stop cleanly, then SIGKILL...
CANCEL_WAIT_S = 5.0  # ...after which it may take this long to be gone
DOWNLOAD_SLOTS = 2  # downloads at once (each in its own process); more wait for a slot
# The hub's small calls (listings, sizes, cache checks): a pool of their own, so that a slow hub
# never takes a thread from the default pool that reads models.yaml and answers the admin API.
_HUB_CALLS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lmx-hub")


def hub_call(fn: Callable, *args, **kwargs):
    """Run a blocking hub call (listing, sizing, cache check) in the hub's own threads."""
    return asyncio.get_running_loop().run_in_executor(_HUB_CALLS, functools.partial(fn, *args, **kwargs))


_slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


async def download_async(source: str, on_progress: ProgressCallback | None = None, *,
                         revision: str | None = None, endpoint: str | None = None,
                         cache_dir: str | Path | None = None, token: str | bool | None = None,
                         interval: float = 0.5, chunk_bytes: int = 1024**2) -> Path:
    """`download` in a process of its own (engine/download_main.py), at most DOWNLOAD_SLOTS at once;
    `on_progress` runs on the event loop. Cancelling the task kills that process at once (its
    partial files stay: the next attempt resumes them); the error classes are `download`'s."""
    loop = asyncio.get_running_loop()
    slots = _slots.setdefault(loop, asyncio.Semaphore(DOWNLOAD_SLOTS))
    async with slots:
        command = [sys.executable, "-m", "opta_lmx.engine.download_main", source, "--interval", str(interval),
                   "--chunk-bytes", str(chunk_bytes)]
        for flag, value in (("--revision", revision), ("--endpoint", endpoint), ("--cache-dir", cache_dir)):
            if value is not None:
                command += [flag, str(value)]
        if token is False:
            command.append("--no-token")
        env = dict(os.environ)
        if isinstance(token, str):
            env["HF_TOKEN"] = token  # never on a command line
        proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        try:
            return await _follow(proc, source, on_progress)
        except BaseException:
            await asyncio.shield(_stop(proc))
            raise


async def _follow(proc: asyncio.subprocess.Process, source: str, on_progress: ProgressCallback | None) -> Path:
    """Read the download process's JSON lines: progress, then its result or its classified error."""
    assert proc.stdout is not None
    result: dict = {}
    while line := await proc.stdout.readline():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "progress" in message and on_progress is not None:
            on_progress(DownloadProgress(**message["progress"]))
        elif "path" in message or "error" in message:
            result = message
    await proc.wait()
    if "path" in result:
        return Path(result["path"])
    kinds: dict[str, type[DownloadError]] = {"permanent": PermanentDownloadError, "cancelled": DownloadCancelled}
    kind = kinds.get(str(result.get("kind")), TemporaryDownloadError)
    raise kind(source, result.get("error") or f"the download process of {source} exited with {proc.returncode}")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (it stops at its next chunk and huggingface_hub removes its partial file), then,
    if it is still there after STOP_GRACE_S, SIGKILL: a cancelled download is gone within a second."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, CANCEL_WAIT_S)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            async with asyncio.timeout(wait):
                await proc.wait()
            return
        except TimeoutError:
            continue
