"""Keys stay with the gateway: workers need their own key, never see LMX_* keys, never show a key in ps."""

from __future__ import annotations

import asyncio
import os

import httpx
import psutil
import pytest

from opta_lmx.engine.options import serve_args
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.worker import Worker, WorkerSpec
from opta_lmx.engine.worker_auth import (
    KEY_VARIABLE,
    SecretFileError,
    ensure_secret,
    read_secret,
    upstream_headers,
    worker_key,
)
from opta_lmx.state.spec import EngineOptions
from tests.engine.standins import health_server


def test_the_secret_is_private_stable_and_keys_differ_per_worker(tmp_path):
    assert read_secret(tmp_path) is None
    secret = ensure_secret(tmp_path)
    assert (tmp_path / "worker.secret").stat().st_mode & 0o777 == 0o600
    assert ensure_secret(tmp_path) == secret == read_secret(tmp_path)
    assert worker_key(secret, "http://127.0.0.1:1") != worker_key(secret, "http://127.0.0.1:2")
    assert worker_key(secret, "http://127.0.0.1:1") == worker_key(secret, "http://127.0.0.1:1")
    (tmp_path / "worker.secret").chmod(0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret(tmp_path)


def test_upstream_headers_strip_client_credentials_and_add_the_worker_key():
    client = [("Authorization", "Bearer client"), ("X-API-Key", "anthropic"), ("x-admin-key", "a"),
              ("Cookie", "c=1"), ("Host", "localhost"), ("Content-Type", "application/json"),
              ("anthropic-version", "2023-06-01"), ("Connection", "keep-alive")]
    headers = upstream_headers(client, "worker-key")
    assert headers == [("Content-Type", "application/json"), ("anthropic-version", "2023-06-01"),
                       ("Authorization", "Bearer worker-key")]
    assert ("Authorization", "Bearer worker-key") not in upstream_headers(client, None)


def test_worker_environment_carries_no_lmx_variables_and_command_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LMX_API_KEY", "gateway-secret")
    monkeypatch.setenv("LMX_ADMIN_KEY_FILE", "/somewhere")
    monkeypatch.setenv(KEY_VARIABLE, "inherited")
    worker = Worker(WorkerSpec("m", "/models/m"), run_dir=tmp_path, port=18162)
    env = worker.environment()
    assert not [name for name in env if name.startswith("LMX_")]
    assert KEY_VARIABLE not in env  # no secret: no key, and an inherited one is dropped
    ensure_secret(tmp_path)
    env = worker.environment()
    assert env[KEY_VARIABLE] == worker.api_key() == worker_key(read_secret(tmp_path), "http://127.0.0.1:18162")
    command = worker.command(7, 8)
    assert worker.api_key() not in " ".join(command) and "--api-key" not in command
    assert "opta_lmx.engine.worker_main" in command and command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--listen-fd") + 1] == "8"  # it serves on the socket it inherits


def test_serve_args_refuse_owned_flags_even_without_validation():
    options = EngineOptions.model_construct(extra_args=["--host", "0.0.0.0"])
    with pytest.raises(ValueError, match="--host"):
        serve_args(options)


@pytest.mark.e2e
def test_a_worker_answers_only_its_key_and_health_stays_open(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("LMX_API_KEY", "gateway-secret")
    run = tmp_path / "run"
    ensure_secret(run)

    async def scenario():
        pool = WorkerPool(run)
        worker = await pool.start(WorkerSpec("tiny", str(tiny_model), EngineOptions(max_tokens=4)), ready_timeout=120)
        try:
            key = worker.api_key()
            async with httpx.AsyncClient(timeout=60) as client:
                assert (await client.get(f"{worker.address}/health")).status_code == 200
                body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                url = f"{worker.address}/v1/chat/completions"
                assert (await client.post(url, json=body)).status_code == 401
                wrong = await client.post(url, json=body, headers={"Authorization": "Bearer gateway-secret"})
                assert wrong.status_code == 401
                good = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
                assert good.status_code == 200, good.text
            process = psutil.Process(worker.pid)
            assert key not in " ".join(process.cmdline())
            if os.path.exists(f"/proc/{worker.pid}/environ"):
                assert b"LMX_API_KEY" not in open(f"/proc/{worker.pid}/environ", "rb").read()
        finally:
            await pool.stop(worker, grace=5)

    asyncio.run(scenario())


def test_readiness_calls_to_a_worker_ignore_proxy_settings(tmp_path, monkeypatch):
    """A user's HTTP_PROXY must not capture the control plane's calls to 127.0.0.1 (loopback_client)."""
    dead_proxy = "http://127.0.0.1:9"  # nothing listens there: a proxied call would fail
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with health_server(b'{"status": "healthy", "model_loaded": true, "model_name": "m"}') as port:
        worker = Worker(WorkerSpec("m", "unused"), run_dir=tmp_path, port=port)
        assert asyncio.run(worker.healthy()) is True
        with httpx.Client() as proxied:  # the same call honouring the environment does go to the proxy
            with pytest.raises(httpx.HTTPError):
                proxied.get(f"{worker.address}/health")
