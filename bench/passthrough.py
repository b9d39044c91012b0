"""Gateway pass-through cost: the same vllm-mlx worker called directly and through Opta-LMX.

In one run, alternating direct and gateway rounds, at 1, 8 and 32 concurrent streams:
completion tokens per second (all streams together) and time to first token (client side,
request sent -> first content event). Goal: >= 0.97 of direct throughput, < 3 ms added median TTFT.

    .venv/bin/python bench/passthrough.py [--size tiny] [--concurrency 1 8 32] [--repeats 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from _common import model, save, start_lmx


async def one_stream(client: httpx.AsyncClient, url: str, name: str, max_tokens: int, index: int) -> tuple[float, int]:
    body = {
        "model": name, "stream": True, "max_tokens": max_tokens, "temperature": 0.0,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Tell me a long story about ships, number {index}."}],
    }
    sent = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - sent
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - sent), tokens


async def round_(client, url, name, concurrency, max_tokens) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, url, name, max_tokens, i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"tokens_per_s": tokens / wall, "ttft_ms": [r[0] * 1000 for r in results], "tokens": tokens}


async def measure(direct: str, gateway: str, name: str, levels: list[int], repeats: int, max_tokens: int,
                  gateway_pid: int) -> dict:
    out = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await round_(client, direct, name, 2, 8)  # warm both paths
        await round_(client, gateway, name, 2, 8)
        for level in levels:
            runs = {"direct": [], "gateway": []}
            gateway_cpu, gateway_tokens = 0.0, 0
            for _ in range(repeats):
                for target, url in (("direct", direct), ("gateway", gateway)):
                    cpu_before = sum(psutil.Process(gateway_pid).cpu_times()[:2])
                    runs[target].append(await round_(client, url, name, level, max_tokens))
                    if target == "gateway":
                        gateway_cpu += sum(psutil.Process(gateway_pid).cpu_times()[:2]) - cpu_before
                        gateway_tokens += runs[target][-1]["tokens"]
            row = {}
            for target, rs in runs.items():
                row[target] = {
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "median_ttft_ms": statistics.median(t for r in rs for t in r["ttft_ms"]),
                    "rounds": rs,
                }
            row["throughput_ratio"] = row["gateway"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
            row["added_median_ttft_ms"] = row["gateway"]["median_ttft_ms"] - row["direct"]["median_ttft_ms"]
            row["gateway_cpu_us_per_token"] = 1e6 * gateway_cpu / max(1, gateway_tokens)
            out[str(level)] = row
            print(f"c={level:>3}  direct {row['direct']['tokens_per_s']:8.1f} tok/s  gateway "
                  f"{row['gateway']['tokens_per_s']:8.1f} tok/s  ratio {row['throughput_ratio']:.3f}  "
                  f"ttft direct {row['direct']['median_ttft_ms']:.1f} ms gateway {row['gateway']['median_ttft_ms']:.1f} ms "
                  f"(+{row['added_median_ttft_ms']:.2f} ms)  gateway CPU {row['gateway_cpu_us_per_token']:.0f} us/token", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = model(args.size, root)
        config = root / "models.yaml"
        config.write_text(f"models:\n  - name: m\n    source: {path}\n"
                          "    engine: {continuous_batching: true, max_num_seqs: 64}\n")
        proc, base = start_lmx(config, root / "state")
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                models = httpx.get(base + "/admin/models").json()["models"]
                if models and models[0]["status"]["phase"] == "Ready":
                    break
                time.sleep(0.2)
            direct = models[0]["status"]["address"]
            figures = asyncio.run(measure(direct, base, "m", args.concurrency, args.repeats, args.max_tokens,
                                       proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    save(f"passthrough-{args.size}", {"size": args.size, "max_tokens": args.max_tokens, "repeats": args.repeats, "levels": figures})


if __name__ == "__main__":
    main()
