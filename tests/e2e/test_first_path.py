"""Issue 2 acceptance: models.yaml in, OpenAI answers out, with real workers on generated models."""

from __future__ import annotations

import signal
import time

import openai
import psutil
import pytest

from tests.lmx_harness import worker_processes

pytestmark = pytest.mark.e2e


def _config(*entries: str) -> str:
    return "# test models\nmodels:\n" + "".join(entries)


def _entry(name: str, source, aliases: str = "[]", extra: str = "") -> str:
    return f"  - name: {name}\n    source: {source}\n    aliases: {aliases}\n{extra}"


def test_openai_sdk_chat_stream_completion_and_models(serve, tiny_model):
    server = serve(_config(_entry("tiny", tiny_model, "[default, small-talk]",
                                  "    engine: {continuous_batching: true, max_tokens: 16}\n")))
    server.wait_ready("tiny")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")

    listed = {m.id for m in client.models.list().data}
    assert {"tiny", "default", "small-talk"} <= listed

    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert chat.model == "tiny"
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0

    pieces = []
    for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces, "the stream carried no content"

    completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
    assert completion.choices[0].text

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"

    status = server.admin_models()
    (model,) = status["models"]
    assert model["status"]["phase"] == "Ready"
    assert psutil.pid_exists(model["status"]["pid"])
    assert model["status"]["address"].startswith("http://127.0.0.1:")
    assert status["generation"] == status["observed_generation"] == 1


def test_live_edits_add_remove_and_invalid(serve, tiny_model, tiny_model_b):
    server = serve(_config(_entry("a", tiny_model)))
    server.wait_ready("a")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)

    # Added without a restart.
    server.write_config(_config(_entry("a", tiny_model), _entry("b", tiny_model_b, "[bee]")))
    server.wait_ready("a", "b")
    answer = client.chat.completions.create(model="bee", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.model == "b"
    b_pid = server.admin_models()["models"][1]["status"]["pid"]

    # An invalid file changes nothing live, and says where it is broken.
    server.write_config(_config(_entry("a", tiny_model), _entry("b", tiny_model_b, "[bee]", "    state: sometimes\n")))
    server.wait_for(lambda s: not s.admin_models()["config"]["valid"], 20, "invalid config reported")
    config = server.admin_models()["config"]
    problem = config["error"]["problems"][0]
    assert problem["path"] == "models[1].state" and problem["line"] == 9
    assert "models[1].state" in server.log()
    assert server.phases() == {"a": "Ready", "b": "Ready"}
    assert client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)

    # Removed: its worker is gone and its name answers 404.
    server.write_config(_config(_entry("a", tiny_model)))
    server.wait_for(lambda s: "b" not in s.phases() and not psutil.pid_exists(b_pid), 30, "b removed")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert server.admin_models()["config"]["valid"]


def test_changed_entry_replaces_worker(serve, tiny_model):
    server = serve(_config(_entry("a", tiny_model)))
    server.wait_ready("a")
    old_pid = server.admin_models()["models"][0]["status"]["pid"]
    server.write_config(_config(_entry("a", tiny_model, extra="    engine: {max_tokens: 7}\n")))
    server.wait_for(lambda s: s.admin_models()["models"][0]["status"]["pid"] not in (None, old_pid)
                    and s.phases()["a"] == "Ready", 60, "replacement worker")
    server.wait_for(lambda s: not psutil.pid_exists(old_pid), 20, "old worker gone")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_no_worker(serve, tiny_model, sig):
    server = serve(_config(_entry("a", tiny_model)))
    server.wait_ready("a")
    assert worker_processes(server.state_dir)
    assert server.stop(sig) == 0
    deadline = time.monotonic() + 10
    while worker_processes(server.state_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker_processes(server.state_dir) == []
