"""Hub models: whether a source needs downloading, its file sizes, and the download itself.

The download is huggingface_hub's own `snapshot_download` (resumable, cache-aware, shared with
every other Hugging Face tool), watched through its `tqdm_class` hook so that the control plane
can show bytes done, bytes total and rate. Errors come out classified: a repo that does not exist
or is private/gated is permanent (retrying will not help); a dropped or refused connection is
temporary. A connection cut mid-file is resumed inside huggingface_hub with an HTTP Range request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine.memory import MemoryEstimate, estimate_from_listing
from opta_lmx.state.spec import EngineOptions

# The snapshot bar that counts bytes written to disk for every file (huggingface_hub >= 2.4).
_BYTES_BAR = "huggingface_hub.snapshot_download"
RATE_WINDOW_S = 5.0  # the rate is measured over this trailing window
CANCEL_WAIT_S = 60.0  # how long a cancelled download may take to notice and close its files


@dataclass(frozen=True)
class DownloadProgress:
    """How far one download is: bytes on disk (cached files included) of bytes in the repo."""

    repo_id: str
    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: float  # over the last RATE_WINDOW_S seconds
    finished: bool = False


ProgressCallback = Callable[[DownloadProgress], None]


class DownloadError(Exception):
    """A download that did not complete; `permanent` says whether retrying can help."""

    permanent = False

    def __init__(self, repo_id: str, message: str):
        super().__init__(message)
        self.repo_id = repo_id
        self.message = message


class PermanentDownloadError(DownloadError):
    """The repo does not exist, is private or gated, or the revision is unknown: do not retry."""

    permanent = True


class TemporaryDownloadError(DownloadError):
    """The hub could not be reached or the connection broke for good: retry with backoff."""


class DownloadCancelled(DownloadError):
    """The caller asked the download to stop (the model left models.yaml, the server stops)."""


@dataclass(frozen=True)
class RepoListing:
    """The files of a repo at one commit, as the hub lists them (before anything is downloaded)."""

    repo_id: str
    commit: str
    sizes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def hub_repo_id(source: str) -> str | None:
    """`source` as a hub repo id (`owner/name`), or None when it is a local path.

    The same rule as the control loop's: a path starts with `/`, `./`, `../` or `~`.
    """
    if source.startswith(("/", ".", "~")):
        return None
    if source.count("/") != 1 or not all(source.split("/")):
        return None
    return source


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids talking to the hub."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def cached_snapshot(source: str, *, cache_dir: str | Path | None = None) -> Path | None:
    """The complete local snapshot of a hub id, or None (not cached, or only partly)."""
    repo_id = hub_repo_id(source)
    if repo_id is None:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - any failure here means "not usable from the cache"
        return None


def needs_download(source: str, *, cache_dir: str | Path | None = None) -> bool:
    """True when `source` is a hub id missing from the local cache and the hub may be used."""
    return hub_repo_id(source) is not None and not offline() and cached_snapshot(source, cache_dir=cache_dir) is None


def repo_listing(source: str, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None) -> RepoListing:
    """The repo's files and sizes from the hub's API (two small requests, no file is fetched)."""
    repo_id = _require_hub_id(source)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    with classified(repo_id):
        info = api.model_info(repo_id, revision=revision)
        commit = info.sha or revision or "main"
        sizes = {entry.path: int(entry.size or 0)
                 for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                 if isinstance(entry, RepoFile)}
    return RepoListing(repo_id, commit, sizes)


def hub_estimate(source: str, engine: EngineOptions, override_bytes: int | None = None, *,
                 endpoint: str | None = None, cache_dir: str | Path | None = None,
                 token: str | bool | None = None) -> MemoryEstimate:
    """The memory estimate of a hub model before its weights are downloaded.

    Weights come from the hub's listing; the KV-cache allowance needs config.json, which is
    fetched alone into the hub cache (a few kB, and the later download reuses it).
    """
    if override_bytes is not None:
        return MemoryEstimate(override_bytes=override_bytes)
    listing = repo_listing(source, endpoint=endpoint, token=token)
    config: dict = {}
    if "config.json" in listing.sizes:
        from huggingface_hub import hf_hub_download

        with classified(listing.repo_id):
            path = hf_hub_download(listing.repo_id, "config.json", revision=listing.commit, endpoint=endpoint,
                                   cache_dir=cache_dir, token=token)
        with contextlib.suppress(OSError, ValueError):
            config = json.loads(Path(path).read_text())
    return estimate_from_listing(listing.sizes, config if isinstance(config, dict) else {}, engine)


class ProgressTracker:
    """Adds up bytes reported by huggingface_hub's threads and reports them, throttled."""

    def __init__(self, repo_id: str, total_bytes: int, done_bytes: int, on_progress: ProgressCallback | None, *,
                 interval: float, cancel: threading.Event | None, clock: Callable[[], float] = time.monotonic):
        self.repo_id = repo_id
        self.total_bytes = total_bytes
        self.done_bytes = done_bytes
        self._on_progress = on_progress
        self._interval = interval
        self._cancel = cancel
        self._clock = clock
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()  # one callback at a time, whichever thread reports
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._last_report = -float("inf")

    def add(self, n: int) -> None:
        """Count `n` bytes (negative when huggingface_hub restarts a file the server would not resume)."""
        if self._cancel is not None and self._cancel.is_set():
            raise DownloadCancelled(self.repo_id, f"the download of {self.repo_id} was cancelled")
        with self._lock:
            self.done_bytes += n
            now = self._clock()
            due = now - self._last_report >= self._interval
            if due:
                self._last_report = now
        if due:
            self.report()

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._samples.append((now, self.done_bytes))
            while len(self._samples) > 1 and now - self._samples[0][0] > RATE_WINDOW_S:
                self._samples.popleft()
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def report(self, finished: bool = False) -> DownloadProgress:
        done = min(self.done_bytes, self.total_bytes) if finished else self.done_bytes
        progress = DownloadProgress(self.repo_id, done, self.total_bytes, self.rate(), finished)
        if self._on_progress is not None:
            with self._report_lock:
                self._on_progress(progress)
        return progress


def _bar_class(tracker: ProgressTracker):
    """A silent tqdm for snapshot_download that forwards the byte counts to `tracker`."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class ProgressBar(hf_tqdm):
        def __init__(self, *args, **kwargs):
            self._counts_bytes = kwargs.get("name") == _BYTES_BAR
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._counts_bytes and n:
                tracker.add(int(n))
            return super().update(n)

    return ProgressBar


def download(source: str, on_progress: ProgressCallback | None = None, *, revision: str | None = None,
             endpoint: str | None = None, cache_dir: str | Path | None = None, token: str | bool | None = None,
             cancel: threading.Event | None = None, interval: float = 0.5, max_workers: int = 4) -> Path:
    """Download a hub model into the hub cache and return its snapshot directory.

    Blocking (run it in a thread). `on_progress` is called from huggingface_hub's threads at
    most every `interval` seconds and once more at the end. Files already cached count as done
    and are not fetched again. Raises PermanentDownloadError, TemporaryDownloadError or
    DownloadCancelled (once `cancel` is set, at the next chunk).
    """
    repo_id = _require_hub_id(source)
    if offline():
        raise PermanentDownloadError(repo_id, f"{repo_id} is not in the local model cache and HF_HUB_OFFLINE is set")
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    listing = repo_listing(repo_id, revision=revision, endpoint=endpoint, token=token)
    cached = sum(size for path, size in listing.sizes.items() if isinstance(
        try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=listing.commit), str))
    tracker = ProgressTracker(repo_id, listing.total_bytes, cached, on_progress, interval=interval, cancel=cancel)
    tracker.report()
    with classified(repo_id):
        path = snapshot_download(repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir, token=token,
                                 tqdm_class=_bar_class(tracker), max_workers=max_workers)
    tracker.done_bytes = max(tracker.done_bytes, listing.total_bytes)
    tracker.report(finished=True)
    return Path(path)


async def download_async(source: str, on_progress: ProgressCallback | None = None, **options) -> Path:
    """`download` in a thread; `on_progress` runs on the event loop; cancelling the task stops the download."""
    loop = asyncio.get_running_loop()
    cancel = threading.Event()

    def hop(progress: DownloadProgress) -> None:
        if on_progress is not None and not loop.is_closed():
            loop.call_soon_threadsafe(on_progress, progress)

    task = asyncio.ensure_future(asyncio.to_thread(download, source, hop, cancel=cancel, **options))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()  # the thread stops at its next chunk; wait (bounded) so no file is left open
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, CANCEL_WAIT_S)
        raise


def _require_hub_id(source: str) -> str:
    repo_id = hub_repo_id(source)
    if repo_id is None:
        raise PermanentDownloadError(source, f"{source!r} is a local path, not a model hub id (owner/name)")
    return repo_id


@contextlib.contextmanager
def classified(repo_id: str):
    """Turn huggingface_hub's and the network's exceptions into Permanent/TemporaryDownloadError."""
    try:
        yield
    except DownloadError:
        raise
    except Exception as error:  # noqa: BLE001 - every failure gets a class and a clear message
        raise classify(repo_id, error) from error


def classify(repo_id: str, error: BaseException) -> DownloadError:
    """Permanent for a missing, private, gated or disabled repo (401/403/404); temporary otherwise."""
    from huggingface_hub.errors import (
        DisabledRepoError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    for cause in chain:
        if isinstance(cause, GatedRepoError):
            return PermanentDownloadError(repo_id, f"{repo_id} is a gated repo: accept its terms on the hub and "
                                                   "log in (HF_TOKEN or `hf auth login`)")
        if isinstance(cause, RepositoryNotFoundError):
            return PermanentDownloadError(repo_id, f"{repo_id} was not found on the hub (it does not exist, or it "
                                                   "is private and no token with access is set)")
        if isinstance(cause, RevisionNotFoundError):
            return PermanentDownloadError(repo_id, f"{repo_id}: the revision was not found on the hub")
        if isinstance(cause, DisabledRepoError):
            return PermanentDownloadError(repo_id, f"{repo_id} has been disabled on the hub")
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            if status in (401, 403, 404):
                return PermanentDownloadError(repo_id, f"{repo_id}: the hub refused access ({status})")
            return TemporaryDownloadError(repo_id, f"{repo_id}: the hub answered {status}; will retry")
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28:
        return TemporaryDownloadError(repo_id, f"{repo_id}: no space left on the disk holding the hub cache")
    return TemporaryDownloadError(repo_id, f"{repo_id}: the download did not complete "
                                           f"({type(error).__name__}: {error}); will retry")
