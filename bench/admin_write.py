"""How long admin writes take: PATCH latency (sequential and 16 at once), with and without git.

Runs a real `lmx serve` on a models.yaml of 16 unloaded models (no workers: this measures the
write path alone: round-trip edit, validation, atomic write, the loop accepting the generation).
Prints and saves bench/results/admin_write.json.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import save  # noqa: E402
from tests.lmx_harness import start_server  # noqa: E402

N = 100


def _config() -> str:
    return "# bench\nmodels:\n" + "".join(
        f"  - name: m{i}\n    source: /nowhere/m{i}   # not loaded\n    state: unloaded\n" for i in range(16)
    )


def _pcts(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 2),
        "max_ms": round(1000 * ordered[-1], 2),
    }


def _run(git: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="lmx-bench-admin-"))
    config = root / "models.yaml"
    config.write_text(_config())
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "-c", "user.name=b", "-c", "user.email=b@b", "add", "models.yaml"],
                       check=True)
        subprocess.run(["git", "-C", str(root), "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"],
                       check=True)
    server = start_server(config, root / "state", *(["--git-commit"] if git else []))
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            client.get("/admin/models")
            reads = []
            for _ in range(N):
                start = time.perf_counter()
                client.get("/admin/models").raise_for_status()
                reads.append(time.perf_counter() - start)
            writes = []
            for i in range(N):
                start = time.perf_counter()
                response = client.patch(f"/admin/models/m{i % 16}", json={"priority": i})
                writes.append(time.perf_counter() - start)
                assert response.status_code == 202, response.text
        results: list[float] = []

        def one(i: int, barrier: threading.Barrier) -> None:
            barrier.wait()
            start = time.perf_counter()
            response = httpx.patch(f"{server.base_url}/admin/models/m{i}", json={"max_concurrency": 1000 + i}, timeout=60)
            results.append(time.perf_counter() - start)
            assert response.status_code == 202, response.text

        barrier = threading.Barrier(16)
        threads = [threading.Thread(target=one, args=(i, barrier)) for i in range(16)]
        wall = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
        return {"get_models": _pcts(reads), "patch_sequential": _pcts(writes),
                "patch_16_concurrent": {**_pcts(results), "wall_ms": round(1000 * wall, 1)}}
    finally:
        server.stop()


def main() -> None:
    figures = {"plain": _run(git=False), "git_commit": _run(git=True)}
    for mode, result in figures.items():
        for what, numbers in result.items():
            print(f"{mode:<11} {what:<20} {numbers}")
    save("admin_write", figures)


if __name__ == "__main__":
    main()
