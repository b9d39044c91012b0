"""How long a worker keeps generating for non-streaming clients that gave up (issue 15 item 7).

N clients ask for a long answer (end-of-text ids banned, so all of max_tokens is generated),
give up after `--leave-after` seconds, and the clock runs until the worker reports nothing
running (`/v1/status` num_running 0) and the gateway nothing in flight. Saves
bench/results/client_leaves.json:
    .venv/bin/python bench/client_leaves.py [--clients 20] [--leave-after 0.2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import save  # noqa: E402
from opta_lmx.devmodel import make_model  # noqa: E402
from tests.lmx_harness import start_server, stop_and_check  # noqa: E402

BODY = {"model": "a", "messages": [{"role": "user", "content": "count to a million"}], "max_tokens": 20000,
        "temperature": 0.0, "logit_bias": {"0": -100, "2": -100}}


def _leave(base: str, after: float) -> None:
    try:
        httpx.post(base + "/v1/chat/completions", json=BODY, timeout=after)
    except httpx.TimeoutException:
        pass


def _busy(server, worker: str) -> bool:
    running = httpx.get(worker + "/v1/status", timeout=5).json().get("num_running", 0)
    in_flight = [line for line in server.get("/metrics").text.splitlines()
                 if line.startswith('lmx_requests_in_flight{model="a"}')]
    return bool(running) or any(float(line.split()[-1]) for line in in_flight)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--leave-after", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bound", type=float, default=60.0, help="stop waiting after this many seconds")
    args = parser.parse_args()
    idle_after: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root / "model", size="tiny")
        config = root / "models.yaml"
        config.write_text(f"models:\n  - name: a\n    source: {model}\n    engine: {{continuous_batching: true}}\n")
        server = start_server(config, root / "state")
        try:
            server.wait_ready("a", timeout=300)
            worker = next(m for m in server.admin_models()["models"] if m["name"] == "a")["status"]["address"]
            for _ in range(args.rounds):
                clients = [threading.Thread(target=_leave, args=(server.base_url, args.leave_after))
                           for _ in range(args.clients)]
                for client in clients:
                    client.start()
                for client in clients:
                    client.join(30)
                left = time.monotonic()
                while _busy(server, worker) and time.monotonic() - left < args.bound:
                    time.sleep(0.1)
                idle_after.append(round(time.monotonic() - left, 2))
                print(f"worker idle {idle_after[-1]:.2f}s after {args.clients} clients left", flush=True)
        finally:
            stop_and_check(server)
    save("client_leaves", {"clients": args.clients, "leave_after_s": args.leave_after, "max_tokens": 20000,
                           "bound_s": args.bound, "idle_after_clients_left_s": idle_after,
                           "median_s": statistics.median(idle_after)})


if __name__ == "__main__":
    main()
