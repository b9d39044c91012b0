"""Issue 3 acceptance with real workers on generated models, sharing one server:
a swap under a budget that fits one model, priority eviction, a missing path ending Failed while
others serve, a SIGKILLed worker coming back Ready, on-demand load and idle unload, `lmx plan`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from tests.lmx_harness import REPO, lmx_env

pytestmark = pytest.mark.e2e

# `memory:` overrides make the numbers deterministic: the 1000 MiB budget fits one 600 MiB model.
HEAD = "memory: {budget: 1000MiB, reserve: 0}\ndefaults: {engine: {max_tokens: 8}}\nmodels:\n"


def entry(name: str, source, extra: str = "", memory: str = "600MiB") -> str:
    return f"  - name: {name}\n    source: {source}\n    memory: {memory}\n{extra}"


def chat(server, model: str, max_tokens: int = 3):
    return server.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})


def status(server, name: str) -> dict:
    return next(m["status"] for m in server.admin_models()["models"] if m["name"] == name)


def events(server, name: str) -> list[str]:
    return [e["reason"] for e in server.get("/admin/events").json()["events"] if e["object"] == name]


def test_memory_aware_reconciliation(serve, tiny_model, tiny_model_b):
    server = serve(HEAD + entry("a", tiny_model))
    server.wait_ready("a")
    old_pid = status(server, "a")["pid"]
    assert status(server, "a")["estimated_bytes"] == 600 * 1024**2
    assert status(server, "a")["measured_bytes"] > 100 * 1024**2  # the worker's RSS

    # 1. Swap under a budget that fits one: drain, unload, then load. Requests sent meanwhile wait.
    results: list[int] = []
    server.write_config(HEAD + entry("a", tiny_model_b))
    senders = [threading.Thread(target=lambda: results.append(chat(server, "a").status_code)) for _ in range(3)]
    for sender in senders:
        sender.start()
    server.wait_for(lambda s: (lambda st: st["phase"] == "Ready" and st["pid"] not in (None, old_pid))(status(s, "a")),
                    90, "swapped a")  # phase and pid from one read: the new worker, Ready
    for sender in senders:
        sender.join(60)
    assert results == [200, 200, 200]
    assert {"Replaced", "WaitingForMemory", "Unloaded"} <= set(events(server, "a"))
    assert not psutil.pid_exists(old_pid)
    swap_events = [e for e in server.get("/admin/events").json()["events"] if e["object"] == "a"]
    unloaded_at = max(e["seq"] for e in swap_events if e["reason"] == "Unloaded")
    loading_at = max(e["seq"] for e in swap_events if e["reason"] == "Loading")
    assert unloaded_at < loading_at, "the new worker started before the old one was gone"

    # 2. Priority eviction: `hi` evicts `a` (drained first); `a` says how much memory it lacks.
    a_pid = status(server, "a")["pid"]
    server.write_config(HEAD + entry("a", tiny_model_b) + entry("hi", tiny_model, "    priority: 10\n"))
    server.wait_ready("hi")
    server.wait_for(lambda s: s.phases()["a"] == "Unschedulable", 30, "a Unschedulable")
    a = status(server, "a")
    assert "200.0 MiB missing" in a["message"], a["message"]
    assert {"type": "Scheduled", "status": "False"}.items() <= next(
        c for c in a["conditions"] if c["type"] == "Scheduled").items()
    assert "Evicted" in events(server, "a") and not psutil.pid_exists(a_pid)
    refused = chat(server, "a")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unschedulable"
    assert chat(server, "hi").status_code == 200

    # 3. A missing path ends Failed, with the reason, while `hi` keeps serving.
    base = HEAD + entry("hi", tiny_model, "    priority: 10\n")
    server.write_config(base + entry("broken", "/nonexistent/model", memory="10MiB"))
    server.wait_for(lambda s: s.phases().get("broken") == "Failed", 30, "broken Failed")
    assert "does not exist" in status(server, "broken")["message"]
    assert chat(server, "hi").status_code == 200 and server.phases()["hi"] == "Ready"

    # 4. SIGKILL of a worker: it comes back Ready, with a restart counted.
    hi_pid = status(server, "hi")["pid"]
    os.kill(hi_pid, signal.SIGKILL)
    server.wait_for(lambda s: (lambda st: st["phase"] == "Ready" and st["pid"] not in (None, hi_pid))(status(s, "hi")),
                    90, "hi back Ready")
    assert status(server, "hi")["restarts"] == 1 and "WorkerExited" in events(server, "hi")
    assert chat(server, "hi").status_code == 200

    # 5. On demand: not loaded until asked; the request waits for it; unloaded after idle_ttl.
    server.write_config(base + entry("od", tiny_model_b, "    state: on-demand\n    idle_ttl: 2s\n", "100MiB"))
    server.wait_for(lambda s: s.phases().get("od") == "Unloaded", 20, "od standby")
    assert server.admin_models()["converged"]
    assert chat(server, "od").status_code == 200
    server.wait_for(lambda s: s.phases().get("od") == "Unloaded" and "IdleUnload" in events(s, "od"), 30,
                    "od unloaded when idle")

    # 6. `lmx plan` against the running server prints what an edit would do, without doing it.
    proposed = server.config.with_name("proposed.yaml")
    proposed.write_text(HEAD + entry("hi", tiny_model, "    priority: 10\n") + entry("a", tiny_model_b, "    priority: 20\n"))
    out = subprocess.run([sys.executable, "-m", "opta_lmx.cli", "plan", "--config", str(proposed),
                          "--server", server.base_url], capture_output=True, text=True, env=lmx_env(), cwd=REPO,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "unload hi [evicted]" in out.stdout and "load   a after 1" in out.stdout, out.stdout
    assert "held now 600.0 MiB -> after 600.0 MiB" in out.stdout, out.stdout
    assert server.phases()["hi"] == "Ready"  # nothing was done
