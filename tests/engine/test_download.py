"""Hub downloads with huggingface_hub's real code, against a local fake hub (tests/hubserver.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import psutil

import pytest

from opta_lmx.engine import download as dl
from opta_lmx.engine import download_process
from opta_lmx.engine.memory import estimate
from opta_lmx.state.spec import EngineOptions
from tests.hubserver import FakeHub

REPO = "opta-test/tiny"


@pytest.fixture
def hub(tiny_model, tmp_path, monkeypatch):
    """A fake hub serving the tiny model as `opta-test/tiny`, and an empty hub cache.

    The test process runs with HF_HUB_OFFLINE=1 (conftest); only these tests lift it.
    """
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub reads 10 MB at a time: more than the whole tiny model. Real weights are GBs;
    # smaller reads give the tiny model the many progress steps (and a resume point mid-file) they have.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    server = FakeHub(bytes_per_second=1024**2)
    server.add(REPO, tiny_model)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def options(hub, tmp_path):
    return {"endpoint": hub.url, "cache_dir": tmp_path / "hub-cache", "token": False}


def test_download_reports_progress_up_to_the_repo_size(hub, options, tiny_model):
    seen: list[dl.DownloadProgress] = []
    path = dl.download(REPO, seen.append, interval=0.05, **options)
    expected = {name: len(data) for name, data in hub.repos[REPO].files.items()}
    assert {p.name: p.stat().st_size for p in path.iterdir()} == expected
    total = sum(expected.values())
    assert all(p.total_bytes == total and p.repo_id == REPO for p in seen)
    done = [p.done_bytes for p in seen]
    assert done[0] == 0 and done == sorted(done) and len(set(done)) >= 3  # seen growing, not just start and end
    assert seen[-1].finished and seen[-1].done_bytes == total
    assert any(p.rate_bytes_per_s > 0 for p in seen)
    assert (path / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_a_cut_connection_resumes_with_a_range_request(hub, options, tiny_model):
    hub.cut_once.add("model.safetensors")
    seen: list[dl.DownloadProgress] = []
    path = dl.download(REPO, seen.append, interval=0.05, **options)
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(gets) == 2 and gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=") and gets[1].range != "bytes=0-"
    assert (path / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert seen[-1].done_bytes == seen[-1].total_bytes


def test_a_missing_repo_is_permanent_with_a_clear_message(hub, options):
    with pytest.raises(dl.PermanentDownloadError, match="not found on the hub") as caught:
        dl.download("opta-test/no-such-model", **options)
    assert caught.value.permanent and caught.value.repo_id == "opta-test/no-such-model"
    with pytest.raises(dl.PermanentDownloadError):
        dl.repo_listing("opta-test/no-such-model", endpoint=options["endpoint"])


def test_an_unreachable_hub_is_temporary(hub, options):
    hub.stop()
    with pytest.raises(dl.TemporaryDownloadError) as caught:
        dl.download(REPO, **options)
    assert not caught.value.permanent


def test_cache_detection_before_and_after(hub, options, tiny_model):
    cache = options["cache_dir"]
    assert dl.needs_download(REPO, cache_dir=cache)
    assert dl.cached_snapshot(REPO, cache_dir=cache) is None
    path = dl.download(REPO, **options)
    assert not dl.needs_download(REPO, cache_dir=cache)
    assert dl.cached_snapshot(REPO, cache_dir=cache) == path
    assert not dl.needs_download(str(tiny_model)) and dl.hub_repo_id(str(tiny_model)) is None


def test_offline_never_needs_a_download(hub, options, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not dl.needs_download(REPO, cache_dir=options["cache_dir"])
    with pytest.raises(dl.PermanentDownloadError, match="HF_HUB_OFFLINE"):
        dl.download(REPO, **options)


def test_sizes_and_estimate_before_download(hub, options, tiny_model):
    listing = dl.repo_listing(REPO, endpoint=options["endpoint"])
    assert listing.commit == hub.repos[REPO].commit
    assert listing.sizes == {p.name: p.stat().st_size for p in tiny_model.iterdir() if not p.name.startswith(".")}
    before = [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    assert before == []  # the listing fetched no file
    engine = EngineOptions()
    remote = dl.hub_estimate(REPO, engine, **options)
    local = estimate(str(tiny_model), engine)
    assert remote.known and remote == local
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path and r.method == "GET"}
    assert fetched == {"config.json"}  # only config.json, not the weights
    assert dl.hub_estimate(REPO, engine, 123, **options).total_bytes == 123


def test_files_already_cached_count_as_done(hub, options):
    from huggingface_hub import hf_hub_download

    hf_hub_download(REPO, "model.safetensors", endpoint=options["endpoint"], cache_dir=options["cache_dir"])
    weights = len(hub.repos[REPO].files["model.safetensors"])
    seen: list[dl.DownloadProgress] = []
    dl.download(REPO, seen.append, **options)
    assert seen[0].done_bytes == weights
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(gets) == 1  # not fetched a second time


def test_cancel_stops_the_download(hub, options):
    hub.bytes_per_second = 64 * 1024
    cancel = threading.Event()

    def on_progress(progress: dl.DownloadProgress) -> None:
        if progress.done_bytes > 0:
            cancel.set()

    with pytest.raises(dl.DownloadCancelled):
        dl.download(REPO, on_progress, cancel=cancel, interval=0.0, **options)
    assert dl.needs_download(REPO, cache_dir=options["cache_dir"])


def test_download_async_reports_on_the_loop(hub, options):
    async def run():
        loop_thread = threading.get_ident()
        threads: set[int] = set()
        seen: list[dl.DownloadProgress] = []

        def on_progress(progress):
            threads.add(threading.get_ident())
            seen.append(progress)

        path = await download_process.download_async(REPO, on_progress, interval=0.05, **options)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe callback run
        return path, seen, threads, loop_thread

    path, seen, threads, loop_thread = asyncio.run(run())
    assert path.is_dir() and seen and seen[-1].finished
    assert threads == {loop_thread}


@pytest.mark.parametrize("source,expected", [
    ("mlx-community/Qwen3-8B-4bit", "mlx-community/Qwen3-8B-4bit"),
    ("/models/x", None), ("./x/y", None), ("~/models/m", None), ("justaname", None), ("a/b/c", None), ("a/", None),
])
def test_hub_repo_id(source, expected):
    assert dl.hub_repo_id(source) == expected


def test_cancelling_download_async_ends_its_process_within_a_second(hub, options):
    """Issue 22: a download runs in a process of its own; cancelling it ends it within a second
    (whatever the hub does), leaving no partial file (huggingface_hub 2.4 resumes a file only
    within one attempt); the next attempt downloads it whole."""
    hub.bytes_per_second = 64 * 1024

    async def run():
        started = asyncio.Event()
        task = asyncio.create_task(download_process.download_async(
            REPO, lambda p: p.done_bytes > 0 and started.set(), interval=0.0, chunk_bytes=16 * 1024, **options))
        await asyncio.wait_for(started.wait(), 60)
        processes = [p for p in psutil.Process().children() if "opta_lmx.engine.download_main" in p.cmdline()]
        cancelled = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled, processes

    took, processes = asyncio.run(run())
    assert took < 1.0 and processes and not any(p.is_running() and p.status() != "zombie" for p in processes)
    assert dl.needs_download(REPO, cache_dir=options["cache_dir"])
    assert list(options["cache_dir"].rglob("*.incomplete")) == []  # it stopped cleanly: no partial file left
    hub.bytes_per_second = 8 * 1024**2
    asyncio.run(download_process.download_async(REPO, **options))
    assert not dl.needs_download(REPO, cache_dir=options["cache_dir"])
