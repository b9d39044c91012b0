"""Issue 10 through `lmx serve`: models load through the worker template (Linux) or a waiting
spare as models.yaml's `engine_start` says, a swap through it serves the right model under the
right name, such a worker is adopted after a control-plane crash, and SIGTERM leaves nothing."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from opta_lmx.engine.template import fork_supported
from tests.lmx_harness import worker_processes

pytestmark = pytest.mark.e2e
MODES = ["spare", pytest.param("template", marks=pytest.mark.skipif(not fork_supported(), reason="Linux only"))]


def _config(mode: str, source=None) -> str:
    text = f"engine_start: {{mode: {mode}}}\nmodels:{' []' if source is None else ''}\n"
    if source is not None:
        text += f"  - name: a\n    source: {source}\n    engine: {{max_tokens: 8}}\n"
    return text


def _waiting(server, mode: str) -> bool:
    """The template or a spare has imported and waits (each says so in its log)."""
    root = server.state_dir / "workers"
    logs = [root / "template" / "template.log"] if mode == "template" else list(root.glob("spares/*/spare.log"))
    return any(path.exists() and f"{mode}: waiting" in path.read_text(errors="replace") for path in logs)


def _record(server, pid: int) -> dict:
    records = [json.loads(p.read_text()) for p in (server.state_dir / "workers" / "records").glob("*.json")]
    return next(r for r in records if r["pid"] == pid)


def _ready_pid(server, other_than=None) -> int:
    server.wait_for(lambda s: s.phases().get("a") == "Ready"
                    and s.admin_models()["models"][0]["status"]["pid"] not in (None, other_than), 180, "a Ready")
    return server.admin_models()["models"][0]["status"]["pid"]


def _answer(server) -> str:
    response = server.post("/v1/chat/completions", json={
        "model": "a", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "a"
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("mode", MODES)
def test_serve_loads_and_swaps_through_fast_starts_and_leaves_nothing(serve, tiny_model, tiny_model_b, mode):
    first = serve(_config(mode))
    first.wait_for(lambda s: _waiting(s, mode), 240, f"the {mode} waiting")
    first.write_config(_config(mode, tiny_model))
    pid = _ready_pid(first)
    record = _record(first, pid)
    assert record["started_through"] == mode and record["source"] == str(tiny_model)
    before = _answer(first)

    # A swap to other weights also goes through the fast path (a spare refills a few s after a take).
    first.wait_for(lambda s: _waiting(s, mode) and len(worker_processes(s.state_dir)) >= 2, 240, "a refill")
    first.write_config(_config(mode, tiny_model_b))
    new_pid = _ready_pid(first, other_than=pid)
    record = _record(first, new_pid)
    assert record["started_through"] == mode and record["source"] == str(tiny_model_b)
    assert _answer(first) != before, "the swapped worker answers like the old model"
    first.wait_for(lambda s: not psutil.pid_exists(pid), 30, "the old worker gone")

    # A control-plane crash: the fast-started worker is adopted, the waiting ones end by themselves.
    waiting = [p.pid for p in worker_processes(first.state_dir) if p.pid != new_pid]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in waiting):
        assert time.monotonic() < deadline, "a template or spare outlived the control plane"
        time.sleep(0.2)
    (first.state_dir / "workers" / "template" / "template.log").unlink(missing_ok=True)  # a new one will wait
    second = serve(_config(mode, tiny_model_b))
    assert _ready_pid(second) == new_pid, "the worker was not adopted"
    assert _record(second, new_pid)["started_through"] == mode
    _answer(second)

    # SIGTERM: the worker, and the template or spares, are all gone (the fixture checks too).
    second.wait_for(lambda s: _waiting(s, mode), 240, f"the {mode} waiting again")
    assert second.stop(signal.SIGTERM) == 0
    assert worker_processes(second.state_dir) == []
