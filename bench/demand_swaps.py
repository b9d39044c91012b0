"""Demand swaps per 100 interleaved requests: two on-demand tiny models of equal priority beside a
`loaded` one, a budget that holds the loaded model plus one more, four clients each alternating
between the two on-demand models. Run with the demand policy's defaults (min_residency 10s,
serve_queue 5s) and with both at 0 (swap as soon as the other model is asked for).

    .venv/bin/python bench/demand_swaps.py [--requests 100] [--clients 4] [--workload alternating|random]

`alternating`: each client asks a, b, a, b... (so every client needs both models in turn);
`random`: each request names a or b at random (seeded), so requests for the resident model queue
up behind each other while the other one is asked for.

A swap is one eviction by demand (`lmx_demand_evictions`); loads count each on-demand worker
that became Ready. Results in bench/results/demand_swaps.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from _common import REPO, RESULTS, model, save
from tests.lmx_harness import lmx_env

PORT = 18201  # this benchmark's port (the demand helper's range)
CONFIG = """memory: {{budget: 1300MiB, reserve: 0}}
defaults: {{engine: {{max_tokens: 8}}, demand: {{min_residency: {residency}, serve_queue: {queue}}}}}
models:
  - {{name: base, source: {a}, memory: 600MiB}}
  - {{name: a, source: {a}, memory: 600MiB, state: on-demand}}
  - {{name: b, source: {b}, memory: 600MiB, state: on-demand}}
"""


def serve(config: Path, state_dir: Path) -> subprocess.Popen:
    log = open(state_dir.parent / f"lmx-serve-{state_dir.name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "opta_lmx.cli", "serve", "--config", str(config), "--port", str(PORT),
         "--state-dir", str(state_dir), "--load-wait-timeout", "300"],
        stdout=log, stderr=subprocess.STDOUT, env=lmx_env(), cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            phases = {m["name"]: (m["status"] or {}).get("phase")
                      for m in httpx.get(f"http://127.0.0.1:{PORT}/admin/models", timeout=2).json()["models"]}
            if phases.get("base") == "Ready":
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("lmx serve did not become ready")


def metric(base: str, prefix: str) -> float:
    lines = [line for line in httpx.get(base + "/metrics", timeout=10).text.splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def run(label: str, residency: str, queue: str, sources: tuple[Path, Path], requests: int, clients: int,
        root: Path, workload: str) -> dict:
    base = f"http://127.0.0.1:{PORT}"
    config = root / f"{label}.yaml"
    config.write_text(CONFIG.format(residency=residency, queue=queue, a=sources[0], b=sources[1]))
    proc = serve(config, root / f"state-{label}")
    results: list[tuple[int, float]] = []
    try:
        def client(index: int) -> None:
            rng = random.Random(index)
            for turn in range(requests // clients):
                name = ("a", "b")[(index + turn) % 2] if workload == "alternating" else rng.choice("ab")
                started = time.perf_counter()
                try:
                    code = httpx.post(base + "/v1/chat/completions", timeout=320, json={
                        "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code
                except httpx.HTTPError:
                    code = 0
                results.append((code, time.perf_counter() - started))

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        events = httpx.get(base + "/admin/events", timeout=10).json()["events"]
        loads = sum(1 for e in events if e["object"] in ("a", "b") and e["reason"] == "Ready")
        swaps = metric(base, "lmx_demand_evictions_total")
        base_restarts = sum(1 for e in events if e["object"] == "base" and e["reason"] in ("Ready", "Unloaded"))
    finally:
        proc.terminate()
        proc.wait(60)
    latencies = sorted(seconds for _code, seconds in results)
    figures = {
        "policy": {"min_residency": residency, "serve_queue": queue},
        "requests": len(results), "answered": sum(1 for code, _s in results if code == 200),
        "swaps": int(swaps), "swaps_per_100_requests": round(100 * swaps / max(len(results), 1), 1),
        "on_demand_loads": loads, "base_loads": base_restarts, "wall_seconds": round(wall, 1),
        "latency_median_s": round(statistics.median(latencies), 2), "latency_max_s": round(latencies[-1], 2),
    }
    print(label, figures, flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workload", choices=["alternating", "random"], default="alternating")
    parser.add_argument("--only", choices=["with_policy", "without_policy"], help="run one policy (keep the other)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="demand-bench-"))
    sources = (model("tiny", root, seed=0), model("tiny", root, seed=1))
    previous = RESULTS / "demand_swaps.json"
    saved = json.loads(previous.read_text()) if previous.exists() else {}
    figures = saved.get("workloads", {})
    if "with_policy" in saved:  # a file from before workloads were named: it was the alternating one
        figures["alternating"] = {k: saved[k] for k in ("setup", "with_policy", "without_policy")}
    result = figures.setdefault(args.workload, {})
    result["setup"] = f"{args.clients} clients, {args.workload} a/b, {args.requests} requests, budget = base + one model"
    for key, residency, queue in (("with_policy", "10s", "5s"), ("without_policy", "0s", "0s")):
        if args.only in (None, key):
            result[key] = run(key.replace("_", "-"), residency, queue, sources, args.requests, args.clients, root,
                              args.workload)
    save("demand_swaps", {"workloads": figures})


if __name__ == "__main__":
    main()
