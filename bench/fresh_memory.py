"""What a fresh process pays for memory that an in-process registry reuses (issue 10's remaining gap).

Two measurements, each in fresh processes, saved to bench/results/fresh_memory.json:

- touching N MB (a numpy array) right after another process freed 1.5 GB, and after 10 s of
  idleness, with and without transparent huge pages for malloc (GLIBC_TUNABLES): on a VM that
  hands idle memory back to its host, the second case faults far more slowly;
- loading the swap-size model's weights (mlx-lm, `lazy=True` then evaluating the parameters) in a
  fresh process, against a second load of the other model in the same process after the first
  was dropped (what vllm-mlx's registry does on a swap).

    .venv/bin/python bench/fresh_memory.py [--rounds 3] [--megabytes 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save

TOUCH = "import numpy as np, time; t = time.perf_counter(); a = np.ones({n} * 2**20 // 8); print(time.perf_counter() - t)"
LOADS = """
import gc, sys, time
from pathlib import Path
import mlx.core as mx
import mlx_lm.models.llama  # imported before timing: a first load would import it (the generated models are llama)
from mlx_lm.utils import load_model
def load(path):
    started = time.perf_counter()
    model, _ = load_model(Path(path), lazy=True)
    mx.eval(model.parameters())
    return model, time.perf_counter() - started
first, fresh = load(sys.argv[1])
del first
gc.collect()
_, again = load(sys.argv[2])
print(fresh, again)
"""


def run(code: str, *args: str, env: dict | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env=env).stdout.split("\n")[-2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=500)
    args = parser.parse_args()
    plain, thp = dict(os.environ), dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    touch: dict[str, list[float]] = {"after_free": [], "after_free_thp": [], "after_idle": [], "after_idle_thp": []}
    for _ in range(args.rounds):
        for suffix, env in (("", plain), ("_thp", thp)):
            run(TOUCH.format(n=1500))  # another process takes and frees 1.5 GB
            touch["after_free" + suffix].append(float(run(TOUCH.format(n=args.megabytes), env=env)))
            time.sleep(10)
            touch["after_idle" + suffix].append(float(run(TOUCH.format(n=args.megabytes), env=env)))
        print("  touch " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in touch.items()), flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    import swap_vs_registry  # noqa: F401 (registers the "swap" size)
    from opta_lmx.devmodel import make_model

    loads: dict[str, list[float]] = {"fresh_process": [], "second_in_process": []}
    with tempfile.TemporaryDirectory(prefix="fresh-memory-") as tmp:
        a = make_model(Path(tmp) / "a", size="swap", seed=0)
        b = make_model(Path(tmp) / "b", size="swap", seed=1)
        for _ in range(args.rounds):
            fresh, again = map(float, run(LOADS, str(a), str(b)).split())
            loads["fresh_process"].append(fresh)
            loads["second_in_process"].append(again)
            print(f"  load: fresh process {fresh:.3f}s, second in process {again:.3f}s", flush=True)
    result = {"megabytes": args.megabytes, "rounds": args.rounds,
              "touch_s": {k: [round(x, 3) for x in v] for k, v in touch.items()},
              "load_swap_model_s": {k: [round(x, 3) for x in v] for k, v in loads.items()},
              "medians": {**{f"touch_{k}": round(statistics.median(v), 3) for k, v in touch.items()},
                          **{f"load_{k}": round(statistics.median(v), 3) for k, v in loads.items()}}}
    print(result["medians"])
    save("fresh_memory", result)


if __name__ == "__main__":
    main()
