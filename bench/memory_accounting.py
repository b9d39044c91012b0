"""What the plan counts against what the machine lost, per start mode, across loads, swaps and exits.

For each `engine_start` mode (template on Linux, spare, cold) one real `lmx serve` runs through the
same steps: the helpers alone; two generated `small` models loaded; one of them swapped to other
weights; a third added; two removed. After each step has settled (converged, every worker
measured), it records:

- counted: what the plan counts (the helpers' fixed cost + every worker's counted bytes, from
  `/admin/models` -> observed);
- lost: what the machine lost since before the server started, less the control plane's own
  anonymous memory (it serves, it holds no model), two ways: the memory no one can reclaim
  (/proc/meminfo's AnonPages + Shmem + PageTables + KernelStack + SUnreclaim: the goal, counted
  >= lost at every step), and MemAvailable's drop (shown beside it: it moves by +-100 MiB with
  the page cache of every file read here, so a step's figure is noisy);
- the budget left for workers (budget - fixed cost), whose swing across the steps is the goal
  (under 5% of the budget); beside it, what the old figure (the template's PSS, which splits its
  shared pages among its children) would have left, to show the swing it had.

    .venv/bin/python bench/memory_accounting.py [--modes template spare cold] [--budget 12GiB]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from _common import model, save
from opta_lmx.engine.memory import process_bytes
from opta_lmx.engine.template import fork_supported
from opta_lmx.state.quantities import format_size, parse_size
from tests.lmx_harness import lmx_env, start_server, stop_and_check, worker_processes

MiB = 2**20


def observed(server) -> dict:
    return httpx.get(server.base_url + "/admin/models", timeout=30).json()


def settle(server, names: list[str], timeout: float = 300) -> dict:
    """Until every model is Ready, the loop converged and every worker measured twice (2 s apart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = observed(server)
        phases = {m["name"]: (m["status"] or {}).get("phase") for m in data["models"]}
        workers = data["observed"]["workers"]
        if (data["converged"] and all(phases.get(n) == "Ready" for n in names) and len(workers) == len(names)
                and all(w["measured_bytes"] for w in workers)):
            time.sleep(3.0)  # another pass measures them again; the kernel settles its counters
            return observed(server)
        time.sleep(0.5)
    raise RuntimeError(f"not settled: {phases}")


def template_pss(server) -> int | None:
    """The old figure: the template's PSS (its shared pages split among the workers it forked)."""
    for proc in worker_processes(server.state_dir):
        try:
            if "opta_lmx.engine.template_main" in proc.cmdline():
                return int(proc.memory_full_info().pss)
        except psutil.Error:
            continue
    return None


UNRECLAIMABLE = ("AnonPages", "Shmem", "PageTables", "KernelStack", "SUnreclaim")


def unreclaimable() -> int:
    """What the machine holds that it cannot give back without killing something (bytes)."""
    fields = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) * 1024
    return sum(fields.get(name, 0) for name in UNRECLAIMABLE)


def old_counted(server, mode: str) -> int:
    """What the old accounting counted: each worker's RSS (PSS if forked from the template), the
    template's PSS (spares' PSS); for comparison with what is counted now."""
    total = 0
    for proc in worker_processes(server.state_dir):
        try:
            info = proc.memory_full_info()
            prepared = any(m in proc.cmdline() for m in ("opta_lmx.engine.template_main", "opta_lmx.engine.worker_main"))
            forked = mode == "template" and proc.ppid() != server.proc.pid
            total += int(info.pss) if prepared or forked else int(info.rss)
        except psutil.Error:
            continue
    return total


def control_plane_bytes(server) -> int:
    return process_bytes(psutil.Process(server.proc.pid), private=False)


def run_mode(mode: str, models: list[Path], budget: int, root: Path) -> dict:
    state = root / f"state-{mode}"
    head = f"engine_start: {{mode: {mode}}}\nmemory: {{budget: {budget}, reserve: 0}}\n" \
           "defaults: {engine: {max_tokens: 8}}\nmodels:\n"

    def entry(name: str, source: Path) -> str:
        return f"  - name: {name}\n    source: {source}\n"

    time.sleep(2.0)
    baseline, baseline_held = psutil.virtual_memory().available, unreclaimable()
    config = root / f"models-{mode}.yaml"
    config.write_text(head.replace("models:\n", "models: []\n"))
    server = start_server(config, state, env=lmx_env(LMX_ENGINE_START=""))
    steps = [
        ("helpers alone", {}),
        ("two models loaded", {"a": models[0], "b": models[1]}),
        ("b swapped to other weights", {"a": models[0], "b": models[2]}),
        ("a third model", {"a": models[0], "b": models[2], "c": models[1]}),
        ("two removed", {"c": models[1]}),
    ]
    rows = []
    try:
        if mode != "cold":
            deadline = time.monotonic() + 300
            while not observed(server)["observed"]["engine_start"]["helper"]["waiting"]:
                assert time.monotonic() < deadline, "the helpers never waited"
                time.sleep(0.5)
        for label, entries in steps:
            server.write_config(head + "".join(entry(n, s) for n, s in entries.items()) if entries
                                else head.replace("models:\n", "models: []\n"))
            data = settle(server, list(entries))
            memory, start = data["observed"]["memory"], data["observed"]["engine_start"]
            counted = memory["fixed_bytes"] + sum(w["bytes"] for w in data["observed"]["workers"])
            own = control_plane_bytes(server)
            lost = unreclaimable() - baseline_held - own
            lost_available = baseline - psutil.virtual_memory().available - own
            pss = template_pss(server)
            row = {"step": label, "counted_bytes": counted, "lost_bytes": lost, "lost_available_bytes": lost_available,
                   "old_counted_bytes": old_counted(server, mode),
                   "fixed_bytes": memory["fixed_bytes"],
                   "helper_measured_bytes": start["measured_bytes"], "workers": {
                       w["name"]: {"counted": w["bytes"], "measured": w["measured_bytes"], "forked": w["forked"]}
                       for w in data["observed"]["workers"]},
                   "budget_left_bytes": memory["budget_bytes"],
                   "old_budget_left_bytes": budget - pss if pss is not None else None}
            rows.append(row)
            print(f"  [{mode}] {label:28} counted {format_size(counted):>10}  lost {format_size(lost):>10}  "
                  f"ratio {counted / lost if lost > 0 else float('nan'):5.2f}  (MemAvailable's drop "
                  f"{format_size(lost_available)})  fixed {format_size(memory['fixed_bytes'])}"
                  f"  budget left {format_size(memory['budget_bytes'])}"
                  + (f" (old figure: {format_size(budget - pss)})" if pss is not None else ""), flush=True)
    finally:
        stop_and_check(server)
    left = [r["budget_left_bytes"] for r in rows]
    old_left = [r["old_budget_left_bytes"] for r in rows if r["old_budget_left_bytes"] is not None]
    summary = {
        # 1 MiB: the noise floor (this benchmark's own process and the kernel's slab move by that much)
        "never_undercounts": all(r["counted_bytes"] >= r["lost_bytes"] - MiB for r in rows),
        "counted_over_lost": [round(r["counted_bytes"] / r["lost_bytes"], 3) if r["lost_bytes"] > 0 else None
                              for r in rows],
        "old_counted_over_lost": [round(r["old_counted_bytes"] / r["lost_bytes"], 3) if r["lost_bytes"] > 0 else None
                                  for r in rows],
        "budget_left_swing": round((max(left) - min(left)) / budget, 4),
        "old_budget_left_swing_bytes": (max(old_left) - min(old_left)) if old_left else None,
        "old_budget_left_swing": round((max(old_left) - min(old_left)) / budget, 4) if old_left else None,
    }
    print(f"  [{mode}] {summary}", flush=True)
    return {"mode": mode, "steps": rows, **summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["template", "spare", "cold"] if fork_supported()
                        else ["spare", "cold"])
    parser.add_argument("--budget", default="12GiB")
    parser.add_argument("--out", default="memory_accounting")
    args = parser.parse_args()
    budget = parse_size(args.budget)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = [model("small", root, seed) for seed in (0, 1, 2)]
        results = [run_mode(mode, models, budget, root) for mode in args.modes]
    save(args.out, {"budget_bytes": budget, "modes": results,
                    "goal": "counted >= lost at every step; budget left for workers swings < 5%"})


if __name__ == "__main__":
    main()
