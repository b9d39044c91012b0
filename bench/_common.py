"""Helpers shared by the benchmarks: a real `lmx serve`, generated models, and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from tests.lmx_harness import free_port, lmx_env  # noqa: E402


def model(size: str, root: Path, seed: int = 0) -> Path:
    from opta_lmx.devmodel import make_model

    return make_model(root / f"{size}-{seed}", size=size, seed=seed, progress=lambda m: print(f"  [{size}] {m}", flush=True))


def start_lmx(config: Path, state_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(state_dir.parent / "lmx-serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "opta_lmx.cli", "serve", "--config", str(config), "--port", str(port),
         "--state-dir", str(state_dir)], stdout=log, stderr=subprocess.STDOUT, env=lmx_env(), cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("lmx serve did not start")


def save(name: str, figures: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        **figures,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {path}")
    return path
