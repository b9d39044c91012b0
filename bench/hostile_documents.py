"""How long reading a hostile or largest-accepted models.yaml takes, and what it costs in memory.

The limits of opta_lmx/state/document.py exist so that these stay well under a second. Each
case runs in a fresh process (peak memory is per process), best of 3. Prints and saves
bench/results/hostile_documents.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, save  # noqa: E402


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nmodels: *a{levels}\n"


CASES = {
    "alias bomb, 9 levels of 9": _bomb(9),
    "alias bomb, 12 levels of 9": _bomb(12),
    "unclosed [ x 4,000": "models: " + "[" * 4000,
    "nested {a: x 4,000": "models: " + "{a: " * 4000,
    "2,990 lines of keys (just under the line limit)": "".join(f"k{i}: 1\n" for i in range(2990)),
    "200 commented models (accepted)": "models:\n" + "".join(
        f"  # model {i}\n  - name: m{i}\n    source: org/model-{i}\n    aliases: [x{i}]\n"
        f"    engine: {{max_num_seqs: 4, extra_args: ['--max-num-seqs', '4']}}\n    memory: 1GiB\n" for i in range(200)),
    "10 MB file": "models: []\n" + "#" * 10_000_000,
}

_MEASURE = """
import json, resource, sys, time
from opta_lmx.state.document import ConfigError, read_document
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    read_document(sys.argv[1]); outcome = "accepted"
except ConfigError as error:
    outcome = str(error.problems[0])[:100]
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome,
                  "peak_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def measure(text: str, path: Path) -> dict:
    path.write_text(text)
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True,
                              cwd=REPO, env={"PYTHONPATH": str(REPO)}, timeout=600, check=True)
        runs.append(json.loads(done.stdout))
    best = min(runs, key=lambda r: r["seconds"])
    return {"bytes": len(text.encode()), **best}


def main() -> None:
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in CASES.items():
            results[name] = measure(text, Path(tmp) / "models.yaml")
            r = results[name]
            print(f"{name:50s} {r['bytes']:>10d} B {r['seconds'] * 1000:8.1f} ms "
                  f"{r['peak_growth_mib']:6.1f} MiB  {r['outcome'][:60]}", flush=True)
    save("hostile_documents", {"cases": results})


if __name__ == "__main__":
    main()
