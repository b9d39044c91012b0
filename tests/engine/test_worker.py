"""A real worker process: ready within its deadline, stopped with nothing left behind."""

from __future__ import annotations

import asyncio
import json

import httpx
import psutil
import pytest

from opta_lmx.engine.options import serve_args
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.worker import WorkerSpec, WorkerStartError
from opta_lmx.state.spec import EngineOptions


def test_serve_args_map_engine_options():
    options = EngineOptions(
        continuous_batching=True, max_num_seqs=4, enable_prefix_cache=False,
        tool_call_parser="qwen3_coder", reasoning_parser="qwen3", extra_args=["--timeout", "9"],
    )
    assert serve_args(options) == [
        "--continuous-batching", "--max-num-seqs", "4", "--reasoning-parser", "qwen3",
        "--disable-prefix-cache", "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
        "--timeout", "9",
    ]
    assert serve_args(EngineOptions()) == []


def test_fingerprint_follows_source_and_options():
    base = WorkerSpec("a", "/m", EngineOptions(max_tokens=5))
    assert base.fingerprint == WorkerSpec("a", "/m", EngineOptions(max_tokens=5)).fingerprint
    assert base.fingerprint != WorkerSpec("a", "/m", EngineOptions(max_tokens=6)).fingerprint
    assert base.fingerprint != WorkerSpec("a", "/other", EngineOptions(max_tokens=5)).fingerprint


@pytest.mark.e2e
def test_worker_serves_and_stops_cleanly(tmp_path, tiny_model):
    async def scenario():
        pool = WorkerPool(tmp_path / "run")
        worker = await pool.start(WorkerSpec("tiny", str(tiny_model), EngineOptions(max_tokens=4)), ready_timeout=120)
        assert worker.alive() and worker.load_seconds > 0
        assert worker.memory_bytes() > 50 * 1024**2
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{worker.address}/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                timeout=60,
            )
        assert response.status_code == 200, response.text
        pids = [worker.pid] + [c.pid for c in psutil.Process(worker.pid).children(recursive=True)]
        await pool.stop(worker, grace=5)
        assert not worker.alive()
        assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert pool.workers() == []

    asyncio.run(scenario())


@pytest.mark.e2e
def test_broken_model_fails_permanently_and_leaves_nothing(tmp_path, tiny_model):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (broken / "config.json").write_text(json.dumps(config))

    async def scenario():
        pool = WorkerPool(tmp_path / "run")
        with pytest.raises(WorkerStartError) as caught:
            await pool.start(WorkerSpec("broken", str(broken)), ready_timeout=120)
        assert caught.value.permanent, caught.value.log_tail[-2000:]
        assert "no_such_architecture" in caught.value.log_tail
        assert pool.workers() == []

    asyncio.run(scenario())
