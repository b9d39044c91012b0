"""The admin API against files and inputs that once broke it (issue 15 items 4, 9, 10; issue 12 item 7).

In process, over the fake loop: a missing file is not an empty desired state, a broken file can
always be replaced whole, and oversized, deeply nested or out-of-range input is a clear 4xx.
"""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from opta_lmx.api.admin.protocol import MAX_BODY_BYTES
from opta_lmx.state.document import content_etag
from opta_lmx.state.store import ModelsStore
from tests.api.fake_loop import FakeLoop, admin_app

CONFIG = """\
# two models and a budget that must survive
memory:
  budget: 50%
models:
  - name: alpha
    source: org/alpha
  - name: beta
    source: org/beta
    state: unloaded
"""
READS = ["/admin/models", "/admin/models/alpha", "/admin/status", "/admin/memory", "/admin/config",
         "/admin/health", "/admin/events"]


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
    with TestClient(admin_app(loop, ModelsStore(config)), raise_server_exceptions=False) as test_client:
        assert test_client.get("/admin/desired").status_code == 200
        yield test_client


def _accepted(client, loop):
    client.put("/admin/desired", content=CONFIG, headers={"content-type": "application/yaml"})
    assert loop.desired is not None and len(loop.desired.models) == 2


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


# -- issue 15 item 4: the file's absence is not an empty desired state ----------------------
@pytest.mark.parametrize("blank", [None, "", " \n"])
def test_an_edit_of_a_missing_or_blank_file_is_refused(client, loop, config, blank):
    _accepted(client, loop)
    config.unlink()
    if blank is not None:
        config.write_text(blank)
    error = _error(client.put("/admin/models/newone", json={"source": "org/new"}), 409, "document_missing")
    assert "PUT /admin/desired" in error["message"] and "?create=true" in error["message"]
    for write in (lambda: client.patch("/admin/models/alpha", json={"priority": 3}),
                  lambda: client.post("/admin/models/load?wait=none", json={"model_id": "org/other"}),
                  lambda: client.patch("/admin/config", json={"memory": {"budget": "10%"}})):
        _error(write(), 409, "document_missing")
    assert (config.read_text() == blank) if blank is not None else not config.exists()
    listed = client.get("/admin/models").json()  # the last good state, not "no models"
    assert [m["name"] for m in listed["models"]] == ["alpha", "beta"]


def test_create_true_and_a_whole_file_create_it_explicitly(client, loop, config):
    config.unlink()
    created = client.put("/admin/models/newone?create=true", json={"source": "org/new"})
    assert created.status_code == 202, created.text
    assert config.read_text() == "models:\n  - name: newone\n    source: org/new\n"
    config.unlink()
    whole = client.put("/admin/desired", content=CONFIG, headers={"content-type": "application/yaml"})
    assert whole.status_code == 202 and config.read_text() == CONFIG


# -- issue 15 item 9: the whole file can always be replaced -----------------------------------
@pytest.mark.parametrize("broken", [b"models:\n  - name: caf\xe9\n", b"models: [unclosed\n", b"\x00\x01"])
def test_a_broken_file_is_replaced_whole_under_its_raw_etag(client, config, broken):
    config.write_bytes(broken)
    for path in READS:
        assert client.get(path).status_code < 500, path
    desired = client.get("/admin/desired")
    assert desired.content == broken and desired.headers["etag"] == content_etag(broken)
    _error(client.patch("/admin/models/alpha", json={"priority": 1}), 409, "invalid_document")
    stale = client.put("/admin/desired", content=CONFIG, headers={"if-match": content_etag(b"x")})
    assert stale.status_code == 412 and config.read_bytes() == broken
    fixed = client.put("/admin/desired", content=CONFIG, headers={"if-match": desired.headers["etag"]})
    assert fixed.status_code == 202, fixed.text
    assert config.read_text() == CONFIG


def test_a_directory_in_place_of_the_file_answers_clearly(client, config):
    config.unlink()
    config.mkdir()
    for path in READS:
        assert client.get(path).status_code < 500, path
    assert "is a directory" in _error(client.get("/admin/desired"), 409, "document_unreadable")["message"]
    assert "is a directory" in client.get("/admin/health").json()["config"]["file_error"]
    _error(client.put("/admin/desired", content=CONFIG), 409, "document_unreadable")
    _error(client.put("/admin/models/x?create=true", json={"source": "org/x"}), 409, "document_unreadable")
    assert config.is_dir() and not any(config.iterdir())


def test_a_symlink_loop_reads_clearly_and_a_whole_file_replaces_it(client, config):
    config.unlink()
    os.symlink(config.name, config)
    for path in READS:
        assert client.get(path).status_code < 500, path
    assert "loops" in _error(client.get("/admin/desired"), 409, "document_unreadable")["message"]
    assert client.put("/admin/desired", content=CONFIG).status_code == 202
    assert not config.is_symlink() and config.read_text() == CONFIG


# -- issue 15 item 10: the smaller gaps ---------------------------------------------------------
def test_admin_bodies_have_a_size_limit(client, config):
    big = "# padding\n" * (MAX_BODY_BYTES // 10 + 1)
    error = _error(client.put("/admin/desired", content=CONFIG + big), 413, "request_too_large")
    assert error["type"] == "invalid_request_error"
    _error(client.patch("/admin/models/alpha", content=b'{"a": "' + b"x" * MAX_BODY_BYTES + b'"}'),
           413, "request_too_large")

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    _error(client.patch("/admin/models/alpha", content=chunks()), 413, "request_too_large")
    assert config.read_text() == CONFIG


@pytest.mark.parametrize("depth", [40, 5000, 200_000])
def test_deeply_nested_json_is_a_json_400(client, config, depth):
    body = '{"engine": ' + "[" * depth + "]" * depth + "}"
    _error(client.patch("/admin/models/alpha", content=body), 400, "invalid_json")
    assert config.read_text() == CONFIG


def test_a_whole_file_nested_too_deep_to_validate_is_a_422(client, config):
    deep = "models: " + "[" * 5000 + "]" * 5000 + "\n"
    _error(client.put("/admin/desired", content=deep), 422, "invalid_desired_state")
    assert config.read_text() == CONFIG


def test_a_non_ascii_last_event_id_is_ignored(client, loop):
    loop.events.record("alpha", "Something", "happened")
    client.app.state.stopping = True  # the stream sends the backlog and ends
    for last_id in ["²", "٣", "9" * 400, "-1"]:
        streamed = client.get("/admin/events?follow=true", headers={"last-event-id": last_id.encode()})
        assert streamed.status_code == 200 and "event: Something" in streamed.text, last_id


def test_out_of_range_numbers_are_422(client, config):
    huge = "9" * 400
    for path in (f"/admin/models/alpha?wait=ready&timeout={huge}", "/admin/models/alpha?wait=ready&timeout=nan"):
        _error(client.patch(path, json={"priority": 2}), 422, "invalid_request")
    _error(client.post("/admin/models/load", content='{"model_id": "alpha", "timeout": ' + huge + "}"),
           422, "invalid_request")
    assert client.patch(f"/admin/models/alpha?wait={huge}", json={"priority": 2}).status_code == 400
    for query in (f"limit={huge}", f"since={huge}", "limit=-1"):
        assert client.get(f"/admin/events?{query}").status_code == 422, query
    assert config.read_text() == CONFIG


@pytest.mark.parametrize("model_id", ["x" * 5000, "~nosuchuser", "a\x00b"])
def test_a_model_id_no_path_can_be_is_not_found_not_a_500(client, config, model_id):
    """Found by the fuzzer's neighbourhood: `load` asks the disk whether an unknown id is a path."""
    _error(client.post("/admin/models/load?wait=none", json={"model_id": model_id}), 404, "model_not_found")
    assert config.read_text() == CONFIG


def test_reads_parse_the_file_off_the_event_loop(client, config, monkeypatch):
    """Issue 12 item 8, the admin part: a hostile file must not stall the event loop it is read on."""
    import asyncio

    from opta_lmx.api.admin import serving

    on_loop = []
    real_parse = serving.parse_document

    def parse(*args, **kwargs):
        on_loop.append(asyncio._get_running_loop() is not None)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(serving, "parse_document", parse)
    config.write_text(CONFIG + "# changed after the loop read it\n")
    for path in READS:
        assert client.get(path).status_code == 200, path
    assert on_loop and not any(on_loop)


# -- issue 12 item 7: /admin/health --------------------------------------------------------------
def test_admin_health_gives_models_memory_convergence_and_the_loop(client, loop):
    _accepted(client, loop)
    health = client.get("/admin/health").json()
    assert health["status"] == "ok"
    assert health["models"] == [
        {"name": "alpha", "phase": "Ready", "desired": "loaded", "desired_phase": "Ready"},
        {"name": "beta", "phase": "Unloaded", "desired": "unloaded", "desired_phase": "Unloaded"},
    ]
    assert health["memory"] == loop.observation()["memory"]
    assert health["convergence"] == {"generation": loop.generation, "observed_generation": loop.generation,
                                     "converged": True}
    assert health["loop"] == {"running": True, "pass_failures": 0, "last_error": None}
    loop.running = False
    degraded = client.get("/admin/health").json()
    assert degraded["status"] == "degraded" and degraded["loop"]["last_error"] == "injected: loop ended"
