"""Swap time against vllm-mlx's own multi-model registry, on the same files, in one run.

Two generated llama models (full mode: hidden 1024, 8 layers, float32, as in issue 10; quick
mode: the `small` size). Each repeat does, one after the other so all see the same machine load:

- registry: `vllm-mlx serve --models-config` (budget for one model, `wait_then_preempt`),
  a 1-token request for the model that is not loaded (evict, load, answer);
- Opta-LMX engine, budget for one: stop the old worker, start the new one, first answer;
- Opta-LMX engine, budget for both: start the new worker while the old serves, first answer
  (the old one is stopped after the clock stops: make-before-break);
each of the two Opta-LMX swaps three ways: forked from the worker template (engine/template.py,
Linux), through a waiting spare worker (engine/spare.py), and cold (a fresh `vllm-mlx serve`).

The Opta-LMX figures are the engine's: from the decision to start to the first answer. The
control loop's own reaction time (file watch debounce, planning) is not in them. Before each
spare swap the bench waits until a spare is waiting again (the refill takes ~5 s of CPU).
Also recorded: a bare `mlx_lm.load` + answer in a fresh process, and per-worker unique memory
(USS) of cold and spare-made workers and of a waiting spare.

    .venv/bin/python bench/swap_vs_registry.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from _common import lmx_env, save
from first_answer import bare_seconds

from opta_lmx.devmodel import SIZES, make_model, model_files
from opta_lmx.engine.spare import SpareWorkers, worker_environment
from opta_lmx.engine.template import WorkerTemplate
from opta_lmx.engine.worker import Worker, WorkerSpec

# Issue 10's models: the `medium` shape with 8 layers (about 430 MB in float32).
SIZES.setdefault("swap", {**SIZES["medium"], "num_hidden_layers": 8})
PORTS = iter(range(18230, 18240))
REGISTRY = """manager:
  memory_budget_gb: {budget}
  contention_policy: {{strategy: wait_then_preempt, wait_timeout_s: 30, preempt_after_s: 0}}
models:
  - {{name: a, path: {a}, estimated_memory_gb: {each}, preload: true}}
  - {{name: b, path: {b}, estimated_memory_gb: {each}}}
"""


# One kept-alive client for every timed call, ours and the registry's alike: a new httpx client
# per call costs about 20 ms here (its TLS context), which would be timed as part of either side.
CLIENT = httpx.Client(timeout=600)


def answer(address: str, name: str) -> None:
    response = CLIENT.post(f"{address}/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
    response.raise_for_status()
    assert response.json()["model"] == name, response.text


def uss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


class Registry:
    """vllm-mlx's registry server with both models, budget for one."""

    def __init__(self, root: Path, a: Path, b: Path, each_gb: float):
        config = root / "registry.yaml"
        config.write_text(REGISTRY.format(budget=round(each_gb * 1.5, 3), a=a, b=b, each=round(each_gb, 3)))
        self.address = f"http://127.0.0.1:{next(PORTS)}"
        (root / "registry-home").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_mlx.cli", "serve", "--models-config", str(config),
             "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1]],
            stdout=open(root / "registry.log", "wb"), stderr=subprocess.STDOUT,
            env=lmx_env(HOME=str(root / "registry-home"), VLLM_MLX_SIMPLE_ENGINE_LOCK_ADMISSION="wait"),
            start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                answer(self.address, "a")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("registry did not start; see registry.log")
        self.current = "a"

    def swap(self) -> float:
        other = "b" if self.current == "a" else "a"
        started = time.perf_counter()
        answer(self.address, other)
        self.current = other
        return time.perf_counter() - started

    def warm(self) -> float:
        started = time.perf_counter()
        answer(self.address, self.current)
        return time.perf_counter() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Engine:
    """Opta-LMX's engine: one worker process per model, from a spare or cold."""

    def __init__(self, root: Path, models: dict[str, Path], spares: SpareWorkers | None = None,
                 template: WorkerTemplate | None = None):
        self.root, self.models, self.spares, self.template = root, models, spares, template
        self.path = "fork" if template else "spare" if spares else "cold"
        self.ports = [next(PORTS), next(PORTS)]  # make-before-break needs two
        self.worker: Worker | None = None
        self.memory: list[dict] = []
        self.split: list[dict] = []
        self.stops: list[float] = []

    async def start(self, name: str) -> Worker:
        worker = Worker(WorkerSpec(name, str(self.models[name])), run_dir=self.root / "run", port=self.ports[0])
        prepared = self.template
        if self.spares is not None:
            prepared = self.spares.take(worker.environment())
            assert prepared is not None, "no spare waiting"
        worker.spawn(prepared)
        started = time.perf_counter()
        await worker.wait_ready(600)
        ready = time.perf_counter()
        await asyncio.to_thread(answer, worker.address, name)
        self.split.append({"start_to_ready_s": round(ready - started, 3),
                           "first_answer_s": round(time.perf_counter() - ready, 3)})
        return worker

    async def swap(self, budget: str) -> float:
        old = self.worker
        name = "b" if old is None or old.spec.name == "a" else "a"
        if self.spares is not None:
            await asyncio.to_thread(wait_for_spare, self.spares)
        started = time.perf_counter()
        if old is not None and budget == "one":
            await old.stop(grace=10)
            self.stops.append(round(time.perf_counter() - started, 3))
        self.ports.reverse()
        self.worker = await self.start(name)
        seconds = time.perf_counter() - started
        self.memory.append({"uss": uss(self.worker.pid), "path": self.path})
        if old is not None and budget == "both":
            await old.stop(grace=10)
        return seconds

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop(grace=10)
        if self.spares is not None:
            self.spares.close()
        if self.template is not None:
            self.template.close()


def wait_for_spare(spares: SpareWorkers, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    spares.fill()
    while not any(s.waiting and s.alive() for s in spares.spares()):
        if time.monotonic() > deadline:
            raise TimeoutError("no spare became ready")
        time.sleep(0.05)
    time.sleep(1.0)  # let the machine settle after the spare's imports


def summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 3), "all_s": [round(v, 3) for v in values]}


async def run(root: Path, size: str, repeats: int) -> dict:
    a = make_model(root / f"{size}-0", size=size, seed=0)
    b = make_model(root / f"{size}-1", size=size, seed=1)
    weight_bytes = sum(model_files(a).values())
    each_gb = weight_bytes / 1024**3 * 1.3
    registry = Registry(root, a, b, each_gb)
    warm_up = make_model(root / "warm-up-model", size="tiny")  # what `lmx serve` gives them
    spare_pool = SpareWorkers(root / "spares", worker_environment(), count=1, refill_delay=3.0, warm_up_model=warm_up)
    template = WorkerTemplate(root / "template", worker_environment(), warm_up_model=warm_up)
    template.ensure()
    models = {"a": a, "b": b}
    chains = [Engine(root, models, template=template), Engine(root, models, spares=spare_pool), Engine(root, models)]
    times: dict[str, list[float]] = {"registry": [], "registry_warm_answer": [], "bare": []}
    try:
        await asyncio.to_thread(wait_for_spare, spare_pool)
        while not template.waiting.is_set():
            await asyncio.sleep(0.1)
        spare_uss, template_uss = uss(spare_pool.spares()[0].pid), uss(template.pid)
        for chain in chains:
            await chain.swap("one")  # the first worker of each chain (not timed)
        for repeat in range(repeats):
            times["registry"].append(registry.swap())
            times["registry_warm_answer"].append(registry.warm())
            for chain in chains:
                for budget in ("one", "both"):
                    times.setdefault(f"opta_{chain.path}_budget_{budget}", []).append(await chain.swap(budget))
            times["bare"].append(bare_seconds(a))
            print(f"  repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    finally:
        registry.stop()
        for chain in chains:
            await chain.close()
    rows = {key: summary(values) for key, values in times.items()}
    reference = rows["registry"]["median_s"]
    ratios = {key: round(row["median_s"] / reference, 2) for key, row in rows.items() if key.startswith("opta_")}
    memory = {"waiting_spare_uss_mib": round(spare_uss / 2**20), "template_uss_mib": round(template_uss / 2**20)}
    for chain in chains:
        median = statistics.median(m["uss"] for m in chain.memory[1:] or chain.memory)
        memory[f"worker_{chain.path}_uss_mib"] = round(median / 2**20)
        memory[f"worker_{chain.path}_uss_beyond_weights_mib"] = round((median - weight_bytes) / 2**20)
    parts = {chain.path: {
        "stop_old_s": statistics.median(chain.stops) if chain.stops else None,
        "start_to_ready_s": statistics.median(x["start_to_ready_s"] for x in chain.split[1:]),
        "first_answer_s": statistics.median(x["first_answer_s"] for x in chain.split[1:])} for chain in chains}
    return {"size": size, "parts_median": parts, "weights_mb": round(weight_bytes / 1e6), "repeats": repeats,
            "times": rows, "ratio_to_registry": ratios, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the small models, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    size = "small" if args.quick else "swap"
    repeats = args.repeats or (2 if args.quick else 6)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="fast-swap-bench-") as tmp:
        result = asyncio.run(run(Path(tmp), size, repeats))
    for key, row in result["times"].items():
        print(f"{key:32s} {row['median_s']:7.3f} s  {result['ratio_to_registry'].get(key, '')}")
    print(result["memory"])
    print(result["parts_median"])
    save("swap_vs_registry-quick" if args.quick else "swap_vs_registry", result)


if __name__ == "__main__":
    main()
