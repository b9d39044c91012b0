"""Issue 4: the gateway under loads, limits, crashes and disconnects, with real workers."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lmx_harness import start_server, stop_and_check

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("gateway")
    config = root / "models.yaml"
    config.write_text(
        "models:\n"
        f"  - name: a\n    source: {tiny_model}\n    engine: {{continuous_batching: true}}\n"
        f"  - name: limited\n    source: {tiny_model}\n    max_concurrency: 1\n"
        f"  - name: victim\n    source: {tiny_model}\n    engine: {{continuous_batching: true}}\n"
        f"  - name: ghost\n    source: {root / 'no-such-model'}\n"
    )
    server = start_server(config, root / "state", "--max-body-bytes", "65536")
    try:
        server.wait_ready("a", "limited", "victim")
        yield server
    finally:
        stop_and_check(server)


def _chat(model: str, max_tokens: int = 3, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, **extra}


def _samples(server, name: str) -> list:
    text = server.get("/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_errors_are_openai_shaped(server):
    bad_json = server.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    no_model = server.post("/v1/chat/completions", json={"messages": []})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    too_big = server.post("/v1/chat/completions", json=_chat("a", padding="x" * 100_000))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    ghost = server.post("/v1/chat/completions", json=_chat("ghost"))
    assert ghost.status_code == 503 and ghost.json()["error"]["code"] == "model_not_loaded"
    assert ghost.headers["x-should-retry"] == "false"  # the SDKs would retry for a minute otherwise
    assert "Failed" in ghost.json()["error"]["message"]
    assert server.phases()["ghost"] == "Failed"


def test_concurrency_limit_queues_instead_of_failing(server):
    """With max_concurrency 1, a second request waits for the first instead of failing."""
    results = {}

    def call(key, tokens):
        results[key] = server.post("/v1/chat/completions", json=_chat("limited", tokens, temperature=0.0))

    first = threading.Thread(target=call, args=("first", 400))
    first.start()
    server.wait_for(lambda s: any(x.labels.get("model") == "limited" and x.value == 1
                                  for x in _samples(s, "lmx_requests_in_flight")), 30, "first in flight")
    second = threading.Thread(target=call, args=("second", 3))
    second.start()
    queued = lambda s: any(x.labels.get("model") == "limited" and x.value == 1 for x in _samples(s, "lmx_queue_depth"))  # noqa: E731
    saw_queue = True
    try:
        server.wait_for(queued, 10, "second request queued")
    except AssertionError:
        saw_queue = results.get("first") is not None  # the first finished before we looked: no queue to see
    first.join(60)
    second.join(60)
    assert saw_queue
    assert results["first"].status_code == 200 and results["second"].status_code == 200


def test_client_disconnect_cancels_upstream(server):
    address = next(m for m in server.admin_models()["models"] if m["name"] == "a")["status"]["address"]
    before = server.worker_get(address, "/v1/status").json()["total_completion_tokens"]
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.base_url + "/v1/chat/completions",
                           json=_chat("a", 20000, stream=True, temperature=0.0)) as response:
            assert response.status_code == 200
            next(response.iter_raw())  # generation has started; now walk away
    server.wait_for(lambda s: server.worker_get(address, "/v1/status").json()["num_running"] == 0, 20,
                    "worker to stop generating for the departed client")
    generated = server.worker_get(address, "/v1/status").json()["total_completion_tokens"] - before
    assert generated < 20000


def test_worker_killed_mid_stream_gives_prompt_error_and_recovers(server):
    victim = next(m for m in server.admin_models()["models"] if m["name"] == "victim")
    pid = victim["status"]["pid"]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=httpx.Timeout(60, read=2.0))  # a hang would surface as a read timeout
    stream = client.chat.completions.create(**_chat("victim", 20000, stream=True, temperature=0.0))
    next(iter(stream))
    os.killpg(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as caught:
        list(stream)  # read to the end: the error event must surface as an exception
    assert not isinstance(caught.value, openai.APITimeoutError)
    assert "failed mid-stream" in str(caught.value)
    # Other models never noticed; the victim comes back by itself.
    assert server.post("/v1/chat/completions", json=_chat("a")).status_code == 200
    def restarted_ready(s):
        status = next(m for m in s.admin_models()["models"] if m["name"] == "victim")["status"]
        return status["phase"] == "Ready" and status["pid"] not in (None, pid)

    server.wait_for(restarted_ready, 60, "victim restarted")
    restarted = next(m for m in server.admin_models()["models"] if m["name"] == "victim")["status"]
    assert restarted["restarts"] >= 1
    assert server.post("/v1/chat/completions", json=_chat("victim")).status_code == 200
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_metrics_after_traffic(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
    client.chat.completions.create(**_chat("a"))
    assert list(client.chat.completions.create(**_chat("a", stream=True)))
    requests = {(s.labels["model"], s.labels["status"]): s.value for s in _samples(server, "lmx_requests_total")}
    assert requests[("a", "200")] >= 2
    completion = {s.labels["model"]: s.value for s in _samples(server, "lmx_completion_tokens_total")}
    assert completion["a"] >= 6
    ttft = {s.labels["model"]: s.value for s in _samples(server, "lmx_time_to_first_token_seconds_count")}
    assert ttft["a"] >= 2
    phases = {(s.labels["model"], s.labels["phase"]): s.value for s in _samples(server, "lmx_model_phase")}
    assert phases[("a", "Ready")] == 1 and phases[("ghost", "Failed")] == 1
    assert _samples(server, "lmx_reconcile_passes_total")[0].value > 0
    assert _samples(server, "lmx_reconcile_duration_seconds_count")[0].value > 0
    measured = {s.labels["model"]: s.value for s in _samples(server, "lmx_model_measured_bytes")}
    assert measured["a"] > 50 * 1024**2


def test_requests_wait_for_a_loading_model_bounded_queue(tmp_path, tiny_model):
    """While a model loads, requests wait; past the queue limit 429; past the wait limit 503.

    A worker spends over 3 s importing before it can be Ready, so a 1 s wait always runs out.
    """
    config = tmp_path / "models.yaml"
    config.write_text("models: []\n")
    server = start_server(config, tmp_path / "state", "--queue-limit", "1", "--load-wait-timeout", "1")
    try:
        server.write_config(f"models:\n  - name: late\n    source: {tiny_model}\n")
        server.wait_for(lambda s: s.phases().get("late") in ("Pending", "Loading"), 20, "late loading")
        results = {}
        waiter = threading.Thread(target=lambda: results.update(w=server.post("/v1/chat/completions", json=_chat("late"))))
        waiter.start()
        server.wait_for(lambda s: any(x.labels.get("model") == "late" and x.value == 1
                                      for x in _samples(s, "lmx_queue_depth")), 5, "first request queued")
        second = server.post("/v1/chat/completions", json=_chat("late"))
        waiter.join(30)
        assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
        assert results["w"].status_code == 503 and results["w"].headers["retry-after"]
        assert results["w"].json()["error"]["code"] == "model_loading"
        server.wait_ready("late")
        assert server.post("/v1/chat/completions", json=_chat("late")).status_code == 200
    finally:
        stop_and_check(server)


def test_anthropic_sdk_messages_and_responses_pass_through(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused")
    message = client.messages.create(model="a", max_tokens=5, messages=[{"role": "user", "content": "hello"}])
    assert message.content and message.content[0].type == "text"
    with client.messages.stream(model="a", max_tokens=5, messages=[{"role": "user", "content": "hello"}]) as stream:
        text = "".join(stream.text_stream)
    assert text
    response = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").responses.create(
        model="a", input="hello", max_output_tokens=5)
    assert response.output_text
