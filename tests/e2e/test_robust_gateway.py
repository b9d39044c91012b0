"""Issue 15 items 3 and 7 with real workers: a model directory whose config.json is a FIFO fails
that model while the others serve; clients that leave stop their non-streaming generations and
leave the queue."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lmx_harness import start_server, stop_and_check

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("robust-gateway")
    bad = root / "fifo-model"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    os.mkfifo(bad / "config.json")  # no writer ever: reading it on the event loop would freeze the server
    config = root / "models.yaml"
    config.write_text(
        "models:\n"
        f"  - name: a\n    source: {tiny_model}\n    engine: {{continuous_batching: true}}\n"
        f"  - name: limited\n    source: {tiny_model}\n    max_concurrency: 1\n"
        f"  - name: bad\n    source: {bad}\n"
    )
    server = start_server(config, root / "state")
    try:
        server.wait_ready("a", "limited")
        yield server
    finally:
        stop_and_check(server)


def _gauge(server, name: str, model: str) -> float:
    text = server.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def _chat(model: str, max_tokens: int) -> dict:
    """A request that generates all of `max_tokens` (the end-of-text ids 0 and 2 are banned)."""
    return {"model": model, "messages": [{"role": "user", "content": "count to a million"}],
            "max_tokens": max_tokens, "temperature": 0.0, "logit_bias": {"0": -100, "2": -100}}


def _post_and_leave(server, body: dict, after: float) -> None:
    try:
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=after)
    except httpx.TimeoutException:
        pass


def test_a_fifo_config_fails_its_model_and_the_gateway_serves(server):
    server.wait_for(lambda s: s.phases().get("bad") == "Failed", 60, "bad Failed")
    bad = next(m for m in server.admin_models()["models"] if m["name"] == "bad")
    assert "config.json is not a regular file" in bad["status"]["message"]
    answer = httpx.post(server.base_url + "/v1/chat/completions", json=_chat("a", 3), timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"]
    assert server.get("/healthz").status_code == 200


def test_clients_that_leave_stop_their_non_streaming_generations(server):
    address = next(m for m in server.admin_models()["models"] if m["name"] == "a")["status"]["address"]
    clients = [threading.Thread(target=_post_and_leave, args=(server, _chat("a", 20000), 0.5)) for _ in range(8)]
    left = time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join(30)

    def idle(s):
        running = httpx.get(address + "/v1/status", timeout=5).json().get("num_running", 0)
        return running == 0 and _gauge(s, "lmx_requests_in_flight", "a") == 0

    server.wait_for(idle, 30, "the worker to stop generating for clients that left")
    print(f"worker idle {time.monotonic() - left:.1f}s after 8 clients left at 0.5s")  # reported, not asserted
    answer = httpx.post(server.base_url + "/v1/chat/completions", json=_chat("a", 3), timeout=30)
    assert answer.status_code == 200


def test_a_queued_request_whose_client_left_leaves_the_queue(server):
    first = threading.Thread(target=_post_and_leave, args=(server, _chat("limited", 20000), 6.0))
    first.start()
    server.wait_for(lambda s: _gauge(s, "lmx_requests_in_flight", "limited") == 1, 30, "first in flight")
    second = threading.Thread(target=_post_and_leave, args=(server, _chat("limited", 3), 1.0))
    second.start()
    server.wait_for(lambda s: _gauge(s, "lmx_queue_depth", "limited") == 1, 10, "second queued")
    second.join(10)
    server.wait_for(lambda s: _gauge(s, "lmx_queue_depth", "limited") == 0, 10, "the queue emptied")
    first.join(30)
    server.wait_for(lambda s: _gauge(s, "lmx_requests_in_flight", "limited") == 0, 30, "first cancelled")
