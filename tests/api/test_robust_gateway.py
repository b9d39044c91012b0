"""Issue 15 items 7 and 10, issue 12 item 8, in process: a worker's odd `usage` never cuts a
response short; a client that leaves cancels what its request waits for; parsing models.yaml
never blocks serving."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from prometheus_client import generate_latest

from opta_lmx.api import gateway
from opta_lmx.api.request_gate import RequestGate
from opta_lmx.api.app import create_app
from opta_lmx.api.auth import Keys
from opta_lmx.api.errors import APIError
from opta_lmx.api.metrics import GatewayMetrics
from opta_lmx.reconciler import intake
from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.reconciler.ledger import Traffic
from opta_lmx.reconciler.routes import Route
from tests.reconciler.fakes import FakePool, MiB

ODD_USAGE = [
    '"lots"', "[1, 2]", "null", '{"prompt_tokens": -5, "completion_tokens": 3}',
    '{"prompt_tokens": "7", "completion_tokens": 1e400}', '{"prompt_tokens": true}',
    '{"prompt_tokens": 99999999999999999999999999999999}',
]


class _Content:
    def __init__(self, chunks):
        self._chunks = chunks

    async def iter_any(self):
        for chunk in self._chunks:
            yield chunk


class FakeUpstream:
    """What _relay reads of an aiohttp response: headers, content.iter_any(), release(), close()."""

    def __init__(self, chunks, content_type="application/json", status=200):
        self.status = status
        self.headers = {"content-type": content_type}
        self.content = _Content(chunks)
        self.released = self.closed = False

    def release(self):
        self.released = True

    def close(self):
        self.closed = True


class FakeAdmission:
    def __init__(self):
        self.released = 0

    async def release(self, _name, _route):
        self.released += 1


def _metrics():
    reconciler = Reconciler("/nonexistent/models.yaml", FakePool())
    return GatewayMetrics(reconciler, reconciler.routes)


@pytest.mark.parametrize("usage", ODD_USAGE)
@pytest.mark.parametrize("sse", [False, True])
def test_an_odd_usage_value_never_cuts_the_response(usage, sse):
    if sse:
        body = [b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n',
                f'data: {{"choices": [], "usage": {usage}}}\n\n'.encode(), b"data: [DONE]\n\n"]
    else:
        body = [b'{"choices": [{"message": {"content": "hi"}}], ', f'"usage": {usage}}}'.encode()]
    upstream = FakeUpstream(body, "text/event-stream" if sse else "application/json")
    admission, metrics = FakeAdmission(), _metrics()

    async def relay():
        route = Route("m", "http://127.0.0.1:9", "w", Traffic())
        return [c async for c in gateway._relay(upstream, "m", metrics, 0.0, admission, route)]

    assert asyncio.run(relay()) == body  # every byte, and the generator ended without raising
    assert upstream.released and admission.released == 1


def test_plausible_usage_is_counted():
    metrics = _metrics()
    gateway._count_tokens(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2}}', False, "m", metrics)
    gateway._count_tokens(b'{"usage": {"prompt_tokens": -5, "completion_tokens": "2"}}', False, "m", metrics)
    assert metrics.prompt_tokens.labels("m")._value.get() == 5
    assert metrics.completion_tokens.labels("m")._value.get() == 2


class FakeRequest:
    """The ASGI receive of a request whose body was read: the next message is the disconnect."""

    def __init__(self):
        self.gone = asyncio.Event()

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_a_client_that_leaves_cancels_what_it_waits_for():
    async def scenario():
        request, cancelled, undone = FakeRequest(), asyncio.Event(), []

        async def forever():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def undo(result):
            undone.append(result)

        waiting = asyncio.create_task(gateway._unless_client_leaves(request, forever(), undo))
        await asyncio.sleep(0.05)
        request.gone.set()
        with pytest.raises(APIError) as caught:
            await asyncio.wait_for(waiting, 10)
        assert caught.value.status == 499 and cancelled.is_set() and undone == []

        async def answer():
            return "route"

        assert await gateway._unless_client_leaves(FakeRequest(), answer(), undo) == "route"

    asyncio.run(scenario())


def test_a_queued_request_leaves_the_queue_with_its_client(tmp_path):
    """A request waiting for a model that is not ready is dropped from the queue when it leaves."""
    (tmp_path / "models.yaml").write_text("models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")
    reconciler = Reconciler(tmp_path / "models.yaml", FakePool(), memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))
    metrics = GatewayMetrics(reconciler, reconciler.routes)
    admission = RequestGate(reconciler, metrics, queue_limit=4, wait_timeout=60)

    async def scenario():
        await reconciler.intake.read()  # desired, but no worker: a request must wait
        request = FakeRequest()
        waiting = asyncio.create_task(gateway._unless_client_leaves(
            request, admission.acquire("a", None), lambda r: admission.release("a", r)))
        for _ in range(200):
            if reconciler.routes.waiters("a"):
                break
            await asyncio.sleep(0.01)
        assert reconciler.routes.waiters("a") == 1
        request.gone.set()
        with pytest.raises(APIError):
            await asyncio.wait_for(waiting, 10)
        assert reconciler.routes.waiters("a") == 0 and reconciler.routes.in_flight("a") == 0
        assert 'lmx_queue_depth{model="a"}' not in generate_latest(metrics.registry).decode()

    asyncio.run(scenario())


def test_parsing_models_yaml_never_blocks_serving(tmp_path, monkeypatch):
    """Issue 12 item 8: while models.yaml is being read (here: a read that takes seconds), the
    server answers; the read finishing later is what proves it ran off the event loop."""
    (tmp_path / "models.yaml").write_text("models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")
    real, reading, finished = intake.read_document, threading.Event(), threading.Event()

    def slow_read(path):
        reading.set()
        threading.Event().wait(3.0)  # a slow disk, a large file: blocking, like a real parse
        try:
            return real(path)
        finally:
            finished.set()

    monkeypatch.setattr(intake, "read_document", slow_read)
    reconciler = Reconciler(tmp_path / "models.yaml", FakePool(), settings=LoopSettings(),
                            memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))
    app = create_app(reconciler, keys=Keys())

    async def scenario():
        loop_task = asyncio.create_task(reconciler.run())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            while not reading.is_set():
                await asyncio.sleep(0.01)
            health = await client.get("/healthz")
            models = await client.get("/v1/models")
            answered_during_read = not finished.is_set()
        await reconciler.shutdown()
        await asyncio.gather(loop_task, return_exceptions=True)
        return health, models, answered_during_read

    health, models, answered_during_read = asyncio.run(scenario())
    assert health.status_code == 200 and models.status_code == 200
    assert answered_during_read
    assert json.loads(models.text)["object"] == "list"
