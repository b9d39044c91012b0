"""A hostile model hub (issue 22): its answers are data, never paths. huggingface_hub's real code
downloads from tests/hubserver.py's stand-in, which answers path-like ETags, commits and file
names, bodies longer than declared; nothing is written outside the cache, the download is refused
with a one-line reason, and only the files the engine reads are fetched."""

from __future__ import annotations

import asyncio
import os

import pytest

from opta_lmx.engine import download as dl
from opta_lmx.engine import download_process
from opta_lmx.state.spec import EngineOptions
from tests.hubserver import FakeHub, Hostile

REPO = "opta-test/tiny"


@pytest.fixture
def hub(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    server = FakeHub(bytes_per_second=16 * 1024**2)
    server.add(REPO, tiny_model)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def options(hub, tmp_path):
    return {"endpoint": hub.url, "cache_dir": tmp_path / "deep" / "hub-cache", "token": False}


def _outside(tmp_path, cache_dir) -> list[str]:
    """Every file under tmp_path that is not inside the cache (the hub's answers must not put any)."""
    found = []
    for root, _dirs, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(root, name)
            if not path.startswith(str(cache_dir)) and "hf-home" not in path:
                found.append(path)
    return found


@pytest.mark.parametrize("hostile", [
    Hostile(etag="../../../escape"),
    Hostile(etag="/tmp/absolute-escape"),
    Hostile(commit="../../../escaped-snapshot"),
    Hostile(extra_listed={"../../outside.json": 10}),
    Hostile(extra_listed={"/etc/passwd": 10}),
], ids=["etag-dotdot", "etag-absolute", "commit-dotdot", "filename-dotdot", "filename-absolute"])
def test_path_like_answers_are_refused_and_nothing_is_written_outside_the_cache(hub, options, tmp_path, hostile):
    hub.repos[REPO].hostile = hostile
    with pytest.raises(dl.HostileHubAnswer) as refused:
        dl.download(REPO, **options)
    assert refused.value.permanent and "refused" in refused.value.message and "\n" not in refused.value.message
    assert _outside(tmp_path, options["cache_dir"]) == []
    assert not os.path.exists("/tmp/absolute-escape")


def test_the_estimate_refuses_a_path_like_config_etag_too(hub, options):
    hub.repos[REPO].hostile = Hostile(etag="../../x")
    with pytest.raises(dl.HostileHubAnswer):
        dl.hub_estimate(REPO, EngineOptions(), **options)


def test_a_body_longer_than_declared_is_cut_soon_after_the_declared_size(hub, options, tmp_path):
    hub.repos[REPO].hostile = Hostile(overrun={"model.safetensors": 40 * 1024**2})
    with pytest.raises(dl.HostileHubAnswer, match="more than the"):
        dl.download(REPO, **options)
    written = sum(p.stat().st_size for p in options["cache_dir"].rglob("*") if p.is_file())
    declared = sum(len(d) for d in hub.repos[REPO].files.values())
    assert written < declared + dl.OVERRUN_BYTES + 1024**2  # stopped within a chunk of the bound, not 40 MiB


def test_only_the_files_the_engine_reads_are_fetched(hub, options, tiny_model, tmp_path):
    repo = hub.repos[REPO]
    repo.files["sub/huge.safetensors"] = b"\0" * 4096  # not top-level: the engine never reads it
    repo.files["model.gguf"] = b"\0" * 4096  # another weight format
    path = dl.download(REPO, **options)
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_model.iterdir()
                                                            if not p.name.startswith("."))
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests
               if r.method == "GET" and "/resolve/" in r.path}
    assert "model.gguf" not in fetched and "sub/huge.safetensors" not in fetched


def test_a_disk_without_room_refuses_the_download_in_one_line(hub, options, monkeypatch):
    class Full:
        free = 10 * 1024**2

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _path: Full())
    with pytest.raises(dl.TemporaryDownloadError, match="needs .* more on the disk .* free") as refused:
        dl.download(REPO, **options)
    assert "\n" not in refused.value.message
    assert not list(options["cache_dir"].rglob("*.safetensors"))


def test_a_hostile_answer_reaches_the_loop_as_a_permanent_error_from_the_download_process(hub, options):
    hub.repos[REPO].hostile = Hostile(etag="../../x")
    with pytest.raises(dl.PermanentDownloadError, match="not a plain name"):
        asyncio.run(download_process.download_async(REPO, **options))
