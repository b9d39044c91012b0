"""The fleet (docs/fleet.md): which host runs each model, from the hosts' health and status.

Every host runs the same rule over the same file and what its peers last said, so they agree
without a coordinator. A model that names hosts runs on the first of them that is up and has
room; a model naming none runs on every host that serves the file (a single-host file keeps
its meaning). Peers are asked for their status (`GET /fleet/status`, with the fleet key) every
`POLL_INTERVAL`; a peer that has not answered for `fleet.grace` is down.

No flapping: a host that returns (or gets room again) takes a model back only once it serves it:
the host that stood in keeps serving until the preferred host reports it Ready, then drains it.
A host that had no room for a model yields it to the next host and tries again only after
`RETRY_NO_ROOM` seconds, while that host serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import Phase

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
RETRY_NO_ROOM = 60.0
FLEET_KEY_HEADER = "x-lmx-fleet-key"
HOP_HEADER = "x-lmx-hop"  # names the host that forwarded a request: a forwarded request is never forwarded again
NOT_HERE = (Phase.UNSCHEDULABLE, Phase.FAILED)


@dataclass
class Peer:
    name: str
    url: str
    last_ok: float | None = None
    phases: dict[str, Phase] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self, up: bool) -> dict:
        return {"name": self.name, "url": self.url, "up": up, "last_ok": self.last_ok, "error": self.error,
                "models": {name: phase.value for name, phase in sorted(self.phases.items())}}


@dataclass(frozen=True)
class Placement:
    host: str | None  # None: no host of its list can run it now
    reason: str
    here: bool = False  # placed on the host that computed it


def place(model: ModelSpec, me: str, up: Mapping[str, bool], phases: Mapping[str, Mapping[str, Phase]],
          local: Phase | None, no_room_here: bool) -> Placement:
    """Where `model` runs, as seen from host `me` (pure: the fleet's rule, docs/fleet.md)."""
    if model.distributed is not None:  # rank 0's host starts it, once every rank's host is up
        ranks = model.distributed.hosts
        down = [h for h in ranks if h != me and not up.get(h)]
        if down:
            return Placement(None, f"distributed over {', '.join(ranks)}: waiting for {', '.join(down)}")
        return Placement(ranks[0], f"distributed over {', '.join(ranks)}: rank 0 serves it")
    if not model.hosts:
        return Placement(me, "names no hosts: runs on every host serving the file")
    passed: list[str] = []
    for index, host in enumerate(model.hosts):
        if host == me:
            later_serves = any(phases.get(h, {}).get(model.name) == Phase.READY
                               for h in model.hosts[index + 1:] if up.get(h))
            if no_room_here and later_serves:
                passed.append(f"{me} has no room")
                continue
            return Placement(me, _why(index, passed, "first host of its list"))
        if not up.get(host):
            passed.append(f"{host} unreachable")
            continue
        phase = phases.get(host, {}).get(model.name)
        if phase in NOT_HERE:
            passed.append(f"{host}: {phase.value if phase else '?'}")
            continue
        if local == Phase.READY and phase != Phase.READY and me in model.hosts[index + 1:]:
            return Placement(me, f"serving here until {host} (preferred) has it Ready")
        return Placement(host, _why(index, passed, "first host of its list"))
    return Placement(None, "no host of its list can run it: " + "; ".join(passed))


def _why(index: int, passed: list[str], first: str) -> str:
    return first if index == 0 or not passed else "first host up with room (" + "; ".join(passed) + ")"


class Fleet:
    """This host's view of the fleet: its peers' health and status, and each model's placement."""

    def __init__(self, me: str, key: str | None, clock: Callable[[], float], *,
                 client: httpx.AsyncClient | None = None):
        self.me, self.key, self.clock = me, key, clock
        self.started = clock()
        self.peers: dict[str, Peer] = {}
        self.grace = 30.0
        self.placements: dict[str, Placement] = {}
        self.orders: dict[str, list[str]] = {}  # each model's hosts, in its order of preference
        self.no_room: dict[str, float] = {}  # model -> when this host last had no room for it
        self._client = client
        self._wake = asyncio.Event()

    def configure(self, desired: DesiredState) -> None:
        self.grace = desired.fleet.grace_seconds()
        hosts = {h.name: h for h in desired.fleet.hosts if h.name != self.me}
        for name in list(self.peers):
            if name not in hosts:
                del self.peers[name]
        for name, host in hosts.items():
            peer = self.peers.setdefault(name, Peer(name, host.url))
            peer.url = host.url

    def up(self, name: str) -> bool:
        if name == self.me:
            return True
        peer = self.peers.get(name)
        if peer is None:
            return False
        return self.clock() - (peer.last_ok if peer.last_ok is not None else self.started) <= self.grace

    def share(self, desired: DesiredState, local: Mapping[str, Phase],
              size_of: Callable[[ModelSpec], int | None] = lambda _m: None) -> DesiredState:
        """The desired state this host reconciles: models placed elsewhere become `unloaded` here
        (so their statuses stay, and requests for them are forwarded), and this host's budget. A
        distributed model whose later rank runs here reserves its share of the model's memory
        (`size_of`: the model's planned bytes) off this host's budget, as `memory.reserve`."""
        self.configure(desired)
        now = self.clock()
        for name, phase in local.items():
            if phase == Phase.UNSCHEDULABLE:
                self.no_room.setdefault(name, now)
        self.no_room = {n: t for n, t in self.no_room.items() if now - t < RETRY_NO_ROOM}
        up = {name: self.up(name) for name in self.peers}
        phases = {name: peer.phases for name, peer in self.peers.items()}
        self.placements = {}
        for m in desired.models:
            if m.state != DesiredModelState.UNLOADED:
                where = place(m, self.me, up, phases, local.get(m.name), m.name in self.no_room)
                self.placements[m.name] = Placement(where.host, where.reason, where.host == self.me)
        self.orders = {m.name: list(m.hosts) for m in desired.models}
        models = [m if m.name not in self.placements or self.placements[m.name].here
                  else m.model_copy(update={"state": DesiredModelState.UNLOADED}) for m in desired.models]
        memory: dict = {}
        host = desired.fleet.host(self.me)
        if host is not None and host.budget is not None:
            memory["budget"] = host.budget
        ranks_here = [m for m in desired.models if m.distributed is not None and m.state != DesiredModelState.UNLOADED
                      and self.me in m.distributed.hosts[1:] and self.placements[m.name].host is not None]
        if ranks_here:
            memory["reserve"] = desired.memory.reserve_bytes() + sum(
                (size_of(m) or 0) // len(m.distributed.hosts) for m in ranks_here if m.distributed)
        update: dict = {"models": models}
        if memory:
            update["memory"] = desired.memory.model_copy(update=memory)
        return desired.model_copy(update=update)

    def target(self, name: str) -> tuple[str, str] | None:
        """The peer (name, url) a request for model `name` goes to, or None to serve it here: a peer
        serving it Ready first (in its list's order), else the host it is placed on."""
        placement = self.placements.get(name)
        if placement is None or placement.host == self.me:
            return None
        ready = [p for p in self.peers.values() if p.phases.get(name) == Phase.READY and self.up(p.name)]
        if ready:
            order = {p: i for i, p in enumerate(self.orders.get(name, []))}
            best = min(ready, key=lambda p: order.get(p.name, len(order)))
            return best.name, best.url
        peer = self.peers.get(placement.host) if placement.host else None
        return (peer.name, peer.url) if peer is not None else None

    def listing(self, name: str, local_phase: str, resident: bool) -> dict:
        """What /v1/models says of model `name` in a fleet: the host that runs it, its phase there."""
        placement = self.placements.get(name)
        if placement is None or placement.here:
            return {"host": self.me}
        peer = self.peers.get(placement.host) if placement.host else None
        phase = peer.phases.get(name) if peer else None
        return {"host": placement.host, "status": phase.value if phase else "Unknown",
                "resident": phase == Phase.READY}

    # -- asking the peers -----------------------------------------------------------------
    async def watch(self, nudge: Callable[[], None]) -> None:
        """Poll every peer every POLL_INTERVAL; a change in what they say asks for a pass."""
        client = self._client or httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)
        try:
            seen: dict = {}
            while True:
                await asyncio.gather(*(self._ask(client, peer) for peer in list(self.peers.values())))
                # compared with the last poll's view, not this poll's start: a peer goes down
                # when its grace runs out, which is between polls
                now = {n: (self.up(n), dict(p.phases)) for n, p in self.peers.items()}
                if now != seen:
                    nudge()
                seen = now
                try:
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            if self._client is None:
                await client.aclose()

    async def _ask(self, client: httpx.AsyncClient, peer: Peer) -> None:
        try:
            answer = await client.get(f"{peer.url}/fleet/status", headers={FLEET_KEY_HEADER: self.key or ""})
            answer.raise_for_status()
            body = answer.json()
            if body.get("host") != peer.name:
                raise ValueError(f"it says it is {body.get('host')!r}, not {peer.name!r}")
            peer.phases = {name: Phase(phase) for name, phase in body.get("models", {}).items()}
            peer.last_ok, peer.error = self.clock(), None
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as error:
            if peer.error is None:
                log.warning("fleet host %s (%s) did not answer: %s", peer.name, peer.url, error)
            peer.error = f"{type(error).__name__}: {error}"[:300]

    def wake(self) -> None:
        self._wake.set()

    def to_dict(self) -> dict:
        return {"host": self.me, "grace_seconds": self.grace,
                "peers": [p.to_dict(self.up(p.name)) for p in self.peers.values()],
                "placements": {n: {"host": p.host, "reason": p.reason} for n, p in sorted(self.placements.items())}}
