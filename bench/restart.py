"""How long a restart takes: cold start vs. restart after SIGKILL (workers adopted), and clean stop.

Prints the figures and saves them to bench/results/restart.json:
    .venv/bin/python bench/restart.py [--model-size tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opta_lmx.devmodel import make_model  # noqa: E402
from tests.lmx_harness import start_server, worker_processes  # noqa: E402


def _ready(server, name: str) -> float:
    start = time.monotonic()
    server.wait_ready(name, timeout=300)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-size", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"cold_start_to_ready_s": [], "restart_after_sigkill_to_ready_s": [],
                                       "sigterm_to_exit_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root / "model", size=args.model_size)
        config = root / "models.yaml"
        config.write_text(f"models:\n  - name: a\n    source: {model}\n")
        for round_ in range(args.rounds):
            state = root / f"state{round_}"
            t0 = time.monotonic()
            first = start_server(config, state)
            first.wait_ready("a", timeout=300)
            figures["cold_start_to_ready_s"].append(time.monotonic() - t0)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
            t0 = time.monotonic()
            second = start_server(config, state)
            second.wait_ready("a", timeout=300)
            figures["restart_after_sigkill_to_ready_s"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            assert second.stop() == 0
            figures["sigterm_to_exit_s"].append(time.monotonic() - t0)
            assert not worker_processes(state)
    summary = {k: {"median": round(statistics.median(v), 3), "all": [round(x, 3) for x in v]}
               for k, v in figures.items()}
    result = {"model_size": args.model_size, "rounds": args.rounds, "machine": platform.platform(),
              "processor": platform.machine(), "figures": summary}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "restart.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
