"""Issue 19 acceptance with real workers: under tight budgets the default start mode (a template
on Linux) decides what stays resident exactly as cold starts do, because the engine's helpers
yield where they would cost a model anything; and where the template is kept, a forked worker
counts its own pages and the template's figure stays put as workers come and go.

Each scenario runs twice, with the default start mode (no mode named) and with `cold`."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.lmx_harness import lmx_env

pytestmark = pytest.mark.e2e
MiB = 1024**2

MODES = ["default", "cold"]


def env_for(mode: str) -> dict[str, str]:
    """The default start mode is what a user gets: no mode named anywhere (LMX_ENGINE_START unset)."""
    return lmx_env(LMX_ENGINE_START="" if mode == "default" else "cold")


def entry(name: str, source, extra: str = "", memory: str | None = "600MiB") -> str:
    return f"  - name: {name}\n    source: {source}\n" + (f"    memory: {memory}\n" if memory else "") + extra


def chat(server, model: str, timeout: float = 180):
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=timeout, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def status(server, name: str) -> dict:
    return next(m["status"] for m in server.admin_models()["models"] if m["name"] == name)


def observed(server) -> dict:
    return server.admin_models()["observed"]


def events(server, name: str | None = None) -> list[str]:
    return [e["reason"] for e in server.get("/admin/events").json()["events"] if name is None or e["object"] == name]


def check_start(server, mode: str) -> None:
    """Under these budgets the template cannot be afforded: in the default mode it yields and says
    so; nothing that a cold server would serve is refused."""
    start = observed(server)["engine_start"]
    assert start["mode"] == "cold"
    if mode == "default":
        assert start["wanted"] == "template" and "using cold starts" in start["yielded"]
        assert "FastStartYielded" in events(server, "engine")
    else:
        assert start["wanted"] == "cold" and start["yielded"] is None


@pytest.mark.parametrize("mode", MODES)
def test_priority_and_source_swaps_under_a_budget_for_one(serve, tiny_model, tiny_model_b, mode):
    head = "memory: {budget: 1000MiB, reserve: 0}\ndefaults: {engine: {max_tokens: 8}}\nmodels:\n"
    server = serve(head + entry("lo", tiny_model, "    priority: 5\n") + entry("hi", tiny_model_b, "    priority: 1\n"),
                   env=env_for(mode))
    server.wait_ready("lo")
    server.wait_for(lambda s: s.phases()["hi"] == "Unschedulable", 30, "hi Unschedulable")
    # Raise the other's priority: the swap completes (it never did with the template's swinging figure).
    server.write_config(head + entry("lo", tiny_model, "    priority: 5\n") + entry("hi", tiny_model_b, "    priority: 9\n"))
    server.wait_ready("hi", timeout=90)
    server.wait_for(lambda s: s.phases()["lo"] == "Unschedulable", 30, "lo evicted")
    assert chat(server, "hi").status_code == 200

    # Repeated source swaps of one model with a client asking throughout: every swap completes and
    # no request fails (each drains the old worker only for a successor that fits what it frees).
    codes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            codes.append(chat(server, "hi").status_code)

    asker = threading.Thread(target=client)
    asker.start()
    try:
        for source in (tiny_model, tiny_model_b, tiny_model):
            old = status(server, "hi")["pid"]
            server.write_config(head + entry("lo", tiny_model, "    priority: 5\n")
                                + entry("hi", source, "    priority: 9\n"))
            server.wait_for(lambda s: (lambda st: st["phase"] == "Ready" and st["pid"] not in (None, old))(
                status(s, "hi")), 90, f"hi swapped to {source.name}")
    finally:
        stop.set()
        asker.join(200)
    assert codes and set(codes) == {200}, codes
    assert "LoadCancelled" not in events(server, "hi")
    check_start(server, mode)


@pytest.mark.parametrize("mode", ["default"])  # cold starts: tests/e2e/test_demand_swap.py runs this traffic cold
def test_alternating_clients_on_two_on_demand_models_beside_a_loaded_one(serve, tiny_model, tiny_model_b, mode):
    head = ("memory: {budget: 1300MiB, reserve: 0}\n"
            "defaults: {engine: {max_tokens: 8}, demand: {min_residency: 1s, serve_queue: 1s}}\nmodels:\n")
    server = serve(head + entry("base", tiny_model) + entry("a", tiny_model, "    state: on-demand\n")
                   + entry("b", tiny_model_b, "    state: on-demand\n"), "--load-wait-timeout", "170",
                   env=env_for(mode))
    server.wait_ready("base")
    codes: list[tuple[str, int]] = []

    def client(first: int) -> None:
        for turn in range(4):
            model = ("a", "b")[(first + turn) % 2]
            codes.append((model, chat(server, model).status_code))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(400)
    assert len(codes) == 8 and {code for _model, code in codes} == {200}, codes
    assert "EvictedByDemand" in events(server, "a") + events(server, "b")
    assert not {"Evicted", "EvictedByDemand"} & set(events(server, "base"))
    check_start(server, mode)


@pytest.mark.parametrize("mode", MODES)
def test_many_tiny_models_under_a_small_budget_are_all_ready(serve, tiny_model, tiny_model_b, mode):
    """No `memory:` overrides: each cold worker is estimated at 512 MiB + its weights and KV, and the
    budget holds four of those and not a template beside them."""
    head = "memory: {budget: 2100MiB, reserve: 0}\ndefaults: {engine: {max_tokens: 8}}\nmodels:\n"
    names = ["m1", "m2", "m3", "m4"]
    server = serve(head + "".join(entry(n, (tiny_model, tiny_model_b)[i % 2], memory=None)
                                  for i, n in enumerate(names)), env=env_for(mode))
    server.wait_ready(*names, timeout=240)
    for name in names:
        assert chat(server, name).status_code == 200
    memory = observed(server)["memory"]
    assert memory["held_bytes"] <= memory["budget_bytes"]
    check_start(server, mode)


def test_forked_workers_count_their_own_pages_and_the_template_figure_stays_put(serve, tiny_model, tiny_model_b):
    """Where the budget holds the template, workers fork from it: each counts what it alone holds
    (tens of MiB, not the ~500 MiB a cold worker holds) and the template's fixed cost does not
    swing as workers come and go (it swung with PSS before)."""
    head = "memory: {budget: 3GiB, reserve: 0}\ndefaults: {engine: {max_tokens: 8}}\nmodels:\n"
    server = serve(head.replace("models:\n", "models: []\n"), env=env_for("default"))
    server.wait_for(lambda s: observed(s)["engine_start"]["forked_loads"], 240, "the template waiting")
    names = ["f1", "f2", "f3"]
    server.write_config(head + "".join(entry(n, (tiny_model, tiny_model_b)[i % 2], memory=None)
                                       for i, n in enumerate(names)))
    server.wait_ready(*names, timeout=120)
    for name in names:
        assert chat(server, name).status_code == 200
    server.wait_for(lambda s: all(w["measured_bytes"] for w in observed(s)["workers"]), 30, "workers measured")
    seen = observed(server)
    assert seen["engine_start"]["mode"] == "template" and seen["engine_start"]["yielded"] is None
    fixed = seen["memory"]["fixed_bytes"]
    assert 200 * MiB < fixed < 1024 * MiB, fixed  # the template's own memory, counted once
    for worker in seen["workers"]:
        assert worker["forked"] and worker["measured_bytes"] < 200 * MiB, worker  # its own pages only
        assert worker["bytes"] == worker["measured_bytes"]
    for name in names:
        assert status(server, name)["estimated_bytes"] < 200 * MiB  # planned as a forked worker

    # Workers exit: the template's figure (what it holds itself) does not move with them.
    server.write_config(head + entry("f1", tiny_model, memory=None))
    server.wait_for(lambda s: len(observed(s)["workers"]) == 1, 60, "two workers gone")
    time.sleep(1.0)
    after = observed(server)["memory"]["fixed_bytes"]
    assert abs(after - fixed) < 0.05 * fixed, (fixed, after)
