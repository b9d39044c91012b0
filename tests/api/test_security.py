"""The browser-facing edge: content types, Host, Origin, CORS, admin body limits, forwarded headers.

In process through httpx's ASGITransport, against the real application (its lifespan, and so
the control loop, never starts: a refused request must not reach a handler anyway).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from opta_lmx.api.app import GatewaySettings, create_app
from opta_lmx.api.auth import Keys
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.reconciler.controller import Reconciler

MODELS = "models:\n  - name: m0\n    source: ./nowhere\n    state: unloaded\n"
ADMIN = "admin-secret"
API = "api-secret"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    return path


def make_app(config, tmp_path, *, keys=Keys(), **settings):
    reconciler = Reconciler(config, WorkerPool(tmp_path / "state" / "workers", log_dir=tmp_path / "logs"))
    return create_app(reconciler, GatewaySettings(**settings), keys=keys)


def call(app, method, path, *, host="127.0.0.1:8000", **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_cross_site_form_post_cannot_unload_a_model(config, tmp_path):
    """The attack of issue 12: `text/plain` (no preflight) to /admin/models/unload."""
    app = make_app(config, tmp_path)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = call(app, "POST", "/admin/models/unload", content=b'{"model_id": "m0"}',
                        headers={"Content-Type": content_type})
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "unsupported_media_type"
    response = call(app, "POST", "/admin/models/unload", content=b'{"model_id": "m0"}')  # no type at all
    assert response.status_code == 415
    assert config.read_text() == MODELS


@pytest.mark.parametrize(
    ("method", "path", "good", "bad"),
    [
        ("PATCH", "/admin/models/m0", "application/merge-patch+json", "text/plain"),
        ("PATCH", "/admin/config", "application/json", "application/x-www-form-urlencoded"),
        ("PUT", "/admin/desired", "application/yaml", "text/plain"),
        ("PUT", "/admin/models/m1", "application/json", "text/plain"),
        ("POST", "/v1/chat/completions", "application/json", "text/plain"),
        ("POST", "/v1/embeddings", "application/json", "multipart/form-data"),
    ],
)
def test_write_bodies_must_carry_their_documented_type(config, tmp_path, method, path, good, bad):
    app = make_app(config, tmp_path)
    refused = call(app, method, path, content=b"{}", headers={"Content-Type": bad})
    assert refused.status_code == 415 and path in refused.json()["error"]["message"]
    passed = call(app, method, path, content=b"{}", headers={"Content-Type": good + "; charset=utf-8"})
    assert passed.status_code != 415  # it reaches the handler, which judges the body itself
    assert config.read_text() == MODELS


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "attacker.com.", "localhost.evil.example"])
def test_dns_rebinding_a_foreign_host_is_refused_before_any_handler(config, tmp_path, host):
    app = make_app(config, tmp_path)
    for method, path in [("GET", "/admin/models"), ("GET", "/healthz"), ("GET", "/v1/models")]:
        response = call(app, method, path, host=host)
        assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed"
    response = call(app, "PATCH", "/admin/models/m0", host=host, json={"priority": 5},
                    headers={"Content-Type": "application/merge-patch+json"})
    assert response.status_code == 403
    assert config.read_text() == MODELS


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "app.localhost", "10.1.2.3:80"])
def test_loopback_names_and_address_literals_are_this_server(config, tmp_path, host):
    assert call(make_app(config, tmp_path), "GET", "/healthz", host=host).status_code == 200


def test_names_the_user_allows_and_the_bind_address(config, tmp_path, monkeypatch):
    app = make_app(config, tmp_path, bind_host="studio.lan", allowed_hosts=("models.example",))
    assert call(app, "GET", "/healthz", host="studio.lan:1234").status_code == 200
    assert call(app, "GET", "/healthz", host="models.example").status_code == 200
    assert call(app, "GET", "/healthz", host="other.example").status_code == 403
    monkeypatch.setenv("LMX_ALLOWED_HOSTS", "other.example, more.example")
    app = make_app(config, tmp_path)
    assert call(app, "GET", "/healthz", host="other.example").status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:3000", "https://127.0.0.1:8000"])
def test_a_foreign_origin_is_refused(config, tmp_path, origin):
    app = make_app(config, tmp_path)
    response = call(app, "POST", "/admin/models/unload", json={"model_id": "m0"}, headers={"Origin": origin})
    assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
    assert call(app, "GET", "/admin/models", headers={"Origin": origin}).status_code == 403
    assert config.read_text() == MODELS


def test_same_origin_pages_of_the_server_itself_are_allowed(config, tmp_path):
    app = make_app(config, tmp_path)
    response = call(app, "GET", "/admin/models", headers={"Origin": "http://127.0.0.1:8000"})
    assert response.status_code == 200
    response = call(app, "GET", "/healthz", host="localhost", headers={"Origin": "http://localhost"})
    assert response.status_code == 200


def test_cors_is_off_unless_configured(config, tmp_path):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    response = call(make_app(config, tmp_path), "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers
    app = make_app(config, tmp_path, cors_origins=("http://app.example",))
    response = call(app, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://app.example"
    assert call(app, "GET", "/v1/models", headers={"Origin": "http://other.example"}).status_code == 403


def test_admin_bodies_are_bounded(config, tmp_path):
    app = make_app(config, tmp_path, max_admin_body_bytes=1000)
    big = b'{"priority": 1, "pad": "' + b"x" * 2000 + b'"}'
    response = call(app, "PATCH", "/admin/models/m0", content=big,
                    headers={"Content-Type": "application/merge-patch+json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"x" * 100

    response = call(app, "PUT", "/admin/desired", content=chunks(), headers={"Content-Type": "application/yaml"})
    assert response.status_code == 413
    assert config.read_text() == MODELS


@pytest.mark.parametrize("forwarded", [
    {"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1;host=localhost"},
    {"X-Forwarded-For": "::1", "X-Forwarded-Host": "localhost", "X-Forwarded-Proto": "https"},
])
def test_forwarded_headers_never_skip_a_key_check(config, tmp_path, forwarded):
    app = make_app(config, tmp_path, keys=Keys(admin=ADMIN, inference=API))
    assert call(app, "GET", "/admin/models", headers=forwarded).status_code == 401
    assert call(app, "GET", "/v1/models", headers=forwarded).status_code == 401
    assert call(app, "POST", "/admin/models/unload", json={"model_id": "m0"}, headers=forwarded).status_code == 401
    assert call(app, "GET", "/admin/models", headers={**forwarded, "Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert config.read_text() == MODELS


def test_api_pages_need_the_admin_key_when_keys_are_set(config, tmp_path):
    app = make_app(config, tmp_path, keys=Keys(admin=ADMIN, inference=API))
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert call(app, "GET", path).status_code == 401
        assert call(app, "GET", path, headers={"Authorization": f"Bearer {API}"}).status_code == 401
    assert call(app, "GET", "/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert call(make_app(config, tmp_path), "GET", "/openapi.json").status_code == 200  # no keys: open


# -- issue 22: no side effects from simple GETs, bounded bodies, keyed operations -----------------

def test_a_cross_site_get_never_loads_a_model(config, tmp_path):
    """`<img src=http://127.0.0.1:PORT/v1/audio/voices?model=NAME>` on any page: a no-cors GET has no
    Origin, but browsers say `Sec-Fetch-Site: cross-site`. It may not make a model load."""
    config.write_text(MODELS + "  - {name: od, source: /m, state: on-demand}\n")
    app = make_app(config, tmp_path, load_wait_timeout=0.2)
    reconciler = app.state.reconciler

    async def read():

        await reconciler.intake.read()

    asyncio.run(read())
    for site in ("cross-site", "same-site"):
        refused = call(app, "GET", "/v1/audio/voices?model=od", headers={"Sec-Fetch-Site": site})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_site_load_refused"
    assert "od" not in reconciler.demand  # nothing asked the loop to load it
    call(app, "GET", "/v1/audio/voices?model=od", headers={"Sec-Fetch-Site": "same-origin"})
    assert "od" in reconciler.demand  # the dashboard (same origin) or a client (no header) may


def test_a_deeply_nested_body_is_a_400_not_a_500(config, tmp_path):
    app = make_app(config, tmp_path)
    for depth in (300, 100_000):
        body = b'{"model": "m0", "x": ' + b"[" * depth + b"]" * depth + b"}"
        answer = call(app, "POST", "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


def test_with_keys_metrics_need_one_and_probes_say_only_up_or_ready(config, tmp_path):
    app = make_app(config, tmp_path, keys=Keys(admin=ADMIN, inference=API))
    assert call(app, "GET", "/metrics").status_code == 401
    assert call(app, "GET", "/metrics", headers={"Authorization": f"Bearer {API}"}).status_code == 200
    assert call(app, "GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    bare = call(app, "GET", "/health").json()
    assert set(bare) == {"status"}  # no model names without a key
    assert "available_models" in call(app, "GET", "/health", headers={"Authorization": f"Bearer {API}"}).json()
    ready = call(app, "GET", "/readyz")
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    detailed = call(app, "GET", "/readyz", headers={"Authorization": f"Bearer {ADMIN}"})
    assert detailed.status_code == 503 and "reasons" in detailed.json()
    assert call(app, "GET", "/healthz").status_code == 200  # bare liveness stays open


def test_the_cancel_relay_escapes_the_id_it_puts_in_the_workers_url(config, tmp_path):
    from aiohttp import web

    from opta_lmx.reconciler.ledger import Traffic
    from opta_lmx.reconciler.routes import Route

    seen: list[str] = []

    async def scenario():
        async def anything(request):
            seen.append(request.raw_path)
            return web.json_response({"id": "x"}, status=404)

        worker = web.Application()
        worker.router.add_route("*", "/{tail:.*}", anything)
        runner = web.AppRunner(worker)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        app = make_app(config, tmp_path)

        await app.state.reconciler.intake.read()
        await app.state.reconciler.routes.set(Route("m0", f"http://127.0.0.1:{port}", "w", Traffic()))
        import aiohttp

        app.state.upstream = aiohttp.ClientSession()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
                answer = await client.post("/v1/requests/req%3Fmodel=x%23frag/cancel", json={})
                assert answer.status_code == 404, answer.text
        finally:
            await app.state.upstream.close()
            await runner.cleanup()

    asyncio.run(scenario())
    assert seen == ["/v1/requests/req%3Fmodel=x%23frag/cancel"], seen  # one path segment, no query
