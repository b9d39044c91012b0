"""Three hosts from one git repository (issue 21): three real `lmx serve` on loopback ports, each
with its own state directory and its own clone of one bare repository, following it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.lmx_harness import (
    free_port,
    lmx_env,
    start_server,
    stop_and_check,
    worker_processes,
)

FLEET_KEY = "fleet-key-for-tests-abcdefghij"


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=ops", "-c", "user.email=ops@fleet", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def fleet_yaml(ports: dict[str, int], m: str, other: str, m_hosts: str = "[a, b]", priority: str = "1") -> str:
    hosts = "".join(f'    - {{name: {n}, url: "http://127.0.0.1:{p}"}}\n' for n, p in ports.items())
    return (f"# one file for the three hosts\nfleet:\n  grace: 3s\n  hosts:\n{hosts}models:\n"
            f"  - name: m\n    source: {m}\n    priority: {priority}\n    hosts: {m_hosts}\n"
            f"  - name: other\n    source: {other}\n    hosts: [c]\n")


def push(seed, text: str, message: str) -> str:
    (seed / "models.yaml").write_text(text)
    git(seed, "commit", "-q", "-am", message)
    git(seed, "push", "-q", "origin", "HEAD:main")
    return git(seed, "rev-parse", "HEAD")


def status(server, name: str) -> dict:
    return {m["name"]: m["status"] or {} for m in server.admin_models()["models"]}[name]


class Client(threading.Thread):
    """Streams requests for `model` through one host until stopped; keeps every outcome."""

    def __init__(self, base: str, model: str):
        super().__init__(daemon=True)
        self.base, self.model = base, model
        self.outcomes: list[tuple[int, bool, str]] = []  # (status, complete, host that answered)
        self.stopping = threading.Event()

    def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
        with httpx.Client(timeout=120) as client:
            while not self.stopping.is_set():
                try:
                    with client.stream("POST", self.base + "/v1/chat/completions", json=body) as answer:
                        text = "".join(answer.iter_text())
                        self.outcomes.append((answer.status_code, "data: [DONE]" in text,
                                              answer.headers.get("x-lmx-host", "c")))
                except httpx.HTTPError as error:
                    self.outcomes.append((0, False, repr(error)))
                time.sleep(0.05)


@pytest.mark.timeout(420)
def test_three_hosts_follow_one_repository_forward_requests_and_fail_over(tmp_path, tiny_model, tiny_model_b):
    remote, seed = tmp_path / "fleet.git", tmp_path / "seed"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    git(tmp_path, "clone", "-q", str(remote), str(seed))
    ports = {name: free_port() for name in "abc"}
    (seed / "models.yaml").write_text(fleet_yaml(ports, tiny_model, tiny_model_b))
    git(seed, "add", "models.yaml")
    git(seed, "commit", "-q", "-m", "the fleet")
    git(seed, "push", "-q", "origin", "HEAD:main")
    servers = {}
    try:
        for name, port in ports.items():
            clone = tmp_path / name
            git(tmp_path, "clone", "-q", str(remote), str(clone))
            servers[name] = start_server(clone / "models.yaml", tmp_path / f"state-{name}", "--fleet-host", name,
                                         "--git-follow", "origin", "--git-interval", "1", port=port,
                                         env=lmx_env(LMX_FLEET_KEY=FLEET_KEY))
        a, b, c = servers["a"], servers["b"], servers["c"]
        a.wait_ready("m")
        c.wait_ready("other")
        assert status(b, "m")["reason"] == "OnAnotherHost" and status(b, "m")["host"] == "a"
        other_pid = status(c, "other")["pid"]

        # a commit moves m from a to b while a client streams to it through c: every request answered
        client = Client(c.base_url, "m")
        client.start()
        c.wait_for(lambda s: len(client.outcomes) >= 3, 60, "the client's first answers")
        moved = push(seed, fleet_yaml(ports, tiny_model, tiny_model_b, m_hosts="[b, a]"), "m prefers b")
        b.wait_ready("m")
        a.wait_for(lambda s: status(s, "m").get("phase") == "Unloaded", 60, "m unloaded on a")
        c.wait_for(lambda s: client.outcomes[-1][2] == "b", 60, "c forwarding m to b")
        client.stopping.set()
        client.join(60)
        assert client.outcomes and all(code == 200 and done for code, done, _ in client.outcomes), client.outcomes
        assert {host for _, _, host in client.outcomes} >= {"a", "b"}
        for server in servers.values():
            assert server.get("/admin/git").json()["head"] == moved

        # a commit that does not validate is refused on all three; the last good state keeps serving
        bad = push(seed, fleet_yaml(ports, tiny_model, tiny_model_b, m_hosts="[b, a]", priority="lots"), "a typo")
        for server in servers.values():
            server.wait_for(lambda s: (s.get("/admin/git").json()["refused"] or {}).get("commit") == bad, 30,
                            "the bad commit refused")
            assert server.get("/admin/git").json()["head"] == moved
            events = server.get("/admin/events").json()["events"]
            assert any(e["reason"] == "GitRefused" and bad[:12] in e["message"] for e in events)
        assert httpx.post(c.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}).status_code == 200
        fixed = push(seed, fleet_yaml(ports, tiny_model, tiny_model_b, m_hosts="[b, a]", priority="2"), "fix")
        for server in servers.values():
            server.wait_for(lambda s: s.get("/admin/git").json()["head"] == fixed, 30, "the fix applied")

        # an admin edit on c reaches a and b through the repository
        edit = httpx.patch(c.base_url + "/admin/models/other", json={"priority": 5}, timeout=60)
        assert edit.status_code in (200, 202), edit.text
        for server in (a, b):
            server.wait_for(lambda s: "priority: 5" in s.config.read_text(), 30, "c's edit pulled")
        assert "# one file for the three hosts" in a.config.read_text()

        # b dies (its server and its workers): m, which lists a second host, is served from a
        b_workers = worker_processes(b.state_dir)
        b.proc.send_signal(signal.SIGKILL)
        for proc in b_workers:
            proc.kill()
        b.proc.wait(10)
        a.wait_ready("m", timeout=60)
        answer = httpx.post(c.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "after b died"}], "max_tokens": 4})
        assert answer.status_code == 200 and answer.headers.get("x-lmx-host") == "a", answer.text
        assert status(c, "other")["pid"] == other_pid  # nothing b did not run is disturbed
        fleet_view = c.get("/admin/fleet").json()
        assert {p["name"]: p["up"] for p in fleet_view["peers"]} == {"a": True, "b": False}
        assert fleet_view["placements"]["m"]["host"] == "a"
        shown = subprocess.run([sys.executable, "-m", "opta_lmx.cli", "get", "models", "--fleet", "--server", c.base_url],
                               capture_output=True, text=True, env=lmx_env(), timeout=60)
        assert re.search(r"^m +a +Ready", shown.stdout, re.MULTILINE), shown.stdout + shown.stderr
        assert re.search(r"^other +c +Ready", shown.stdout, re.MULTILINE) and re.search(r"^b +no ", shown.stdout, re.MULTILINE)
    finally:
        for name, server in servers.items():
            if server.proc.poll() is None:
                stop_and_check(server)
