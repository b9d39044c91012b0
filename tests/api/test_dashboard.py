"""The dashboard's routes in process: the page, the edit preview, the log tail, the traffic gauges.

The routes read only app.state.store, .metrics and .worker_logs, so a small app holding the
real store and real gauges is enough; the browser tests (tests/e2e) run the page on a server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from opta_lmx.api import dashboard
from opta_lmx.api.errors import install_error_handlers
from opta_lmx.reconciler.ledger import Traffic
from opta_lmx.reconciler.routes import Route, RouteTable
from opta_lmx.state.document import content_etag
from opta_lmx.state.store import ModelsStore
from opta_lmx.state.yamledit import merge_patch, require_model

CONFIG = """\
# kept: a comment at the top
memory:
  budget: 50%
models:
  - name: chat
    source: /models/chat   # the everyday one
    aliases: [default, fast]
    priority: 50
  - name: coder
    source: /models/coder
    state: unloaded
"""


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(CONFIG)
    app = FastAPI()
    app.state.store = ModelsStore(path)
    app.state.traffic = RouteTable()
    app.state.worker_logs = (tmp_path / "state", tmp_path / "logs")
    install_error_handlers(app)
    app.include_router(dashboard.page)
    app.include_router(dashboard.reads)
    app.state.path = path
    return app


@pytest.fixture
def client(app):
    return TestClient(app)


def test_the_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/app.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "http" not in page.text.replace('http-equiv', '')  # nothing from a CDN
    script = client.get("/dashboard/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "/admin/preview" in script.text and "sessionStorage" in script.text
    assert client.get("/dashboard/style.css").headers["content-type"].startswith("text/css")
    missing = client.get("/dashboard/../admin.py")
    assert missing.status_code == 404
    assert client.get("/dashboard/secret.txt").json()["error"]["code"] == "not_found"


def test_preview_shows_the_diff_and_writes_nothing(client, app):
    answer = client.post("/admin/preview", json={"model": "chat", "patch": {"priority": 7}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["changed"] is True and body["summary"] == "set chat: priority=7"
    assert body["etag"] == content_etag(CONFIG.encode()) == answer.headers["etag"]
    changed = [line for line in body["diff"].splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-    priority: 50", "+    priority: 7"]
    assert app.state.path.read_text() == CONFIG


def test_the_preview_is_byte_for_byte_what_the_write_produces(client, app):
    patch = {"state": "unloaded", "engine": {"max_num_seqs": 4}}
    body = client.post("/admin/preview", json={"model": "chat", "patch": patch}).json()
    app.state.store.edit(lambda tree: (merge_patch(require_model(tree, "chat"), patch), "x")[1])
    written = app.state.path.read_text()
    assert "".join(line[1:] + "\n" for line in body["diff"].splitlines()[3:] if line[:1] in " +") in written
    assert "+    state: unloaded" in body["diff"]
    assert "# the everyday one" in written  # comments survive in both


def test_preview_of_moving_an_alias_loads_the_target_and_takes_the_alias_away(client):
    body = client.post("/admin/preview", json={"alias": "fast", "to": "coder", "unload_previous": True}).json()
    diff = body["diff"]
    assert "-    aliases: [default, fast]" in diff and "+    aliases: [default]" in diff
    assert "-    state: unloaded" in diff and "+    state: loaded" in diff
    assert "+    aliases:\n+      - fast" in diff
    assert diff.count("+    state: unloaded") == 1  # the previous holder, unloaded in the same edit
    assert body["summary"] == "move alias fast to coder from chat"


def test_a_stale_preview_is_refused_with_412_and_the_fresh_etag(client, app):
    stale = content_etag(CONFIG.encode())
    app.state.path.write_text(CONFIG.replace("priority: 50", "priority: 60"))
    answer = client.post("/admin/preview", json={"model": "chat", "patch": {"priority": 7}},
                         headers={"If-Match": stale})
    assert answer.status_code == 412
    assert answer.json()["error"]["code"] == "etag_mismatch"
    assert answer.headers["etag"] == content_etag(app.state.path.read_bytes())


@pytest.mark.parametrize("request_body, status, code", [
    ({"model": "nope", "patch": {"priority": 1}}, 404, "model_not_found"),
    ({"model": "chat", "patch": {"priority": "high"}}, 422, "invalid_desired_state"),
    ({"model": "chat", "patch": {"name": "other"}}, 422, "name_mismatch"),
    ({"model": "chat"}, 400, "invalid_request"),
    ({"alias": "fast"}, 400, "invalid_request"),
])
def test_bad_previews_get_clear_errors(client, app, request_body, status, code):
    answer = client.post("/admin/preview", json=request_body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert app.state.path.read_text() == CONFIG


def test_a_body_that_is_not_an_object_is_refused(client):
    answer = client.post("/admin/preview", content=b"[1]", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


def test_log_tail_reads_the_current_workers_log_and_never_a_records_path(client, app, tmp_path):
    _state_dir, log_dir = app.state.worker_logs
    log = Path(log_dir) / "chat" / "20261204T101010000000001-chat-1.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(500)))
    answer = client.get("/admin/models/chat/log?lines=3")
    assert answer.status_code == 200
    assert answer.text.splitlines() == ["line 497", "line 498", "line 499"]
    assert answer.headers["x-log-path"] == str(log)
    everything = client.get("/admin/models/chat/log?lines=100000").text.splitlines()
    assert len(everything) == 500  # capped at MAX_LOG_LINES, which is more than the file has
    # A record naming another file (root-only, or planted) is never what the log route reads.
    records = tmp_path / "state" / "workers" / "records"
    records.mkdir(parents=True, exist_ok=True)
    (tmp_path / "secret").write_text("not a log")
    (records / "w2.json").write_text(json.dumps({"name": "chat", "started_at": 99.0, "log_path": str(tmp_path / "secret")}))
    assert client.get("/admin/models/chat/log").headers["x-log-path"] == str(log)
    # A name that is a path is none (`..` encoded).
    assert client.get("/admin/models/%2e%2e/log").status_code == 404


def test_log_tail_of_a_model_never_loaded_is_404(client):
    answer = client.get("/admin/models/coder/log")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "log_not_found"


def test_traffic_reports_in_flight_and_queued_per_model(client, app):
    assert client.get("/admin/traffic").json() == {"models": {}}
    routes = app.state.traffic
    chat = Route("chat", "http://127.0.0.1:9", "w", Traffic())
    routes.begin(chat)
    routes.begin(chat)
    for name, count in (("chat", 5), ("coder", 1)):
        for _ in range(count):
            routes.register(name)
    assert client.get("/admin/traffic").json()["models"] == {
        "chat": {"in_flight": 2, "queued": 5}, "coder": {"in_flight": 0, "queued": 1},
    }
