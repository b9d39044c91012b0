"""The admin API in process: its routes, protocol and logic against a fake control loop.

Beside the end-to-end tests in test_admin.py (real server, real workers), these exercise the
admin logic alone: CRUD, If-Match, merge patch, dry run, bad bodies, waits and readiness.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from opta_lmx.state.document import content_etag
from opta_lmx.state.store import ModelsStore
from tests.api.fake_loop import GIB, FakeLoop, admin_app

CONFIG = """\
# desired state for the in-process admin tests
memory:
  budget: 75%
  reserve: 1GiB

models:
  # the first model
  - name: alpha
    source: org/alpha   # a hub id
    aliases: [default]
    state: loaded

  # the second model
  - name: beta
    source: org/beta
    state: unloaded
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def loop(config):
    return FakeLoop(config)


@pytest.fixture
def client(loop, config):
    with TestClient(admin_app(loop, ModelsStore(config))) as test_client:
        yield test_client


def test_create_read_replace_delete(client, config, loop):
    created = client.put("/admin/models/gamma", json={"source": "org/gamma", "state": "unloaded"})
    assert created.status_code == 202, created.text
    assert created.json()["name"] == "gamma" and created.json()["changed"] is True
    assert created.headers["etag"] == content_etag(config.read_bytes())
    assert "  - name: gamma\n    source: org/gamma\n    state: unloaded\n" in config.read_text()
    assert [e.reason for e in loop.events.since(0, 10)] == ["AdminEdit"]

    got = client.get("/admin/models/gamma")
    assert got.status_code == 200
    assert got.json()["spec"] == {"name": "gamma", "source": "org/gamma", "state": "unloaded"}
    assert got.json()["status"]["phase"] == "Unloaded"

    replaced = client.put("/admin/models/gamma", json={"spec": {"source": "org/gamma-2"}})
    assert replaced.status_code == 202
    assert client.get("/admin/models/gamma").json()["spec"] == {"name": "gamma", "source": "org/gamma-2"}

    deleted = client.delete("/admin/models/gamma")
    assert deleted.status_code == 202
    assert "gamma" not in config.read_text()
    assert config.read_text() == CONFIG  # the round trip leaves the file as it was, comments and all
    missing = client.get("/admin/models/gamma")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.delete("/admin/models/gamma").status_code == 404


def test_list_models_carries_specs_statuses_and_the_observation(client, loop):
    loop.running = True
    body = client.get("/admin/models").json()
    assert [m["name"] for m in body["models"]] == ["alpha", "beta"]
    assert body["observed"]["memory"]["physical_bytes"] == 16 * GIB
    assert body["config"]["path"].endswith("models.yaml")


def test_stale_if_match_is_412_and_writes_nothing(client, config):
    etag = client.get("/admin/models").headers["etag"]
    first = client.patch("/admin/models/beta", json={"priority": 3}, headers={"If-Match": etag})
    assert first.status_code == 202
    after_first = config.read_text()
    stale = client.patch("/admin/models/beta", json={"priority": 4}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "etag_mismatch"
    assert stale.headers["etag"] == content_etag(after_first.encode())
    assert config.read_text() == after_first
    fresh = client.patch("/admin/models/beta", json={"priority": 4}, headers={"If-Match": stale.headers["etag"]})
    assert fresh.status_code == 202 and "priority: 4" in config.read_text()
    assert client.patch("/admin/models/beta", json={"priority": 5}, headers={"If-Match": "*"}).status_code == 202


def test_merge_patch_sets_nested_keys_and_null_deletes(client, config):
    response = client.patch("/admin/models/alpha", json={"engine": {"max_tokens": 64}, "aliases": None})
    assert response.status_code == 202, response.text
    spec = client.get("/admin/models/alpha").json()["spec"]
    assert spec["engine"] == {"max_tokens": 64} and "aliases" not in spec
    text = config.read_text()
    assert "source: org/alpha   # a hub id" in text and "# the second model" in text
    assert client.patch("/admin/models/alpha", json={"name": "other"}).status_code == 422


def test_dry_run_validates_and_diffs_without_writing(client, config):
    new = CONFIG.replace("state: unloaded", "state: loaded")
    dry = client.put("/admin/desired", params={"dry_run": "true"}, content=new)
    assert dry.status_code == 200
    assert dry.json()["valid"] is True and dry.json()["changed"] is True
    assert "-    state: unloaded\n+    state: loaded\n" in dry.json()["diff"]
    assert config.read_text() == CONFIG
    bad = client.put("/admin/desired", params={"dry_run": "true"}, content="models: [{name: x}]\n")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_desired_state"
    assert config.read_text() == CONFIG
    written = client.put("/admin/desired", content=new)
    assert written.status_code == 202 and config.read_text() == new


def test_invalid_bodies_are_clear_errors_and_write_nothing(client, config):
    not_json = client.patch("/admin/models/alpha", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    a_list = client.put("/admin/models/alpha", json=[1, 2])
    assert a_list.status_code == 400
    invalid = client.patch("/admin/models/alpha", json={"state": "sometimes"})
    assert invalid.status_code == 422
    assert invalid.json()["error"]["param"] == "models[0].state"
    assert invalid.json()["error"]["problems"]
    mismatch = client.put("/admin/models/alpha", json={"name": "beta", "source": "x"})
    assert mismatch.status_code == 422 and mismatch.json()["error"]["code"] == "name_mismatch"
    no_model = client.post("/admin/models/load", json={})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model_id"
    bad_wait = client.patch("/admin/models/alpha", params={"wait": "soon"}, json={"priority": 1})
    assert bad_wait.status_code == 400 and bad_wait.json()["error"]["param"] == "wait"
    bad_timeout = client.patch("/admin/models/alpha", params={"wait": "ready", "timeout": "x"}, json={"priority": 1})
    assert bad_timeout.status_code == 400 and bad_timeout.json()["error"]["param"] == "timeout"
    swap = client.post("/admin/models/swap", json={"to": "beta"})
    assert swap.status_code == 400 and swap.json()["error"]["param"] == "from"
    assert config.read_text() == CONFIG


def test_verbs_edit_state_and_wait_for_the_loop(client, config, loop):
    loaded = client.post("/admin/models/load", json={"model_id": "beta", "timeout": 5})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["status"]["phase"] == "Ready" and loaded.json()["action"] == "load"
    by_alias = client.post("/admin/models/unload", json={"model_id": "default"})
    assert by_alias.status_code == 200 and by_alias.json()["name"] == "alpha"
    assert client.post("/admin/models/unload", json={"model_id": "nope"}).status_code == 404
    swapped = client.post("/admin/models/swap", json={"from": "beta", "to": "alpha"})
    assert swapped.status_code == 200
    assert loop.desired.model("alpha").state.value == "loaded" and loop.desired.model("beta").state.value == "unloaded"


def test_a_wait_that_does_not_settle_is_504_and_the_edit_stands(config):
    loop = FakeLoop(config, settle=False)
    with TestClient(admin_app(loop, ModelsStore(config))) as client:
        response = client.patch("/admin/models/beta", params={"wait": "ready", "timeout": "0"},
                                json={"state": "loaded"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "wait_timeout"
    assert "state: loaded" in config.read_text().split("name: beta")[1]


def test_readiness_is_503_when_the_loop_is_not_running(client, loop):
    assert client.get("/readyz").status_code == 503  # nothing accepted yet
    client.patch("/admin/models/beta", json={"priority": 1})  # the fake accepts and settles
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    loop.running = False
    down = client.get("/readyz")
    assert down.status_code == 503
    assert any("control loop is not running" in r and "injected" in r for r in down.json()["reasons"])


def test_memory_figures_come_from_the_injected_probe(client):
    client.patch("/admin/models/beta", json={"priority": 1})
    memory = client.get("/admin/memory").json()
    assert memory["machine"] == {"total_bytes": 16 * GIB, "available_bytes": 6 * GIB,
                                 "used_bytes": 10 * GIB, "percent": 62.5}
    assert memory["budget_bytes"] == 12 * GIB
    assert memory["planner"]["available_bytes"] == 8 * GIB
    status = client.get("/admin/status").json()
    assert status["memory"]["machine"]["total_bytes"] == 16 * GIB
    assert status["models"] == {"alpha": "Ready", "beta": "Unloaded"}


def test_config_patch_and_events(client, config):
    patched = client.patch("/admin/config", json={"memory": {"budget": "50%"}})
    assert patched.status_code == 202 and patched.json()["memory"]["budget"] == "50%"
    assert "budget: 50%" in config.read_text()
    assert client.patch("/admin/config", json={"models": []}).status_code == 422
    events = client.get("/admin/events").json()["events"]
    assert events[-1]["reason"] == "AdminEdit" and "budget" in events[-1]["message"]
