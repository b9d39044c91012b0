"""Issue 11 acceptance with real workers: demand swaps on-demand models in and out of a budget
that holds the `loaded` model plus one more, answering every request; a pinned or
higher-priority on-demand model is never evicted for another (a clear 503 instead)."""

from __future__ import annotations

import threading

import httpx
import pytest

pytestmark = pytest.mark.e2e

# `memory:` overrides make the numbers deterministic: 1300 MiB holds two 600 MiB models.
HEAD = ("memory: {budget: 1300MiB, reserve: 0}\n"
        "defaults: {engine: {max_tokens: 8}, demand: {min_residency: 2s, serve_queue: 1s}}\nmodels:\n")


def entry(name: str, source, extra: str = "") -> str:
    return f"  - name: {name}\n    source: {source}\n    memory: 600MiB\n{extra}"


def chat(server, model: str):
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=180, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def status(server, name: str) -> dict:
    return next(m["status"] for m in server.admin_models()["models"] if m["name"] == name)


def events(server, name: str) -> list[str]:
    return [e["reason"] for e in server.get("/admin/events").json()["events"] if e["object"] == name]


def metric(server, prefix: str) -> float:
    lines = [line for line in server.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_four_clients_alternating_between_two_on_demand_models_are_all_answered(serve, tiny_model, tiny_model_b):
    server = serve(HEAD + entry("base", tiny_model) + entry("a", tiny_model, "    state: on-demand\n")
                   + entry("b", tiny_model_b, "    state: on-demand\n    aliases: [bee]\n")
                   + entry("off", tiny_model, "    state: unloaded\n"), "--load-wait-timeout", "170")
    server.wait_ready("base")
    base_pid = status(server, "base")["pid"]

    listed = {m["id"]: m for m in server.get("/v1/models").json()["data"]}
    assert set(listed) == {"base", "a", "b", "bee"}  # `off` (desired unloaded) is not offered
    assert listed["a"]["state"] == "on-demand" and listed["a"]["status"] == "Unloaded" and not listed["a"]["resident"]
    assert listed["bee"]["alias_of"] == "b" and listed["base"]["resident"]

    codes: list[tuple[str, int]] = []

    def client(first: int) -> None:
        for turn in range(3):
            model = ("a", "bee")[(first + turn) % 2]
            codes.append((model, chat(server, model).status_code))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(400)
    assert not any(thread.is_alive() for thread in clients)
    assert len(codes) == 12 and {code for _model, code in codes} == {200}, codes

    assert events(server, "a").count("Ready") >= 1 and events(server, "b").count("Ready") >= 1
    assert "EvictedByDemand" in events(server, "a") + events(server, "b")
    assert status(server, "base")["pid"] == base_pid
    assert not {"Evicted", "EvictedByDemand", "Unloaded", "WorkerExited"} & set(events(server, "base"))
    assert metric(server, "lmx_demand_evictions_total") >= 1
    assert metric(server, 'lmx_worker_unloads_total{reason="demand"}') >= 1
    assert metric(server, 'lmx_load_wait_seconds_count{model="b"}') >= 1
    resident = [m for m in ("a", "b") if status(server, m)["phase"] == "Ready"]
    assert resident and "resident on demand: last request at" in status(server, resident[0])["message"]
    assert "resident because desired loaded in models.yaml" in status(server, "base")["message"]


def test_pinned_and_higher_priority_on_demand_models_are_not_evicted_for_a_request(serve, tiny_model, tiny_model_b):
    server = serve(HEAD + entry("base", tiny_model) + entry("p", tiny_model, "    state: on-demand\n    pinned: true\n")
                   + entry("b", tiny_model_b, "    state: on-demand\n"))
    server.wait_ready("base")
    assert chat(server, "p").status_code == 200
    p_pid = status(server, "p")["pid"]

    refused = chat(server, "b")
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_unschedulable" and refused.headers["x-should-retry"] == "false"
    assert "p (pinned)" in error["message"] and "base (desired loaded in models.yaml)" in error["message"]

    # The same worker, no longer pinned but of a higher priority (the fingerprint is unchanged).
    server.write_config(HEAD + entry("base", tiny_model) + entry("p", tiny_model, "    state: on-demand\n"
                                                                 "    priority: 5\n")
                        + entry("b", tiny_model_b, "    state: on-demand\n"))
    server.wait_for(lambda s: s.get("/admin/models").json()["generation"] >= 2, 30, "generation 2")
    refused = chat(server, "b")
    assert refused.status_code == 503
    assert "p (on-demand with priority 5, higher than b's 0)" in refused.json()["error"]["message"]
    assert status(server, "p")["pid"] == p_pid and status(server, "p")["phase"] == "Ready"
    assert "EvictedByDemand" not in events(server, "p")


def test_a_client_that_goes_away_stops_waiting_and_its_demand_ends(serve, tiny_model, tiny_model_b):
    # `a` stays at least an hour once Ready, so a request for `b` waits (it is not refused).
    server = serve(HEAD.replace("min_residency: 2s", "min_residency: 1h") + entry("base", tiny_model)
                   + entry("a", tiny_model, "    state: on-demand\n") + entry("b", tiny_model_b, "    state: on-demand\n"))
    server.wait_ready("base")
    assert chat(server, "a").status_code == 200
    outcome: list[BaseException] = []

    def impatient() -> None:
        try:
            httpx.post(server.base_url + "/v1/chat/completions", timeout=8, json={
                "model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        except httpx.ReadTimeout as error:
            outcome.append(error)

    client = threading.Thread(target=impatient)
    client.start()
    server.wait_for(lambda s: status(s, "b")["reason"] == "WaitingForSwap", 8, "b waiting for a")
    assert "a is resident for" in status(server, "b")["message"]
    client.join(30)
    assert len(outcome) == 1  # the client gave up and closed its connection
    # The gateway notices the disconnect, unregisters the waiter, and the loop drops the demand.
    server.wait_for(lambda s: status(s, "b")["reason"] == "Standby", 30, "b back on standby")
    assert metric(server, 'lmx_queue_depth{model="b"}') == 0
    assert status(server, "a")["phase"] == "Ready"
