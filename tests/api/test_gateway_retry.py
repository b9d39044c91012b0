"""A request sent between a worker's death and the loop noticing it never reached the worker
(connection refused): the gateway waits for the model's next route and retries once there,
instead of answering 502 (soak suggestion 4). In process: the route table is driven by hand,
the "new worker" is a small aiohttp server on a port of this test's range."""

from __future__ import annotations

import asyncio
import types

import aiohttp
import httpx
from aiohttp import web

from opta_lmx.api.app import GatewaySettings, create_app
from opta_lmx.reconciler.controller import Reconciler
from opta_lmx.reconciler.ledger import Traffic
from opta_lmx.reconciler.routes import Route
from tests.reconciler.fakes import FakePool, FakeWorker, MiB

LIVE_PORT, DEAD_PORT, OLD_PORT = 18250, 18251, 18254  # nothing listens on DEAD_PORT: a worker that just died
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def until(condition, bound=20.0):
    """Poll until `condition()` holds; a bound, not a measurement: the test fails if it never does."""
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


async def live_worker(port: int = LIVE_PORT, said: str = "from the new worker", hits: list | None = None):
    async def chat(_request):
        if hits is not None:
            hits.append(port)
        return web.json_response({"choices": [{"message": {"content": said}, "finish_reason": "stop"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def gateway(tmp_path, wait_timeout: float):
    (tmp_path / "models.yaml").write_text("models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")
    reconciler = Reconciler(tmp_path / "models.yaml", FakePool(), memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))
    app = create_app(reconciler, GatewaySettings(load_wait_timeout=wait_timeout))
    return reconciler, app


def test_a_refused_connection_waits_for_the_next_route_and_retries_there(tmp_path):
    reconciler, app = gateway(tmp_path, wait_timeout=30)
    dead, live = Traffic(), Traffic()

    async def scenario():
        await reconciler.intake.read()  # the file is read; no pass runs: the test drives the routes
        runner = await live_worker()
        app.state.upstream = aiohttp.ClientSession()
        try:
            await reconciler.routes.set(Route("a", f"http://127.0.0.1:{DEAD_PORT}", "dead", dead))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
                sent = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await until(lambda: dead.in_flight == 1 or sent.done())  # it took the dead worker's route
                reconciler.routes.drop("a", "dead")  # the loop noticed the death...
                await asyncio.sleep(0.1)
                await reconciler.routes.set(Route("a", f"http://127.0.0.1:{LIVE_PORT}", "new", live))  # ...a new one
                reply = await sent
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "from the new worker"
            assert dead.in_flight == 0 and live.in_flight == 0
        finally:
            await app.state.upstream.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_refused_connection_with_no_next_route_is_a_502_within_the_wait_bound(tmp_path):
    reconciler, app = gateway(tmp_path, wait_timeout=0.5)
    dead = Traffic()

    async def scenario():
        await reconciler.intake.read()  # the file is read; no pass runs: the test drives the routes
        app.state.upstream = aiohttp.ClientSession()
        try:
            await reconciler.routes.set(Route("a", f"http://127.0.0.1:{DEAD_PORT}", "dead", dead))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
                reply = await client.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 502 and reply.json()["error"]["code"] == "worker_unavailable"
            assert dead.in_flight == 0
        finally:
            await app.state.upstream.close()

    asyncio.run(scenario())


def test_a_request_for_a_worker_whose_process_exited_is_not_sent_to_it(tmp_path):
    """The waiter thread knows at once that the process exited; the loop drops its route a pass
    later. A request in between goes to the next worker, not to the dead one's address (where a
    pooled connection would be reset: a 502 in the soak)."""
    reconciler, app = gateway(tmp_path, wait_timeout=30)
    exited = FakeWorker(types.SimpleNamespace(name="a"))
    exited.crash()
    reconciler.pool._workers[exited.id] = exited
    old, live, hits = Traffic(), Traffic(), []

    async def scenario():
        await reconciler.intake.read()  # the file is read; no pass runs: the test drives the routes
        # the exited worker's address still answers here, so a request sent there would show
        runners = [await live_worker(OLD_PORT, "from the exited worker", hits), await live_worker(hits=hits)]
        app.state.upstream = aiohttp.ClientSession()
        try:
            await reconciler.routes.set(Route("a", f"http://127.0.0.1:{OLD_PORT}", exited.id, old))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
                sent = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await until(lambda: old.in_flight == 1 or sent.done())
                await reconciler.routes.set(Route("a", f"http://127.0.0.1:{LIVE_PORT}", "new", live))
                reply = await sent
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "from the new worker"
            assert hits == [LIVE_PORT] and old.in_flight == 0
        finally:
            await app.state.upstream.close()
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())


async def closing_worker(port: int, hits: list):
    """A worker that answers a request holding `BREAK` with 500 and then closes the connection
    (vllm-mlx did so for a lone surrogate in `content`), and answers the others normally."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                body = await reader.readexactly(length)
                hits.append(b"BREAK" in body)
                reply = b'{"error": "Internal Server Error"}' if b"BREAK" in body else b'{"choices": []}'
                status = b"500 Internal Server Error" if b"BREAK" in body else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(reply)).encode() + b"\r\n\r\n" + reply)
                await writer.drain()
                if b"BREAK" in body:
                    await asyncio.sleep(0.05)
                    writer.close()  # after its answer, without saying so (no Connection: close)
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", port)


def test_a_workers_500_that_closes_its_connection_never_reaches_the_next_client(tmp_path):
    """Issue 22: one client's bad request left a dead pooled connection and the next client got
    502 (3 of 4 rounds). The connection is dropped after a 5xx, and a pooled connection that turns
    out closed by the worker before it answered anything is replaced by a new one."""
    reconciler, app = gateway(tmp_path, wait_timeout=30)
    hits: list = []

    async def scenario():
        await reconciler.intake.read()
        server = await closing_worker(OLD_PORT, hits)
        app.state.upstream = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            await reconciler.routes.set(Route("a", f"http://127.0.0.1:{OLD_PORT}", "w", Traffic()))
            codes = []
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
                for _round in range(4):
                    bad = await client.post("/v1/chat/completions", json={**CHAT, "note": "BREAK"})
                    good = await client.post("/v1/chat/completions", json=CHAT)
                    codes.append((bad.status_code, good.status_code))
            return codes
        finally:
            await app.state.upstream.close()
            server.close()

    assert asyncio.run(scenario()) == [(500, 200)] * 4
    assert hits.count(True) == 4 and hits.count(False) == 4
