"""The fleet's placement rule (issue 21), pure: which host runs a model, from the hosts' health and
what they report; and a host's share of the file."""

from __future__ import annotations

from opta_lmx.reconciler.fleet import Fleet, place
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import Phase

R, L, U = Phase.READY, Phase.LOADING, Phase.UNSCHEDULABLE


def model(*hosts: str, name: str = "m") -> ModelSpec:
    return ModelSpec(name=name, source="/m", hosts=list(hosts))


def test_a_model_naming_no_hosts_runs_on_every_host():
    assert place(model(), "b", {}, {}, None, False).host == "b"


def test_the_first_host_up_and_with_room_runs_it():
    m = model("a", "b", "c")
    assert place(m, "b", {"a": True, "c": True}, {"a": {"m": L}}, None, False).host == "a"
    assert place(m, "c", {"a": True, "b": True}, {}, None, False).host == "a"
    down = place(m, "b", {"a": False, "c": True}, {}, None, False)
    assert down.host == "b" and "a unreachable" in down.reason
    full = place(m, "c", {"a": True, "b": True}, {"a": {"m": U}, "b": {"m": Phase.FAILED}}, None, False)
    assert full.host == "c" and "a: Unschedulable" in full.reason and "b: Failed" in full.reason
    assert place(m, "a", {"b": True, "c": True}, {}, None, False).host == "a"


def test_a_returning_host_takes_the_model_back_only_once_it_serves_it():
    m = model("a", "b")
    # b stood in while a was down; a is back and loading: b keeps serving
    keep = place(m, "b", {"a": True}, {"a": {"m": L}}, R, False)
    assert keep.host == "b" and "until a" in keep.reason
    # a serves it: b lets go (its worker drains: the requests in flight finish)
    assert place(m, "b", {"a": True}, {"a": {"m": R}}, R, False).host == "a"
    # a host that does not serve it does not hold on
    assert place(m, "b", {"a": True}, {"a": {"m": L}}, None, False).host == "a"


def test_a_host_without_room_yields_while_the_next_serves_it():
    m = model("a", "b")
    assert place(m, "a", {"b": True}, {"b": {"m": R}}, Phase.UNLOADED, True).host == "b"
    assert place(m, "a", {"b": True}, {"b": {"m": L}}, U, True).host == "a"  # nobody serves it yet: keep trying
    assert place(m, "a", {"b": True}, {"b": {"m": R}}, Phase.UNLOADED, False).host == "a"  # retry after a while


def test_no_host_of_the_list_can_run_it():
    placed = place(model("a", "b"), "c", {"a": False, "b": True}, {"b": {"m": U}}, None, False)
    assert placed.host is None and "a unreachable" in placed.reason


def fleet_state(*models: ModelSpec) -> DesiredState:
    return DesiredState.model_validate({
        "fleet": {"hosts": [{"name": "a", "url": "http://127.0.0.1:1", "budget": "2GiB"},
                            {"name": "b", "url": "http://127.0.0.1:2"}], "grace": "10s"},
        "models": [m.model_dump(exclude_unset=True) for m in models]})


def test_a_hosts_share_unloads_what_runs_elsewhere_and_takes_over_after_the_grace():
    now = [1000.0]
    fleet = Fleet("b", "key", lambda: now[0])
    desired = fleet_state(model("a", "b", name="first-a"), model("b", "a", name="first-b"), model(name="everywhere"))
    share = fleet.share(desired, {})
    states = {m.name: m.state for m in share.models}
    assert states == {"first-a": DesiredModelState.UNLOADED, "first-b": DesiredModelState.LOADED,
                      "everywhere": DesiredModelState.LOADED}
    assert fleet.target("first-a") == ("a", "http://127.0.0.1:1") and fleet.target("first-b") is None
    assert share.memory.budget == "75%"  # b names no budget of its own
    now[0] += 11  # a never answered within the grace: b takes its model
    share = fleet.share(desired, {})
    assert {m.name: m.state for m in share.models}["first-a"] == DesiredModelState.LOADED
    assert fleet.placements["first-a"].here and fleet.target("first-a") is None
    a_view = Fleet("a", "key", lambda: now[0]).share(desired, {})
    assert a_view.memory.budget == "2GiB"  # a's own budget


def test_requests_go_to_a_host_serving_the_model_in_its_order():
    now = [0.0]
    fleet = Fleet("c", "key", lambda: now[0])
    desired = DesiredState.model_validate({
        "fleet": {"hosts": [{"name": n, "url": f"http://127.0.0.1:{i}"} for i, n in enumerate("abc", 1)]},
        "models": [{"name": "m", "source": "/m", "hosts": ["a", "b"]}]})
    fleet.share(desired, {})
    fleet.peers["a"].phases, fleet.peers["b"].phases = {"m": L}, {"m": R}
    fleet.peers["a"].last_ok = fleet.peers["b"].last_ok = now[0]
    fleet.share(desired, {})
    assert fleet.target("m") == ("b", "http://127.0.0.1:2")  # b serves it now
    fleet.peers["a"].phases = {"m": R}
    assert fleet.target("m") == ("a", "http://127.0.0.1:1")  # both serve it: the preferred one
    listed = fleet.listing("m", "Unloaded", False)
    assert listed["host"] == "a" and listed["status"] == "Ready" and listed["resident"] is True


def test_a_peer_going_down_between_polls_asks_for_a_pass(monkeypatch):
    """The grace runs out between two polls (found by bench/fleet.py: failover waited for the 15 s
    resync instead of the 3 s grace)."""
    import asyncio

    import httpx

    from opta_lmx.reconciler import fleet as fleet_module

    monkeypatch.setattr(fleet_module, "POLL_INTERVAL", 0.01)
    now = [0.0]
    answering = [True]

    def answer(request: httpx.Request) -> httpx.Response:
        if not answering[0]:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"host": "a", "models": {"m": "Ready"}})

    async def scenario() -> list[float]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        fleet = Fleet("b", "key", lambda: now[0], client=client)
        fleet.configure(fleet_state())
        nudges: list[float] = []
        watching = asyncio.create_task(fleet.watch(lambda: nudges.append(now[0])))
        await asyncio.sleep(0.1)
        answering[0] = False  # a dies; its last answer was at t=0
        await asyncio.sleep(0.1)
        before = len(nudges)
        now[0] = 10.5  # the grace (10 s) runs out while nobody polls
        await asyncio.sleep(0.1)
        watching.cancel()
        await client.aclose()
        assert not fleet.up("a")
        return nudges[before:]

    assert asyncio.run(scenario()) == [10.5]


def test_a_distributed_model_starts_on_rank_zero_once_every_rank_is_up_and_counts_on_every_rank():
    now = [0.0]
    desired = DesiredState.model_validate({
        "fleet": {"hosts": [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}],
                  "grace": "5s"},
        "memory": {"reserve": 1000},
        "models": [{"name": "big", "source": "/m", "distributed": {"hosts": ["a", "b"]}}]})
    size = {"big": 8000}
    rank0, rank1 = Fleet("a", "k", lambda: now[0]), Fleet("b", "k", lambda: now[0])
    on_a = rank0.share(desired, {}, lambda m: size[m.name])
    on_b = rank1.share(desired, {}, lambda m: size[m.name])
    assert on_a.models[0].state == DesiredModelState.LOADED and on_a.memory.reserve_bytes() == 1000
    assert on_b.models[0].state == DesiredModelState.UNLOADED and on_b.memory.reserve_bytes() == 1000 + 4000
    assert rank1.target("big") == ("a", "http://127.0.0.1:1")
    now[0] = 6  # b never answered a: a waits for it, and runs nothing half
    on_a = rank0.share(desired, {}, lambda m: size[m.name])
    assert on_a.models[0].state == DesiredModelState.UNLOADED
    assert rank0.placements["big"].host is None and "waiting for b" in rank0.placements["big"].reason
