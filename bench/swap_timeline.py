"""Where a swap's time goes: one `lmx serve`, one swap per budget, every milestone on one clock.

The swap is timed as `serve_fast_start.py` times it (saving models.yaml -> the new worker Ready
in status -> its 1-token answer through the gateway), and split into what happened meanwhile,
each read from its own source on the machine's wall clock:

- the control plane's log (`--log-format json`): the watch's nudge, the pass, the worker start;
- the event stream: Replaced / Draining / Unloaded / Loading / Ready, with their times;
- the new worker's log: `lmx-worker:` milestones (assigned, model loaded, serving);
- this client: status first shows Ready, the answer returns.

    .venv/bin/python bench/swap_timeline.py [--size small|swap] [--mode template|spare] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from _common import save
from serve_fast_start import answer, config_text, cpu_seconds, settle, status

from opta_lmx.devmodel import make_model, model_files
from tests.lmx_harness import lmx_env, start_server, worker_processes

MiB = 2**20
MILESTONE = re.compile(r"lmx-worker: (?P<what>[a-z ]+) at (?P<ts>\d+\.\d+)")


def worker_milestones(log_dir: Path, since: float) -> dict[str, float]:
    """The worker logs' milestones written after `since` (only worker logs have them)."""
    found: dict[str, float] = {}
    for path in sorted(log_dir.rglob("*.log"), key=lambda p: p.stat().st_mtime):
        for match in MILESTONE.finditer(path.read_text(errors="replace")):
            ts = float(match["ts"])
            if ts >= since:
                found[match["what"]] = ts
    return found


def control_plane_lines(log_path: Path, since: float) -> list[tuple[float, str]]:
    lines = []
    for raw in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("ts", 0) >= since:
            lines.append((record["ts"], record["msg"][:110]))
    return lines


def busy_candidates(server, old_pid: int | None) -> list[int]:
    """The control plane, the old worker and the template: who else uses the CPU during a swap."""
    pids = [server.proc.pid, *(p.pid for p in worker_processes(server.state_dir))]
    return sorted(set(pids) | ({old_pid} if old_pid else set()))


def one_swap(server, mode: str, current: Path, other: Path, budget: int, model_bytes: int) -> dict:
    settle(server, mode)
    old_pid = status(server, "m").get("pid")
    events_before = server.get("/admin/events").json()["events"]
    after_seq = events_before[-1]["seq"] if events_before else 0
    marks: dict[str, float] = {}
    cpu_before = {pid: cpu_seconds(pid) for pid in busy_candidates(server, old_pid)}
    started = time.time()
    server.write_config(config_text(mode, other, budget, model_bytes))
    while True:
        now = status(server, "m")
        if now.get("phase") == "Ready" and now.get("pid") not in (None, old_pid):
            marks["client: status shows Ready"] = time.time()
            cpu = {pid: round(now - before, 3) for pid, before in cpu_before.items()  # gone (killed): left out
                   if before is not None and (now := cpu_seconds(pid)) is not None}
            answer(server, "m")
            marks["client: answer returned"] = time.time()
            answer(server, "m")
            marks["client: second answer returned (not part of the swap)"] = time.time()
            break
        time.sleep(0.01)
    time.sleep(1.0)  # let the old worker's exit and the last events land
    for event in server.get("/admin/events").json()["events"]:
        if event["seq"] > after_seq:
            marks.setdefault(f"event: {event['object']} {event['reason']}", event["time"])
    for what, ts in worker_milestones(server.state_dir.parent, started).items():
        marks[f"worker: {what}"] = ts
    for ts, message in control_plane_lines(server.log_path, started):
        if any(word in message for word in ("starting worker", "ready at", "stopped", "pass")):
            marks.setdefault(f"lmx: {message}", ts)
    print(f"  CPU seconds used from the edit to Ready, by process: {cpu}")
    return {"total_s": marks["client: answer returned"] - started, "cpu_s": {str(k): v for k, v in cpu.items()},
            "marks": sorted(((round(ts - started, 3), what) for what, ts in marks.items()))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="small")
    parser.add_argument("--mode", default="template")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budgets", nargs="+", default=["one", "both"], choices=["one", "both"])
    args = parser.parse_args()
    os.environ.update(lmx_env())
    result: dict = {"size": args.size, "mode": args.mode, "swaps": {}}
    with tempfile.TemporaryDirectory(prefix="swap-timeline-") as tmp:
        root = Path(tmp)
        a = make_model(root / "a", size=args.size, seed=0)
        b = make_model(root / "b", size=args.size, seed=1)
        weights = sum(model_files(a).values())
        model_bytes = weights + 900 * MiB
        budgets = {"one": 1200 * MiB + model_bytes * 3 // 2, "both": 1200 * MiB + model_bytes * 5 // 2}
        config = root / "models.yaml"
        config.write_text(config_text(args.mode, a, budgets["one"], model_bytes))
        server = start_server(config, root / "state", "--log-format", "json", env=lmx_env(LMX_LOG_LEVEL="debug"))
        try:
            server.wait_ready("m", timeout=600)
            current = a
            for _ in range(args.repeats):
                for budget in args.budgets:
                    server.write_config(config_text(args.mode, current, budgets[budget], model_bytes))
                    other = b if current == a else a
                    swap = one_swap(server, args.mode, current, other, budgets[budget], model_bytes)
                    current = other
                    result["swaps"].setdefault(budget, []).append(swap)
                    print(f"\nbudget for {budget}: {swap['total_s']:.3f} s")
                    for offset, what in swap["marks"]:
                        print(f"  {offset:+7.3f}  {what}")
        finally:
            server.stop()
    for budget, swaps in result["swaps"].items():
        print(f"median, budget for {budget}: {statistics.median(s['total_s'] for s in swaps):.3f} s")
    save(f"swap_timeline-{args.size}-{args.mode}", result)


if __name__ == "__main__":
    main()
