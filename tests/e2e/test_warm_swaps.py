"""Issue 23 with real workers: a model's prefix cache outlives its worker. It is saved when the
worker is unloaded (an event says what the save cost), read back by the model's next worker after a
swap-back or a control-plane restart, its SSD tier survives a worker crash, a changed KV option
never reuses it, and it can be listed and cleared. Default start mode (no mode named).

vllm-mlx logs what its prefix cache does: `LOADED n entries` at start, `[cache_fetch] ... HIT` and
`[ssd_promote]` per request; the tests read those lines in the worker's own log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.lmx_harness import REPO, lmx_env, start_server, stop_and_check

pytestmark = pytest.mark.e2e

SYSTEM = " ".join(f"rule{i}" for i in range(250))  # ~1,200 tokens with the tiny model's tokenizer
OTHER = " ".join(f"fact{i}" for i in range(250))


def config(source, state: str = "loaded", extra: str = "") -> str:
    return (f"models:\n  - name: m\n    source: {source}\n    state: {state}\n"
            f"    engine:\n      continuous_batching: true\n{extra}")


def ask(server, system: str, turn: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    """One request: the system prompt, earlier (user, answer) turns, then `turn`; the answer."""
    messages = [{"role": "system", "content": system}]
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": turn})
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": "m", "max_tokens": 3, "temperature": 0, "messages": messages})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"] or ""


def newest_log(server) -> str:
    logs = sorted((server.state_dir / "logs" / "m").glob("*.log"))
    return logs[-1].read_text(errors="replace")


def loaded_entries(log: str) -> int:
    found = re.findall(r"LOADED (\d+) entries", log)
    return int(found[-1]) if found else 0


def reasons(server) -> list[str]:
    return [e["reason"] for e in server.get("/admin/events").json()["events"] if e["object"] == "m"]


def cache_status(server) -> dict | None:
    return next(m["status"] for m in server.admin_models()["models"] if m["name"] == "m").get("prefix_cache")


def lmx(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opta_lmx.cli", *args, "--server", server.base_url],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=lmx_env())


def unload(server, source) -> None:
    server.write_config(config(source, "unloaded"))
    server.wait_for(lambda s: s.phases().get("m") == "Unloaded", 60, "m Unloaded")


def test_a_swapped_back_or_restarted_model_starts_from_its_saved_cache(serve, tiny_model, tmp_path):
    server = serve(config(tiny_model), env=lmx_env(LMX_ENGINE_START=""))
    server.wait_ready("m")
    ask(server, SYSTEM, "first turn")
    unload(server, tiny_model)
    assert "CacheSaved" in reasons(server)
    server.wait_for(lambda s: (cache_status(s) or {}).get("entries", 0) >= 1, 30, "the kept cache in status")
    kept = cache_status(server)
    assert kept["size_bytes"] > 0 and not kept["in_use"]

    server.write_config(config(tiny_model))  # swapped back
    server.wait_ready("m")
    ask(server, SYSTEM, "second turn")
    log = newest_log(server)
    assert loaded_entries(log) >= 1, log[-3000:]
    assert re.search(r"\[cache_fetch\] request=\S+ HIT prompt_tokens=(\d+) cached=(\d{3,})", log), log[-3000:]

    listed = lmx(server, "cache", "list")
    assert listed.returncode == 0 and re.search(r"^m\s", listed.stdout, re.M), listed.stdout + listed.stderr
    held = lmx(server, "cache", "clear", "m")  # its worker holds it: kept, and said
    assert held.returncode == 0 and "a running worker holds it" in held.stdout, held.stdout + held.stderr

    # A control-plane restart: the worker saves as the server stops; the next server's worker reads it.
    stop_and_check(server)
    again = start_server(server.config, server.state_dir, env=lmx_env(LMX_ENGINE_START=""))
    try:
        again.wait_ready("m")
        ask(again, SYSTEM, "third turn")
        assert loaded_entries(newest_log(again)) >= 2  # the first and second turns' entries

        # A changed KV option (max_kv_size) never reuses the cache: a new key, an empty cache,
        # and the old one removed once its worker is gone.
        old_key = cache_status(again)["key"] if cache_status(again) else None
        again.write_config(config(tiny_model, extra="      max_kv_size: 4096\n"))
        again.wait_for(lambda s: "LOADED" not in newest_log(s) and "No prefix cache entries" in newest_log(s)
                       and s.phases().get("m") == "Ready", 90, "a worker with a fresh cache")
        again.wait_for(lambda s: not (s.state_dir / "prefix-caches" / "m" / str(old_key)).exists(), 30,
                       "the old key's cache removed")
        unload(again, tiny_model)
        cleared = lmx(again, "cache", "clear", "m")
        assert cleared.returncode == 0 and "removed m/" in cleared.stdout, cleared.stdout + cleared.stderr
        assert not any((again.state_dir / "prefix-caches").glob("m/*"))
    finally:
        stop_and_check(again)


def ssd_entries(server) -> list[str]:
    """The SSD tier's indexed entries (vllm-mlx's SQLite index), as the data directories they name."""
    found = []
    for index in (server.state_dir / "prefix-caches" / "m").glob("*/ssd_cache/index.db"):
        with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
            found += [row[0] for row in db.execute("SELECT file_path FROM entries")]
    return found


def test_a_crashed_worker_keeps_what_its_ssd_tier_wrote(serve, tiny_model):
    """A 1 MB in-memory cache: the first conversation's entry is spilled to the SSD tier when the
    second one is stored. The worker is killed (nothing saved at shutdown) and comes back with
    backoff; its successor opens the same SSD tier, whose reconciliation at start keeps every
    indexed entry (an entry it could not read back would be removed as an orphan).

    (A later turn hits the SSD tier only when the stored tokens are an exact prefix of the new
    prompt; a client re-sending an answer re-tokenizes it, which can differ from the generated
    tokens: docs/reconciler.md, "Kept prefix caches".)"""
    server = serve(config(tiny_model, extra="      cache_memory_mb: 1\n"), env=lmx_env(LMX_ENGINE_START=""))
    server.wait_ready("m")
    ask(server, SYSTEM, "first turn")
    ask(server, OTHER, "another conversation")
    server.wait_for(lambda s: ssd_entries(s), 30, "an SSD tier entry")
    spilled = ssd_entries(server)
    pid = next(m["status"]["pid"] for m in server.admin_models()["models"] if m["name"] == "m")
    os.killpg(pid, signal.SIGKILL)
    server.wait_for(lambda s: s.phases().get("m") == "Ready"
                    and next(m["status"]["pid"] for m in s.admin_models()["models"] if m["name"] == "m") != pid,
                    120, "m back after the crash")
    assert "CacheSaved" not in reasons(server)
    ask(server, SYSTEM, "a new question")  # the successor serves with the tier open
    log = newest_log(server)
    assert re.search(r"SSD cache tier enabled: dir=\S+/home/\.cache/vllm-mlx/ssd_cache", log), log[-3000:]
    kept = ssd_entries(server)
    assert set(spilled) <= set(kept), (spilled, kept)
    data = next((server.state_dir / "prefix-caches" / "m").glob("*/ssd_cache/data"))
    assert all((data / entry).is_dir() for entry in spilled)


def test_an_on_demand_model_is_warm_on_its_first_request(serve, tiny_model, tmp_path):
    prompts = tmp_path / "warm.json"
    prompts.write_text(json.dumps([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]]))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    server = serve(config(tiny_model, "on-demand", f"    prefix_cache:\n      warm_prompts: {broken.name}\n"),
                   "--load-wait-timeout", "10", env=lmx_env(LMX_ENGINE_START=""))
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code in (502, 503), response.text  # said, not silently cold
    status = next(m["status"] for m in server.admin_models()["models"] if m["name"] == "m")
    assert "warm_prompts" in (status.get("last_error") or "") and "not JSON" in status["last_error"], status

    server.write_config(config(tiny_model, "on-demand", f"    prefix_cache:\n      warm_prompts: {prompts.name}\n"))
    server.wait_for(lambda s: s.get("/admin/models/m").json()["spec"]["prefix_cache"]["warm_prompts"] == prompts.name,
                    30, "the new file read")
    ask(server, SYSTEM, "a real question")
    log = newest_log(server)
    assert "Warm-up done" in log, log[-3000:]
    fetches = re.findall(r"\[cache_fetch\] request=\S+ (HIT|MISS)", log)
    assert fetches and fetches[-1] == "HIT", log[-3000:]  # the first real request, after the warm-up's own
    assert Path(prompts).exists()
