"""Issue 4 acceptance: 16 streaming clients on A see no failure while A is swapped twice and B comes and goes."""

from __future__ import annotations

import threading

import openai
import pytest

pytestmark = pytest.mark.e2e


def _config(model_a, a_max_tokens: int, model_b=None) -> str:
    text = ("models:\n"
            f"  - name: a\n    source: {model_a}\n"
            f"    engine: {{continuous_batching: true, max_tokens: {a_max_tokens}}}\n")
    if model_b is not None:
        text += f"  - name: b\n    source: {model_b}\n"
    return text


def _pid(server, name):
    return next(m for m in server.admin_models()["models"] if m["name"] == name)["status"]["pid"]


def test_streams_survive_swaps_loads_and_unloads(serve, tiny_model, tiny_model_b):
    server = serve(_config(tiny_model, 200))
    server.wait_ready("a")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def stream_forever(index: int) -> None:
        while not stop.is_set():
            try:
                pieces, finish = 0, None
                for chunk in client.chat.completions.create(
                    model="a", stream=True, max_tokens=48,
                    messages=[{"role": "user", "content": f"story {index}"}],
                ):
                    if chunk.choices:
                        pieces += bool(chunk.choices[0].delta.content)
                        finish = chunk.choices[0].finish_reason or finish
                result = "ok" if finish in ("stop", "length") and pieces else f"incomplete finish={finish} pieces={pieces}"
            except Exception as error:  # noqa: BLE001 - every failure is what this test counts
                result = f"{type(error).__name__}: {error}"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=stream_forever, args=(i,), daemon=True) for i in range(16)]
    for thread in threads:
        thread.start()
    try:
        server.wait_for(lambda s: len(outcomes) >= 16, 120, "first round of streams")
        for max_tokens in (201, 202):  # two engine-option changes: two make-before-break swaps of A
            old = _pid(server, "a")
            server.write_config(_config(tiny_model, max_tokens))
            server.wait_for(lambda s: _pid(s, "a") not in (None, old) and s.phases()["a"] == "Ready", 120, "A swapped")
        server.write_config(_config(tiny_model, 202, tiny_model_b))
        server.wait_ready("a", "b")
        server.write_config(_config(tiny_model, 202))
        server.wait_for(lambda s: "b" not in s.phases(), 60, "B unloaded")
        done_before = len(outcomes)
        server.wait_for(lambda s: len(outcomes) >= done_before + 16, 120, "a round of streams after the changes")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    failures = [o for o in outcomes if o != "ok"]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed: {failures[:5]}"
    assert len(outcomes) >= 48
    events = server.get("/admin/events").json()["events"]
    assert sum(e["reason"] == "Ready" and e["object"] == "a" for e in events) >= 3
