"""Swap time: from saving an edit that changes a model's source to the new worker answering,
beside the bare load time of the same model (a fresh process that imports mlx-lm, loads it and
answers once, interleaved with the swaps so both see the same machine load), under two budgets:

- `both-fit`: the budget holds old and new, so the swap is make-before-break (no gap in service);
- `one-fits`: the budget holds one, so the swap drains, unloads, then loads (requests wait).

    .venv/bin/python bench/swap_time.py [--sizes tiny small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from _common import model, save, start_lmx
from first_answer import bare_seconds

CONFIG = "memory: {{budget: {budget}, reserve: 0}}\nmodels:\n  - name: m\n    source: {source}\n    memory: 600MiB\n"


def write(config: Path, text: str) -> None:
    tmp = config.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, config)


def status(base: str) -> dict:
    return httpx.get(base + "/admin/models/m", timeout=10).json()["status"] or {}


def wait(predicate, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("swap did not finish")


def swap_seconds(base: str, config: Path, budget: str, source: Path) -> float:
    old_pid = status(base)["pid"]
    started = time.perf_counter()
    write(config, CONFIG.format(budget=budget, source=source))
    wait(lambda: (s := status(base)).get("phase") == "Ready" and s.get("pid") not in (None, old_pid))
    response = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            a, b = model(size, root, 0), model(size, root, 1)
            row: dict = {"size": size}
            bares: list[float] = []
            for mode, budget in (("both-fit", "1300MiB"), ("one-fits", "1000MiB")):
                config = root / f"{size}-{mode}.yaml"
                config.write_text(CONFIG.format(budget=budget, source=a))
                proc, base = start_lmx(config, root / f"state-{size}-{mode}")
                try:
                    wait(lambda: status(base).get("phase") == "Ready")
                    times = []
                    for i in range(args.repeats):  # interleaved, so both see the same machine load
                        bares.append(bare_seconds(a))
                        times.append(swap_seconds(base, config, budget, b if i % 2 == 0 else a))
                finally:
                    proc.terminate()
                    proc.wait(30)
                row[f"swap_{mode}_s"] = round(statistics.median(times), 2)
            row["bare_load_and_answer_s"] = round(statistics.median(bares), 2)
            rows.append(row)
            print(f"{size:6} bare load+answer {row['bare_load_and_answer_s']:5.2f} s   swap, both fit "
                  f"(make-before-break) {row['swap_both-fit_s']:5.2f} s   swap, one fits (drain-unload-load) "
                  f"{row['swap_one-fits_s']:5.2f} s", flush=True)
    save("swap_time", {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
