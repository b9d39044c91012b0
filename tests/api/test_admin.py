"""Issue 6 acceptance: the admin API edits models.yaml, against one real server and file.

One server (module-scoped, to save CPU) runs on a models.yaml that is a symlink into a git
checkout, with both keys set and `--git-commit`, so every test also checks that the link stays a
link, and that writes are committed.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import threading
import time

import httpx
import pytest

from opta_lmx.state.document import content_etag
from tests.lmx_harness import lmx_env, start_server, worker_processes

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-secret-for-tests"
API_KEY = "api-secret-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _config(model_path) -> str:
    many = "".join(
        f"  - name: m{i}\n    source: {model_path}\n    state: unloaded   # spare {i}\n" for i in range(16)
    )
    return (
        "# Desired state for the admin API tests.\n"
        "memory:\n"
        "  budget: 90%      # generous: tests run on small machines\n"
        "  reserve: 1GiB\n"
        "\n"
        "defaults:\n"
        "  engine: {continuous_batching: true, max_tokens: 8}\n"
        "\n"
        "models:\n"
        "  # the one that gets loaded\n"
        f"  - name: tiny\n    source: '{model_path}'\n    aliases: [default]\n    state: unloaded\n"
        "\n" + many
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("admin")
    repo = root / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "config", "user.name", "tester"], check=True)
    subprocess.run([*git, "config", "user.email", "tester@example.invalid"], check=True)
    (repo / "models.yaml").write_text(_config(tiny_model))
    subprocess.run([*git, "add", "models.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "initial"], check=True)
    link_dir = root / "etc"
    link_dir.mkdir()
    link = link_dir / "models.yaml"
    link.symlink_to(repo / "models.yaml")
    env = lmx_env(LMX_ADMIN_KEY=ADMIN_KEY, LMX_API_KEY=API_KEY)
    srv = start_server(link, root / "state", "--git-commit", env=env)
    srv.repo = repo
    srv.target = repo / "models.yaml"
    yield srv
    srv.stop()
    leftovers = worker_processes(srv.state_dir)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"worker processes left behind: {[p.pid for p in leftovers]}"


def call(server, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {**ADMIN, **kwargs.pop("headers", {})}
    return httpx.request(method, server.base_url + path, headers=headers, timeout=180, **kwargs)


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def git_log(server, n: int = 1) -> list[str]:
    out = subprocess.run(["git", "-C", str(server.repo), "log", f"-{n}", "--format=%s"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def commit_count(server) -> int:
    out = subprocess.run(["git", "-C", str(server.repo), "rev-list", "--count", "HEAD"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def phase(server, name: str) -> str | None:
    response = call(server, "GET", f"/admin/models/{name}")
    if response.status_code == 404:
        return None
    return ((response.json().get("status")) or {}).get("phase")


def test_keys_are_enforced(server):
    assert httpx.get(server.base_url + "/admin/models").status_code == 401
    wrong = httpx.get(server.base_url + "/admin/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/admin/models", headers={"X-Admin-Key": ADMIN_KEY}).status_code == 200
    assert httpx.get(server.base_url + "/admin/models", headers=ADMIN).status_code == 200
    patched = httpx.patch(server.base_url + "/admin/models/m0", json={"priority": 1})
    assert patched.status_code == 401
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers=ADMIN).status_code == 200
    assert httpx.get(server.base_url + "/healthz").status_code == 200
    assert httpx.get(server.base_url + "/readyz").status_code in (200, 503)


def test_patch_changes_one_line_and_is_committed(server):
    before = server.target.read_text()
    commits = commit_count(server)
    response = call(server, "PATCH", "/admin/models/m3", json={"priority": 5},
                    headers={"Content-Type": "application/merge-patch+json"})
    assert response.status_code == 202, response.text
    after = server.target.read_text()
    assert changed_lines(before, after) == ["+    priority: 5"]
    body = response.json()
    assert response.headers["etag"] == body["etag"] == content_etag(server.target.read_bytes())
    assert body["spec"]["priority"] == 5 and body["name"] == "m3"
    assert body["generation"] >= 1 and body["observed_generation"] >= body["generation"]
    # The link is still a link, and its target is what changed.
    assert server.config.is_symlink() and os.readlink(server.config) == str(server.target)
    assert commit_count(server) == commits + 1
    assert git_log(server) == ["set m3: priority=5 (via PATCH /admin/models/m3)"]
    # The loop took it as its generation.
    listed = call(server, "GET", "/admin/models").json()
    assert listed["generation"] == body["generation"] and listed["etag"] == body["etag"]


def test_stale_if_match_is_412_and_nothing_is_written(server):
    got = call(server, "GET", "/admin/models/m1")
    etag = got.headers["etag"]
    first = call(server, "PATCH", "/admin/models/m1", json={"priority": 11}, headers={"If-Match": etag})
    assert first.status_code == 202, first.text
    written = server.target.read_bytes()
    stale = call(server, "PATCH", "/admin/models/m1", json={"priority": 12}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "etag_mismatch"
    assert stale.headers["etag"] == first.headers["etag"]
    assert server.target.read_bytes() == written


def test_invalid_edit_is_422_with_field_path_and_file_untouched(server):
    before = server.target.read_bytes()
    commits = commit_count(server)
    response = call(server, "PATCH", "/admin/models/m2", json={"state": "sometimes"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "models[3].state"
    assert error["problems"][0]["path"] == "models[3].state" and error["problems"][0]["line"]
    duplicate = call(server, "PUT", "/admin/models/m4", json={"source": "/x", "aliases": ["default"]})
    assert duplicate.status_code == 422 and "already used" in duplicate.json()["error"]["message"]
    assert call(server, "PATCH", "/admin/models/nope", json={"priority": 1}).status_code == 404
    assert call(server, "PATCH", "/admin/config", json={"models": []}).status_code == 422
    assert server.target.read_bytes() == before and commit_count(server) == commits


def test_sixteen_concurrent_patches_each_apply_exactly_once(server):
    before = server.target.read_text()
    commits = commit_count(server)
    barrier = threading.Barrier(16)
    responses: dict[int, httpx.Response] = {}

    def work(i: int) -> None:
        barrier.wait(30)
        responses[i] = call(server, "PATCH", f"/admin/models/m{i}", json={"max_concurrency": 100 + i})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(responses) == list(range(16))
    assert all(r.status_code == 202 for r in responses.values()), [r.text for r in responses.values()]
    after = server.target.read_text()
    added = [line for line in changed_lines(before, after) if line.startswith("+    max_concurrency")]
    assert sorted(added) == sorted(f"+    max_concurrency: {100 + i}" for i in range(16))
    assert commit_count(server) == commits + 16
    assert sorted(git_log(server, 16)) == sorted(
        f"set m{i}: max_concurrency={100 + i} (via PATCH /admin/models/m{i})" for i in range(16)
    )
    specs = {m["name"]: m["spec"] for m in call(server, "GET", "/admin/models").json()["models"]}
    assert all(specs[f"m{i}"]["max_concurrency"] == 100 + i for i in range(16))
    assert server.config.is_symlink()


def test_put_delete_and_config(server):
    before = server.target.read_text()
    created = call(server, "PUT", "/admin/models/extra", json={"source": "/nowhere", "state": "unloaded"})
    assert created.status_code == 202, created.text
    assert changed_lines(before, server.target.read_text()) == [
        "+  - name: extra", "+    source: /nowhere", "+    state: unloaded"]
    replaced = call(server, "PUT", "/admin/models/extra",
                    json={"spec": {"name": "extra", "source": "/nowhere", "state": "unloaded", "priority": 2}})
    assert replaced.status_code == 202 and replaced.json()["spec"]["priority"] == 2
    mismatch = call(server, "PUT", "/admin/models/extra", json={"name": "other", "source": "/x"})
    assert mismatch.status_code == 422 and mismatch.json()["error"]["param"] == "name"
    deleted = call(server, "DELETE", "/admin/models/extra", params={"wait": "ready", "timeout": 30})
    assert deleted.status_code == 200, deleted.text
    assert server.target.read_text() == before
    assert call(server, "GET", "/admin/models/extra").status_code == 404
    assert call(server, "DELETE", "/admin/models/extra").status_code == 404

    # A model that cannot come up ends the wait early with 502 and its status, not a timeout.
    broken = call(server, "PUT", "/admin/models/broken", json={"source": "/does/not/exist"},
                  params={"wait": "ready", "timeout": 60})
    assert broken.status_code == 502, broken.text
    assert broken.json()["error"]["code"] == "model_failed"
    assert broken.json()["status"]["phase"] == "Failed"
    assert call(server, "DELETE", "/admin/models/broken", params={"wait": "ready", "timeout": 30}).status_code == 200
    assert server.target.read_text() == before

    config = call(server, "GET", "/admin/config")
    assert config.json()["memory"] == {"budget": "90%", "reserve": "1GiB"}
    patched = call(server, "PATCH", "/admin/config", json={"memory": {"reserve": "2GiB"}},
                   headers={"If-Match": config.headers["etag"]})
    assert patched.status_code == 202 and patched.json()["memory"]["reserve"] == "2GiB"
    assert changed_lines(before, server.target.read_text()) == ["-  reserve: 1GiB", "+  reserve: 2GiB"]
    assert git_log(server) == ['set config: memory.reserve="2GiB" (via PATCH /admin/config)']


def test_wait_ready_load_unload_and_swaps(server):
    api = {"Authorization": f"Bearer {API_KEY}"}
    # Without enough time: 504 with the current status, the edit written all the same.
    hurried = call(server, "PATCH", "/admin/models/tiny", json={"state": "loaded"},
                   params={"wait": "ready", "timeout": "0.01"})
    assert hurried.status_code == 504, hurried.text
    assert hurried.json()["error"]["code"] == "wait_timeout"
    assert hurried.json()["spec"]["state"] == "loaded"
    assert hurried.json()["status"]["phase"] in ("Pending", "Loading")
    # With time enough, the same request answers once the model serves.
    ready = call(server, "PATCH", "/admin/models/tiny", json={"state": "loaded"},
                 params={"wait": "ready", "timeout": "120"})
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"]["phase"] == "Ready" and not ready.json()["changed"]
    chat = httpx.post(server.base_url + "/v1/chat/completions", headers=api, timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200
    # An imperative load (by alias) is an edit too (here a no-op) that waits until the model serves.
    loaded = call(server, "POST", "/admin/models/load", json={"model_id": "default", "timeout": 120})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["status"]["phase"] == "Ready" and loaded.json()["name"] == "tiny"
    chat = httpx.post(server.base_url + "/v1/chat/completions", headers=api, timeout=60,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["model"] == "tiny"

    # Move the alias to m0: m0 is loaded first, the alias moves only once it is Ready.
    moved = call(server, "POST", "/admin/models/swap",
                 json={"alias": "default", "to": "m0", "unload_previous": True, "timeout": 120})
    assert moved.status_code == 200, moved.text
    assert moved.json()["alias_moved"] and moved.json()["from"] == "tiny"
    assert moved.json()["spec"]["aliases"] == ["default"] and moved.json()["status"]["phase"] == "Ready"
    assert git_log(server, 2) == ["move alias default to m0 from tiny (via POST /admin/models/swap)",
                                  "load m0 before moving alias default to it (via POST /admin/models/swap)"]
    chat = httpx.post(server.base_url + "/v1/chat/completions", headers=api, timeout=60,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["model"] == "m0"

    # from/to: one edit, one generation.
    commits = commit_count(server)
    swapped = call(server, "POST", "/admin/models/swap", json={"from": "m0", "to": "tiny", "timeout": 120})
    assert swapped.status_code == 200, swapped.text
    assert commit_count(server) == commits + 1
    assert swapped.json()["status"]["phase"] == "Ready" and phase(server, "m0") == "Unloaded"

    unloaded = call(server, "POST", "/admin/models/unload", json={"model_id": "tiny", "timeout": 60})
    assert unloaded.status_code == 200 and unloaded.json()["status"]["phase"] == "Unloaded"
    assert call(server, "POST", "/admin/models/load", json={"model_id": "ghost"}).status_code == 404
    assert server.config.is_symlink()


def test_status_memory_events_and_stream(server):
    status = call(server, "GET", "/admin/status").json()
    assert {"generation", "observed_generation", "converged", "memory", "config"} <= set(status)
    memory = status["memory"]
    assert memory["budget_bytes"] > 0 and memory["free_bytes"] <= memory["budget_bytes"]
    assert memory["machine"]["total_bytes"] >= memory["budget_bytes"]
    detail = call(server, "GET", "/admin/memory").json()
    assert {m["name"] for m in detail["models"]} >= {"tiny"}

    events = call(server, "GET", "/admin/events", params={"limit": 1000}).json()["events"]
    assert any(e["reason"] == "AdminEdit" for e in events)
    last = events[-1]["seq"]

    received: list[dict] = []
    with httpx.stream("GET", server.base_url + "/admin/events", headers=ADMIN, timeout=30,
                      params={"follow": "true", "since": last}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        writer = threading.Timer(0.5, lambda: call(server, "PATCH", "/admin/models/m5", json={"priority": 55}))
        writer.start()
        for line in stream.iter_lines():
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
                reasons = {e["reason"] for e in received}
                if {"ConfigAccepted", "AdminEdit"} <= reasons:  # either may come first
                    break
        writer.join()
    assert received[0]["seq"] > last
    assert any(e["reason"] == "AdminEdit" and "m5" in e["message"] for e in received)


def test_desired_document_and_readyz(server):
    got = call(server, "GET", "/admin/desired")
    assert got.headers["content-type"].startswith("application/yaml")
    assert got.content == server.target.read_bytes()
    new_text = got.text.replace("# Desired state", "# Applied desired state")
    yaml_type = {"Content-Type": "application/yaml"}
    dry = call(server, "PUT", "/admin/desired", params={"dry_run": "true"}, content=new_text.encode(), headers=yaml_type)
    assert dry.status_code == 200 and dry.json()["changed"]
    assert "+# Applied desired state" in dry.json()["diff"]
    assert server.target.read_bytes() == got.content
    bad = call(server, "PUT", "/admin/desired", content=b"models: [{name: x}]\n", headers=yaml_type)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "models[0].source"
    applied = call(server, "PUT", "/admin/desired", content=new_text.encode(), headers={"If-Match": got.headers["etag"], **yaml_type},
                   params={"wait": "ready", "timeout": 60})
    assert applied.status_code == 200, applied.text
    assert server.target.read_text() == new_text
    deadline = time.monotonic() + 30
    while (ready := httpx.get(server.base_url + "/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.status_code == 200 and ready.json()["ready"]


def lmx(server, capsys, *argv: str) -> tuple[int, str]:
    """Run an `lmx` client command in-process against the test server."""
    from opta_lmx.cli import main

    capsys.readouterr()
    code = main([*argv, "--server", server.base_url, "--admin-key", ADMIN_KEY])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_get_describe_set_status_events(server, capsys):
    code, out = lmx(server, capsys, "get", "models")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["NAME", "DESIRED", "PHASE"]
    assert any(row.split()[0] == "m7" for row in rows)

    code, out = lmx(server, capsys, "set", "m7", "priority=7", "engine.max_tokens=4", "aliases=[seven]", "-o", "json")
    assert code == 0
    spec = json.loads(out)["spec"]
    assert spec["priority"] == 7 and spec["engine"] == {"max_tokens": 4} and spec["aliases"] == ["seven"]
    code, out = lmx(server, capsys, "set", "m7", "aliases=null", "engine=null")
    assert code == 0 and "m7: written" in out
    code, out = lmx(server, capsys, "set", "m7", "state=sometimes")
    assert code == 1 and "models[8].state" in out

    code, out = lmx(server, capsys, "describe", "m7")
    assert code == 0 and "Name:     m7" in out and "priority: 7" in out
    assert "AdminEdit" in out and "set m7: priority=7" in out
    code, out = lmx(server, capsys, "status", "-o", "json")
    assert code == 0 and json.loads(out)["memory"]["budget_bytes"] > 0
    code, out = lmx(server, capsys, "status")
    assert code == 0 and out.startswith("generation:")
    code, out = lmx(server, capsys, "events", "--limit", "5")
    assert code == 0 and len(out.splitlines()) == 5


def test_cli_apply_shows_the_diff_and_replaces(server, capsys, tmp_path):
    current = call(server, "GET", "/admin/desired").text
    new = tmp_path / "models.yaml"
    new.write_text(current.replace("reserve: ", "reserve:  ").replace("budget: 90%", "budget: 85%"))
    code, out = lmx(server, capsys, "apply", "-f", str(new), "--dry-run")
    assert code == 0 and "-  budget: 90%" in out and "+  budget: 85%" in out
    assert server.target.read_text() == current
    code, out = lmx(server, capsys, "apply", "-f", str(new), "--yes")
    assert code == 0, out
    assert server.target.read_text() == new.read_text()
    assert server.config.is_symlink()
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    priority: high\n")
    code, out = lmx(server, capsys, "apply", "-f", str(bad), "--yes")
    assert code == 1 and "HTTP 422" in out
    assert server.target.read_text() == new.read_text()
    code, out = lmx(server, capsys, "apply", "-f", str(new), "--yes")
    assert code == 0 and "no changes" in out


def test_a_person_saving_the_file_and_the_api_both_win(server):
    """A hand edit saved between a client's read and its write: neither change is lost."""
    read = call(server, "GET", "/admin/models/m6")
    hand_edited = server.target.read_text() + "# edited by hand\n"
    tmp = server.target.with_name(".models.yaml.swp")
    tmp.write_text(hand_edited)
    os.replace(tmp, server.target)  # the way editors save

    stale = call(server, "PATCH", "/admin/models/m6", json={"priority": 6}, headers={"If-Match": read.headers["etag"]})
    assert stale.status_code == 412
    assert server.target.read_text() == hand_edited
    unguarded = call(server, "PATCH", "/admin/models/m6", json={"priority": 6})
    assert unguarded.status_code == 202
    after = server.target.read_text()
    assert changed_lines(hand_edited, after) == ["+    priority: 6"]
    assert after.endswith("# edited by hand\n")
    assert server.config.is_symlink()
