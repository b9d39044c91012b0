"""Hub models in the loop, with a stand-in hub and pool (no network, no processes): sizing before
admission, the Downloading phase and its status block, failures, backoff, and cancellation.
The real download code against a local fake hub is in tests/engine/test_download.py and
tests/e2e/test_downloading.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from opta_lmx.engine.download import DownloadProgress, PermanentDownloadError, TemporaryDownloadError
from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.reconciler.downloads import Download, Downloads, HubClient, HubSize, progress_event_due
from opta_lmx.state.status import EventLog, Phase
from tests.reconciler.fakes import FakePool, MiB

REPO = "org/model"


class StandInHub:
    """Sizes by repo, a cache, and a download that stops halfway until `release` is set."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.cached: set[str] = set()
        self.size_calls: list[str] = []
        self.size_threads: list[threading.Thread] = []
        self.size_errors: dict[str, Exception] = {}
        self.fetch_calls: list[str] = []
        self.fetch_errors: dict[str, list[Exception]] = {}
        self.cancelled: list[str] = []
        self.release = asyncio.Event()
        self.halfway = asyncio.Event()

    def size(self, source, _engine, override):
        self.size_calls.append(source)
        self.size_threads.append(threading.current_thread())
        if source in self.size_errors:
            raise self.size_errors[source]
        return HubSize(MemoryEstimate(weights_bytes=self.sizes[source], overhead_bytes=0, override_bytes=override),
                       source not in self.cached)

    def needs_download(self, source):
        return source not in self.cached

    async def fetch(self, source, on_progress):
        self.fetch_calls.append(source)
        total = self.sizes[source]
        try:
            on_progress(DownloadProgress(source, 0, total, 0.0))
            on_progress(DownloadProgress(source, total // 2, total, 5 * MiB))
            self.halfway.set()
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(source)
            raise
        if self.fetch_errors.get(source):
            raise self.fetch_errors[source].pop(0)
        on_progress(DownloadProgress(source, total, total, 5 * MiB, finished=True))
        self.cached.add(source)
        return Path("/tmp")

    def client(self) -> HubClient:
        return HubClient(size=self.size, needs_download=self.needs_download, fetch=self.fetch)


def make(tmp_path, text, hub: StandInHub):
    (tmp_path / "models.yaml").write_text(text)
    pool = FakePool()
    reconciler = Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(backoff_base=0.05, backoff_max=0.1),
                            memory_probe=lambda: (16_000 * MiB, 10_000 * MiB), hub=hub.client())
    return reconciler, pool


async def until(reconciler, predicate, passes=200):
    """Run passes until `predicate()` holds (threads and tasks get their turn between passes)."""
    for _ in range(passes):
        await reconciler.reconcile_once()
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached; statuses {reconciler.statuses}; events "
                         f"{[(e.object, e.reason, e.message) for e in reconciler.events.since()]}")


def phase(reconciler, name="h"):
    status = reconciler.statuses.get(name)
    return status.phase if status else None


def reasons(reconciler, name="h"):
    return [e.reason for e in reconciler.events.since() if e.object == name]


ONE = f"memory: {{budget: 1000MiB}}\nmodels:\n  - {{name: h, source: {REPO}}}\n"


def test_a_hub_model_downloads_before_its_worker_starts(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: hub.halfway.is_set())
        status = reconciler.statuses["h"]  # fresh between passes: the progress itself updates it
        assert status.phase == Phase.DOWNLOADING and status.reason == "Downloading"
        assert status.download is not None and status.download.repo_id == REPO
        assert (status.download.done_bytes, status.download.total_bytes) == (25 * MiB, 50 * MiB)
        assert status.download.rate_bytes_per_s == 5 * MiB and "25.0 MiB of 50.0 MiB (50%)" in status.message
        assert status.estimated_bytes == 50 * MiB  # from the hub's sizes, before anything was fetched
        assert pool.started == [] and not reconciler.converged()  # no worker while downloading
        assert hub.size_threads and threading.main_thread() not in hub.size_threads  # sized off the loop
        hub.release.set()
        await until(reconciler, lambda: phase(reconciler) == Phase.READY and reconciler.converged())
        assert pool.started == ["h"] and reconciler.statuses["h"].download is None
        assert reasons(reconciler) == ["Downloading", "Downloaded", "Loading", "Ready"]
        assert hub.size_calls == [REPO] and hub.fetch_calls == [REPO]
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_cached_hub_model_loads_without_a_download(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    hub.cached.add(REPO)
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: phase(reconciler) == Phase.READY)
        assert hub.fetch_calls == [] and reasons(reconciler) == ["Loading", "Ready"]
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_model_too_big_for_the_budget_is_unschedulable_before_any_download(tmp_path):
    hub = StandInHub({REPO: 5000 * MiB})
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: phase(reconciler) == Phase.UNSCHEDULABLE)
        for _ in range(5):
            await reconciler.reconcile_once()
        assert "4.9 GiB" in reconciler.statuses["h"].message
        assert hub.fetch_calls == [] and hub.size_calls == [REPO] and pool.started == []
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_missing_repo_is_failed_once_and_not_retried(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    missing = "org/missing"
    hub.size_errors[missing] = PermanentDownloadError(missing, f"{missing} was not found on the hub (it does not "
                                                               "exist, or it is private and no token with access is set)")
    reconciler, pool = make(tmp_path, f"models:\n  - {{name: h, source: {missing}}}\n", hub)

    async def scenario():
        await until(reconciler, lambda: phase(reconciler) == Phase.FAILED)
        for _ in range(5):
            await reconciler.reconcile_once()
            await asyncio.sleep(0.02)
        status = reconciler.statuses["h"]
        assert status.phase == Phase.FAILED and "org/missing was not found on the hub" in status.message
        assert hub.size_calls == [missing] and hub.fetch_calls == [] and pool.started == []
        assert reconciler.converged() is False
        (tmp_path / "models.yaml").write_text(ONE)  # the entry changes: tried again from scratch
        hub.release.set()
        await until(reconciler, lambda: phase(reconciler) == Phase.READY)
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_permanent_error_during_the_download_is_failed_and_not_retried(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    hub.fetch_errors[REPO] = [PermanentDownloadError(REPO, f"{REPO} is a gated repo: accept its terms")]
    hub.release.set()
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: phase(reconciler) == Phase.FAILED)
        for _ in range(5):
            await reconciler.reconcile_once()
            await asyncio.sleep(0.02)
        assert "download failed: org/model is a gated repo" in reconciler.statuses["h"].message
        assert hub.fetch_calls == [REPO] and pool.started == []
        assert "DownloadFailed" in reasons(reconciler)
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_temporary_error_backs_off_then_downloads_again(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    hub.fetch_errors[REPO] = [TemporaryDownloadError(REPO, f"{REPO}: the download did not complete; will retry")]
    hub.release.set()
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: reconciler.statuses.get("h") is not None
                    and reconciler.statuses["h"].reason == "BackOff")
        assert "the download did not complete" in reconciler.statuses["h"].message and hub.fetch_calls == [REPO]
        await until(reconciler, lambda: phase(reconciler) == Phase.READY)
        assert hub.fetch_calls == [REPO, REPO] and pool.started == ["h"]
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_removing_the_model_cancels_its_download(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: hub.halfway.is_set())
        (tmp_path / "models.yaml").write_text("models: []\n")
        await until(reconciler, lambda: hub.cancelled == [REPO] and not reconciler.downloads.busy())
        await until(reconciler, lambda: "h" not in reconciler.statuses and reconciler.converged())
        assert "DownloadCancelled" in reasons(reconciler) and pool.started == []
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_stopping_the_server_cancels_its_downloads(tmp_path):
    hub = StandInHub({REPO: 50 * MiB})
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: hub.halfway.is_set())
        await reconciler.shutdown()
        assert hub.cancelled == [REPO] and not reconciler.downloads.busy() and pool.started == []

    asyncio.run(scenario())


def test_new_engine_options_keep_the_download_but_a_new_source_cancels_it(tmp_path):
    other = "org/other"
    hub = StandInHub({REPO: 50 * MiB, other: 20 * MiB})
    reconciler, pool = make(tmp_path, ONE, hub)

    async def scenario():
        await until(reconciler, lambda: hub.halfway.is_set())
        (tmp_path / "models.yaml").write_text(ONE.replace("}", ", engine: {max_num_seqs: 8}}"))
        for _ in range(5):
            await reconciler.reconcile_once()
            await asyncio.sleep(0.02)
        assert hub.cancelled == [] and hub.fetch_calls == [REPO]  # the same download goes on
        (tmp_path / "models.yaml").write_text(ONE.replace(REPO, other))
        await until(reconciler, lambda: hub.cancelled == [REPO] and hub.fetch_calls == [REPO, other])
        hub.release.set()
        await until(reconciler, lambda: phase(reconciler) == Phase.READY)
        assert pool.started == ["h"] and pool.workers()[0].spec.source == other
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_progress_events_every_ten_percent_at_most_every_five_seconds():
    now = [100.0]
    events = EventLog(clock=lambda: now[0])
    downloads = Downloads(events, lambda: None, lambda *a: 0.0, clock=lambda: now[0])
    d = Download("h", REPO, started_at=100.0)
    total = 1000
    downloads._progress(d, DownloadProgress(REPO, 200, total, 0.0))  # the start: 20% already cached
    for done, at in [(250, 106), (310, 107), (320, 111), (330, 120), (900, 121), (950, 130)]:
        now[0] = at
        downloads._progress(d, DownloadProgress(REPO, done, total, 10.0))
    recorded = [(e.reason, e.message) for e in events.since()]
    assert recorded[0] == ("Downloading", f"downloading {REPO} from the hub: 1000 B (200 B already in the cache)")
    # 250 B is not 10% past the start; 310 B is (7 s after it); 320 B, 330 B are not 10% past 310 B;
    # 900 B is (14 s later); 950 B is not.
    assert [m for r, m in recorded[1:]] == [f"{REPO}: 310 B of 1000 B (31%) at 10 B/s",
                                            f"{REPO}: 900 B of 1000 B (90%) at 10 B/s"]
    assert not progress_event_due(d, DownloadProgress(REPO, 1000, total, 1.0, finished=True), 1000.0)
