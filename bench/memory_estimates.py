"""Estimated against measured memory for the tiny, small and medium generated models.

Starts one real vllm-mlx worker per model (one at a time), measures its process-tree RSS (plus
MLX Metal memory where reported) right after load and after a short chat request, and prints
and saves the figures beside the estimate the planner would have used.

    python bench/memory_estimates.py [--sizes tiny,small,medium] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

import httpx

from opta_lmx.devmodel import make_model
from opta_lmx.engine.memory import WORKER_OVERHEAD_BYTES, estimate, metal_backend, mlx_memory_bytes, tree_bytes
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import EngineOptions

MODELS_DIR = Path(tempfile.gettempdir()) / "opta-lmx-bench-models"


async def measure(worker) -> int:
    mlx = await mlx_memory_bytes(worker.address, key=worker.api_key()) if metal_backend() else 0
    return (tree_bytes(worker.pid) or 0) + mlx


async def one(size: str, pool: WorkerPool, engine: EngineOptions) -> dict:
    path = make_model(MODELS_DIR / size, size=size, progress=lambda m: None)
    est = estimate(str(path), engine)
    started = time.perf_counter()
    worker = await pool.start(WorkerSpec(name=size, source=str(path), engine=engine), 600)
    load_s = time.perf_counter() - started
    try:
        await asyncio.sleep(1.0)
        after_load = await measure(worker)
        async with httpx.AsyncClient(timeout=120) as client:
            await client.post(f"{worker.address}/v1/chat/completions", headers={
                "Authorization": f"Bearer {worker.api_key()}"} if worker.api_key() else None, json={
                "model": size, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16})
        after_request = await measure(worker)
    finally:
        await pool.stop(worker, 5)
    return {
        "size": size, "load_seconds": round(load_s, 2),
        "weights_bytes": est.weights_bytes, "kv_cache_bytes": est.kv_cache_bytes,
        "overhead_bytes": est.overhead_bytes, "estimated_bytes": est.total_bytes,
        "measured_after_load_bytes": after_load, "measured_after_request_bytes": after_request,
        "process_overhead_bytes": (after_load or 0) - est.weights_bytes,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,small,medium")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args()
    engine = EngineOptions(continuous_batching=True, max_tokens=64)
    with tempfile.TemporaryDirectory() as run_dir:
        pool = WorkerPool(Path(run_dir))
        rows = []
        for size in args.sizes.split(","):
            row = await one(size, pool, engine)
            rows.append(row)
            print(f"{size:7} est {format_size(row['estimated_bytes']):>10}  "
                  f"(weights {format_size(row['weights_bytes'])}, kv {format_size(row['kv_cache_bytes'])}, "
                  f"worker {format_size(row['overhead_bytes'])})  measured after load "
                  f"{format_size(row['measured_after_load_bytes']):>10}, after a request "
                  f"{format_size(row['measured_after_request_bytes']):>10}; process beyond weights "
                  f"{format_size(row['process_overhead_bytes'])}; load {row['load_seconds']} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "overhead_constant": WORKER_OVERHEAD_BYTES,
                               "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    asyncio.run(main())
