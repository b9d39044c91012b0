"""Hub models: whether a source needs downloading, its file sizes, and the download itself.

The download is huggingface_hub's own `snapshot_download` (resumable, cache-aware, shared with
every other Hugging Face tool), watched through its `tqdm_class` hook so that the control plane
can show bytes done, bytes total and rate. Errors come out classified: a repo that does not exist
or is private/gated is permanent (retrying will not help); a dropped or refused connection is
temporary. A connection cut mid-file is resumed inside huggingface_hub with an HTTP Range request.

The hub's answers are data, never paths (issue 22): huggingface_hub makes path parts of a
file's ETag and the commit hash, so every answer it acts on is checked first (`guard_hub_answers`:
plain names only), the listing's file names too, only the files the engine reads are fetched
(top-level files, no other weight formats), the bytes written may not exceed what the hub
declared, there must be room on the disk first, and every file of the snapshot must lie inside
the cache once it is there. The loop runs each download in a process of its own and the hub's
small calls in threads of their own (engine/download_process.py).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import re
import shutil
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
DISK_MARGIN_BYTES = 1024**3  # left free on the cache's disk beyond what a download needs
OVERRUN_BYTES = 1024**2  # a hub may send this much more than it declared before the download is cut
# Files the engine does not read (other weight formats, archives): never fetched.
SKIPPED_SUFFIXES = (".gguf", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".tflite",
                    ".zip", ".tar", ".gz", ".mlmodel", ".npz", ".pkl", ".pickle")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")


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


class HostileHubAnswer(PermanentDownloadError):
    """The hub answered something that would be a path, or more than it declared: refused."""


def plain_name(value: object) -> bool:
    """A name that is nothing but a name: no separator, no `..`, no control character."""
    return isinstance(value, str) and bool(_PLAIN_NAME.fullmatch(value)) and ".." not in value


def safe_relative_path(value: object) -> bool:
    """A file path inside a repo: plain names separated by `/` (no absolute path, no `..`)."""
    return isinstance(value, str) and bool(value) and all(plain_name(part) for part in value.split("/"))


_guard_lock = threading.Lock()


def guard_hub_answers() -> None:
    """Make every answer huggingface_hub takes from a hub's HEAD (the ETag it names a blob after,
    the commit hash it names a snapshot after) pass `plain_name` first, in this process, once.

    huggingface_hub joins those into cache paths; a hostile (or broken) hub answering
    `../../x` would have files written outside the cache. Patched where it is read, so the
    checked values are the ones used (no second request can answer differently)."""
    from huggingface_hub import file_download

    with _guard_lock:
        original = file_download._get_metadata_or_catch_error
        if getattr(original, "__opta_guard__", False):
            return

        @functools.wraps(original)
        def checked(*args, **kwargs):
            answer = original(*args, **kwargs)
            _url, etag, commit_hash, _size, _xet, _error = answer
            for what, value in (("ETag", etag), ("commit hash", commit_hash)):
                if value is not None and not plain_name(value):
                    repo = kwargs.get("repo_id", "?")
                    raise HostileHubAnswer(repo, f"{repo}: the hub answered a {what} that is not a plain name "
                                                 f"({str(value)[:80]!r}); refused (it would be a path in the cache)")
            return answer

        checked.__opta_guard__ = True  # type: ignore[attr-defined]
        file_download._get_metadata_or_catch_error = checked


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
        if not plain_name(commit):
            raise HostileHubAnswer(repo_id, f"{repo_id}: the hub answered a commit that is not a plain name "
                                            f"({str(commit)[:80]!r}); refused")
        entries = [entry for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                   if isinstance(entry, RepoFile)]
        for entry in entries:
            if not safe_relative_path(entry.path):
                raise HostileHubAnswer(repo_id, f"{repo_id}: the hub listed a file name that is a path "
                                                f"({str(entry.path)[:80]!r}); refused")
            if not isinstance(entry.size, int) or entry.size < 0:
                raise HostileHubAnswer(repo_id, f"{repo_id}: the hub listed {entry.path} with no valid size")
        sizes = {entry.path: int(entry.size) for entry in entries}
    return RepoListing(repo_id, commit, sizes)


def engine_files(listing: RepoListing) -> dict[str, int]:
    """The files the engine reads (what is fetched): top-level ones, other weight formats left out."""
    return {path: size for path, size in listing.sizes.items()
            if "/" not in path and not path.lower().endswith(SKIPPED_SUFFIXES)}


def check_disk(repo_id: str, needed: int, cache_dir: str | Path | None) -> None:
    """Refuse (temporarily: space may be freed) a download the cache's disk cannot hold."""
    from huggingface_hub import constants

    directory = Path(cache_dir or constants.HF_HUB_CACHE)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN_BYTES > free:
        raise TemporaryDownloadError(repo_id, f"{repo_id} needs {_size(needed)} more on the disk of {directory}, "
                                              f"which has {_size(free)} free (and {_size(DISK_MARGIN_BYTES)} is kept "
                                              "free): make room, then it is tried again")


def check_inside(repo_id: str, snapshot: Path, cache_dir: str | Path | None) -> None:
    """Every file of the snapshot, links resolved, lies inside the hub cache."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE).resolve()
    for path in [snapshot, *snapshot.rglob("*")]:
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise HostileHubAnswer(repo_id, f"{repo_id}: {path.name} resolves outside the hub cache; refused")


def _size(n: int) -> str:
    from opta_lmx.state.quantities import format_size

    return format_size(n)


def hub_estimate(source: str, engine: EngineOptions, override_bytes: int | None = None, *,
                 endpoint: str | None = None, cache_dir: str | Path | None = None,
                 token: str | bool | None = None) -> MemoryEstimate:
    """The memory estimate of a hub model before its weights are downloaded.

    Weights come from the hub's listing; the KV-cache allowance needs config.json, which is
    fetched alone into the hub cache (a few kB, and the later download reuses it).
    """
    if override_bytes is not None:
        return MemoryEstimate(override_bytes=override_bytes)
    guard_hub_answers()
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
        """Count `n` bytes (negative when huggingface_hub restarts a file the server would not resume);
        cut the download once the hub has sent more than it declared."""
        if self._cancel is not None and self._cancel.is_set():
            raise DownloadCancelled(self.repo_id, f"the download of {self.repo_id} was cancelled")
        with self._lock:
            self.done_bytes += n
            if self.done_bytes > self.total_bytes + OVERRUN_BYTES:
                raise HostileHubAnswer(self.repo_id, f"{self.repo_id}: the hub sent more than the "
                                                     f"{_size(self.total_bytes)} it declared; refused")
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

    guard_hub_answers()
    listing = repo_listing(repo_id, revision=revision, endpoint=endpoint, token=token)
    files = engine_files(listing)
    total = sum(files.values())
    cached = sum(size for path, size in files.items() if isinstance(
        try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=listing.commit), str))
    check_disk(repo_id, total - cached, cache_dir)
    tracker = ProgressTracker(repo_id, total, cached, on_progress, interval=interval, cancel=cancel)
    tracker.report()
    with classified(repo_id):
        # Only the names checked above are fetched (allow_patterns; plain names hold no glob
        # characters), whatever a second listing says; the revision stays the one asked for, so the
        # cache's ref (main) is written and later starts find the snapshot.
        path = Path(snapshot_download(repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir,
                                      token=token, tqdm_class=_bar_class(tracker), max_workers=max_workers,
                                      allow_patterns=sorted(files) or ["config.json"]))
    check_inside(repo_id, path, cache_dir)
    tracker.done_bytes = max(tracker.done_bytes, total)
    tracker.report(finished=True)
    return path


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
