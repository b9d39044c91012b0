"""The fleet (issue 21): three `lmx serve` on loopback (the default start mode), each with its own
state directory and clone of one bare repository, following it.

- commit to converged: a commit moving a model from one host to another is pushed; seconds until
  all three hosts have it checked out and the model is Ready on its new host (and gone from the
  old one), (a) waiting for the hosts' own fetch (`--git-interval`), (b) with `POST /admin/git/sync`
  sent to each host right after the push (what a push hook would do).
- failover: the host serving a model that lists a second host is SIGKILLed (with its workers);
  seconds until the second host serves it and a request through the third host is answered
  (`fleet.grace` 3 s, the peers polled every second).
- forwarding overhead: a one-token chat completion sent to the host that runs the model and, the
  same request interleaved, to another host that forwards it; p50 and p90 of both, and the p50
  difference (goal: within 2 ms).

    .venv/bin/python bench/fleet.py [--requests N]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _common import model, save

from tests.lmx_harness import (
    free_port,
    lmx_env,
    start_server,
    stop_and_check,
    worker_processes,
)

KEY = "bench-fleet-key-0123456789abcdef"
INTERVAL = 5.0
CLIENT = httpx.Client(timeout=120)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def fleet_yaml(ports: dict[str, int], m: Path, hosts: str) -> str:
    listed = "".join(f'    - {{name: {n}, url: "http://127.0.0.1:{p}"}}\n' for n, p in ports.items())
    return f"fleet:\n  grace: 3s\n  hosts:\n{listed}models:\n  - name: m\n    source: {m}\n    hosts: {hosts}\n"


def push(seed: Path, text: str, message: str) -> str:
    (seed / "models.yaml").write_text(text)
    git(seed, "commit", "-q", "-am", message)
    git(seed, "push", "-q", "origin", "HEAD:main")
    return git(seed, "rev-parse", "HEAD")


def phase(server, name: str = "m") -> str | None:
    for entry in CLIENT.get(server.base_url + "/admin/models").json()["models"]:
        if entry["name"] == name:
            return (entry["status"] or {}).get("phase")
    return None


def converged(servers: dict, sha: str, owner: str) -> bool:
    for name, server in servers.items():
        if CLIENT.get(server.base_url + "/admin/git").json()["head"] != sha:
            return False
        if (phase(server) == "Ready") != (name == owner):
            return False
    return True


def move(servers: dict, seed: Path, ports: dict, m: Path, hosts: str, owner: str, sync: bool) -> float:
    started = time.perf_counter()
    sha = push(seed, fleet_yaml(ports, m, hosts), f"m on {owner}")
    if sync:
        for server in servers.values():
            CLIENT.post(server.base_url + "/admin/git/sync")
    while not converged(servers, sha, owner):
        time.sleep(0.05)
    return time.perf_counter() - started


def one_token(base: str) -> float:
    started = time.perf_counter()
    answer = CLIENT.post(base + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    answer.raise_for_status()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmx-fleet-") as tmp:
        root = Path(tmp)
        m = model("tiny", root, 0)
        remote, seed = root / "fleet.git", root / "seed"
        git(root, "init", "-q", "--bare", "-b", "main", str(remote))
        git(root, "clone", "-q", str(remote), str(seed))
        ports = {n: free_port() for n in "abc"}
        (seed / "models.yaml").write_text(fleet_yaml(ports, m, "[a, b]"))
        git(seed, "add", "models.yaml")
        git(seed, "commit", "-q", "-m", "fleet")
        git(seed, "push", "-q", "origin", "HEAD:main")
        servers = {}
        try:
            for name, port in ports.items():
                git(root, "clone", "-q", str(remote), str(root / name))
                servers[name] = start_server(root / name / "models.yaml", root / f"state-{name}", "--fleet-host", name,
                                             "--git-follow", "origin", "--git-interval", str(INTERVAL), port=port,
                                             env=lmx_env(LMX_FLEET_KEY=KEY, LMX_ENGINE_START=""))
            servers["a"].wait_ready("m", timeout=300)
            moves = {"interval": [], "sync": []}
            for round_ in range(2):
                for sync in (False, True):
                    to_b = move(servers, seed, ports, m, "[b, a]", "b", sync)
                    to_a = move(servers, seed, ports, m, "[a, b]", "a", sync)
                    moves["sync" if sync else "interval"] += [to_b, to_a]
            print("commit to converged:", moves, flush=True)

            direct, forwarded = [], []
            for _ in range(10):  # warm both paths
                one_token(servers["a"].base_url), one_token(servers["c"].base_url)
            for _ in range(args.requests):
                direct.append(one_token(servers["a"].base_url))
                forwarded.append(one_token(servers["c"].base_url))
            forwarding = {"direct_p50_ms": 1000 * statistics.median(direct),
                          "forwarded_p50_ms": 1000 * statistics.median(forwarded),
                          "direct_p90_ms": 1000 * percentile(direct, 0.9),
                          "forwarded_p90_ms": 1000 * percentile(forwarded, 0.9)}
            forwarding["overhead_p50_ms"] = forwarding["forwarded_p50_ms"] - forwarding["direct_p50_ms"]
            print("forwarding:", forwarding, flush=True)

            a = servers["a"]
            workers = worker_processes(a.state_dir)
            killed = time.perf_counter()
            a.proc.send_signal(signal.SIGKILL)
            for proc in workers:
                proc.kill()
            while phase(servers["b"]) != "Ready":
                time.sleep(0.05)
            ready = time.perf_counter() - killed
            while True:
                try:
                    one_token(servers["c"].base_url)
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            answered = time.perf_counter() - killed
            failover = {"grace_s": 3.0, "serving_elsewhere_s": ready, "answered_through_third_host_s": answered}
            print("failover:", failover, flush=True)
        finally:
            for server in servers.values():
                if server.proc.poll() is None:
                    stop_and_check(server)
    save("fleet", {"git_interval_s": INTERVAL, "commit_to_converged_s": moves,
                   "commit_to_converged_median_s": {k: statistics.median(v) for k, v in moves.items()},
                   "forwarding": forwarding, "failover": failover, "requests": args.requests})


if __name__ == "__main__":
    main()
