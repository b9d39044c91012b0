"""Time from saving models.yaml to the new model's first answer, beside a bare mlx_lm.load + answer.

Both are measured in one run on the same generated model, so the ratio is what to read:
the control plane's cost is watch latency + worker start (imports) + load + first request.

    .venv/bin/python bench/first_answer.py [--sizes tiny small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import REPO, lmx_env, model, save, start_lmx

BARE = """
import time, sys
t0 = time.perf_counter()
from mlx_lm import load, generate
model, tokenizer = load(sys.argv[1])
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
generate(model, tokenizer, prompt=prompt, max_tokens=4)
print(time.perf_counter() - t0)
"""


def bare_seconds(path: Path) -> float:
    """A fresh Python process: import mlx_lm, load, answer once (process start included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE, str(path)], check=True, env=lmx_env(), capture_output=True)
    return time.perf_counter() - start


def lmx_seconds(config: Path, base: str, name: str, path: Path) -> float:
    """Append the model to models.yaml, then ask for it until it answers."""
    text = config.read_text() + f"  - name: {name}\n    source: {path}\n"
    tmp = config.with_suffix(".tmp")
    tmp.write_text(text)
    start = time.perf_counter()
    tmp.replace(config)
    body = {"model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    while True:
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=600)
        if response.status_code == 200:
            return time.perf_counter() - start
        if response.status_code != 404:  # 404 until the watcher has read the edit
            raise RuntimeError(response.text)
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "models.yaml"
        config.write_text("models:\n")
        proc, base = start_lmx(config, root / "state")
        try:
            for size in args.sizes:
                path = model(size, root)
                bytes_on_disk = sum(p.stat().st_size for p in path.iterdir())
                bare, lmx = [], []
                for i in range(args.repeats):
                    bare.append(bare_seconds(path))
                    lmx.append(lmx_seconds(config, base, f"{size}-{i}", path))
                rows[size] = {
                    "model_bytes": bytes_on_disk,
                    "bare_load_and_answer_s": bare,
                    "edit_to_first_answer_s": lmx,
                    "median_bare_s": statistics.median(bare),
                    "median_edit_to_answer_s": statistics.median(lmx),
                    "ratio": statistics.median(lmx) / statistics.median(bare),
                }
                print(json.dumps({size: rows[size]}, indent=1), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\n{'size':<8}{'MB':>8}{'bare load+answer s':>20}{'edit->answer s':>16}{'ratio':>8}")
    for size, row in rows.items():
        print(f"{size:<8}{row['model_bytes'] / 1e6:>8.1f}{row['median_bare_s']:>20.2f}"
              f"{row['median_edit_to_answer_s']:>16.2f}{row['ratio']:>8.2f}")
    save("first_answer", {"sizes": rows, "repo": str(REPO)})


if __name__ == "__main__":
    main()
