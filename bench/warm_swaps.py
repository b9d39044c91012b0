"""Warm swaps (issue 23): time to first token of an agent's next turn after its model was swapped
out and back, against the same turn warm, with kept prefix caches off (what main did before) and
through vllm-mlx's own multi-model registry after a preemption. All in one run, same machine load.

Two generated `small` models (27M parameters, float32), an agent conversation: a long fixed system
prompt (about --prefix-words words, ~5 tokens each with this tokenizer) and short new turns, each
request carrying the conversation so far. Budget for one model, so every swap is drain-then-load.

- lmx (kept caches on, the default start mode): turn 1 (cold prefill), turn 2 (warm); swap to the
  other model and back (two edits of models.yaml), turn 3: time to first token after the swap-back;
  the save's cost (the CacheSaved event), each swap's time (edit to Ready) and the restored
  worker's load time.
- lmx with `prefix_caches: {enabled: false}`: the same steps.
- registry: `vllm-mlx serve --models-config` with both models (continuous batching, budget for
  one, wait_then_preempt): turn 1, turn 2, a request to the other model (preempts), turn 3.
- make-before-break with kept caches: a change of a non-KV engine option under a budget for two;
  the successor starts from a copy of the last saved cache while its predecessor serves.

    .venv/bin/python bench/warm_swaps.py [--quick] [--prefix-words N]
"""

from __future__ import annotations

import argparse
import statistics
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import model, save
from tests.lmx_harness import free_port, lmx_env, start_server, stop_and_check

CLIENT = httpx.Client(timeout=900)
REGISTRY = """manager:
  memory_budget_gb: {budget}
  contention_policy: {{strategy: wait_then_preempt, wait_timeout_s: 30, preempt_after_s: 0}}
defaults:
  continuous_batching: true
models:
  - {{name: a, path: {a}, estimated_memory_gb: {each}, preload: true}}
  - {{name: b, path: {b}, estimated_memory_gb: {each}}}
"""


class Conversation:
    """An agent's conversation: the system prompt, then (user, answer) turns."""

    def __init__(self, system: str):
        self.messages = [{"role": "system", "content": system}]

    def turn(self, base: str, name: str, text: str) -> float:
        """Send the next turn; the time to its first content token (streamed)."""
        self.messages.append({"role": "user", "content": text})
        started, first, answer = time.perf_counter(), None, []
        with CLIENT.stream("POST", f"{base}/v1/chat/completions", json={
                "model": name, "messages": self.messages, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                delta = httpx.Response(200, content=line[5:]).json()["choices"][0].get("delta") or {}
                if delta.get("content"):
                    first = first or time.perf_counter() - started
                    answer.append(delta["content"])
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        return first if first is not None else time.perf_counter() - started


REPEATS = 3


def config(a: Path, b: Path, loaded: str, kept: bool, budget: str, extra: str = "") -> str:
    head = f"memory:\n  budget: {budget}\n" + ("" if kept else "prefix_caches:\n  enabled: false\n")
    return head + "models:\n" + "".join(
        f"  - name: {name}\n    source: {path}\n    state: {'loaded' if name == loaded else 'unloaded'}\n"
        f"    memory: 700MiB\n    engine:\n      continuous_batching: true\n{extra}"
        for name, path in (("a", a), ("b", b)))


def models(server) -> dict:
    return {m["name"]: m for m in CLIENT.get(server.base_url + "/admin/models").json()["models"]}


def swap_to(server, text: str, name: str) -> float:
    """Write models.yaml; seconds until `name` is Ready and the loop converged."""
    started = time.perf_counter()
    server.write_config(text)
    server.wait_for(lambda s: CLIENT.get(s.base_url + "/admin/models").json()["converged"]
                    and (models(s)[name]["status"] or {}).get("phase") == "Ready", 600, f"{name} Ready")
    return time.perf_counter() - started


def event_seconds(server, reason: str) -> list[float]:
    events = CLIENT.get(server.base_url + "/admin/events", params={"limit": 1000}).json()["events"]
    return [float(m.group(1)) for e in events if e["reason"] == reason
            for m in [re.search(r"in ([\d.]+)s", e["message"])] if m]


def lmx_run(root: Path, a: Path, b: Path, words: int, kept: bool) -> dict:
    label = "kept" if kept else "off"
    (root / label).mkdir()
    cfg = root / label / "models.yaml"
    cfg.write_text(config(a, b, "a", kept, "1000MiB"))
    server = start_server(cfg, root / label / "state", env=lmx_env(LMX_ENGINE_START=""))
    try:
        server.wait_ready("a", timeout=600)
        talk = Conversation(system_prompt(words))
        cold = talk.turn(server.base_url, "a", "Read the rules. What is rule 7?")
        # Several samples of each (a new short turn each time), medians compared: one turn on a
        # shared 2-core machine varies by +-30%.
        warm = [talk.turn(server.base_url, "a", f"And rule {12 + i}?") for i in range(REPEATS)]
        aways, backs, loads, afters = [], [], [], []
        for i in range(REPEATS if kept else 1):  # off: every swap-back is a full prefill, once is enough
            aways.append(swap_to(server, config(a, b, "b", kept, "1000MiB"), "b"))
            backs.append(swap_to(server, config(a, b, "a", kept, "1000MiB"), "a"))
            loads.append(models(server)["a"]["status"]["load_seconds"])
            afters.append(talk.turn(server.base_url, "a", f"And rule {20 + i}?"))
        figures = {"first_turn_cold_s": cold, "warm_turn_s": statistics.median(warm), "warm_turns_s": warm,
                   "swap_away_s": statistics.median(aways), "swap_back_s": statistics.median(backs),
                   "restored_worker_load_s": statistics.median(loads), "after_swap_back_s": statistics.median(afters),
                   "after_swap_back_all_s": afters, "swaps_away_s": aways,
                   "save_seconds": event_seconds(server, "CacheSaved"),
                   "kept_cache": models(server)["a"]["status"].get("prefix_cache")}
        if kept:
            figures["make_before_break"] = make_before_break(server, a, b, talk)
        return figures
    finally:
        stop_and_check(server)


def make_before_break(server, a: Path, b: Path, talk: Conversation) -> dict:
    """A non-KV engine option changed under a budget for two: the successor starts beside its
    predecessor from a copy of the last saved cache (engine/prefix_cache.py)."""
    extra = "      default_temperature: 0.5\n"
    before = models(server)["a"]["status"]["pid"]
    started = time.perf_counter()
    server.write_config(config(a, b, "a", True, "3000MiB", extra))
    server.wait_for(lambda s: (models(s)["a"]["status"] or {}).get("pid") not in (None, before)
                    and models(s)["a"]["status"]["phase"] == "Ready", 600, "a's successor Ready")
    swap = time.perf_counter() - started
    ttft = talk.turn(server.base_url, "a", "And rule 30?")
    return {"swap_s": swap, "next_turn_s": ttft}


def system_prompt(words: int) -> str:
    return "You are a careful coding agent. Rules follow. " + " ".join(
        f"rule {i}: keep file {i % 17} tidy and test case {i % 5}." for i in range(words // 10))


def registry_run(root: Path, a: Path, b: Path, words: int) -> dict:
    (root / "registry-home").mkdir()
    each_gb = 0.7
    cfg = root / "registry.yaml"
    cfg.write_text(REGISTRY.format(budget=round(each_gb * 1.5, 3), a=a, b=b, each=each_gb))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = root / "registry.log"
    proc = subprocess.Popen([sys.executable, "-m", "vllm_mlx.cli", "serve", "--models-config", str(cfg),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=lmx_env(HOME=str(root / "registry-home"), VLLM_MLX_SIMPLE_ENGINE_LOCK_ADMISSION="wait"))
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if CLIENT.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        talk = Conversation(system_prompt(words))
        cold = talk.turn(base, "a", "Read the rules. What is rule 7?")
        warm = talk.turn(base, "a", "And rule 12?")
        started = time.perf_counter()
        Conversation("hello").turn(base, "b", "hi")  # preempts a
        away = time.perf_counter() - started
        after = talk.turn(base, "a", "And rule 20?")  # preempts b, reloads a
        text = log.read_text(errors="replace")
        return {"first_turn_cold_s": cold, "warm_turn_s": warm, "swap_away_s": away, "after_preemption_s": after,
                "saved_on_preemption": re.findall(r"SAVED (\d+)/\d+ entries", text),
                "restored_entries": [int(n) for n in re.findall(r"LOADED (\d+) entries", text)],
                "prefix_cache_loads_without_entries": text.count("No prefix cache entries found on disk"),
                "evictions_logged": len(re.findall(r"(?i)evict|preempt|unload", text))}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny models and a short prompt (a smoke run)")
    parser.add_argument("--prefix-words", type=int, default=1500)
    args = parser.parse_args()
    size, words = ("tiny", 300) if args.quick else ("small", args.prefix_words)
    with tempfile.TemporaryDirectory(prefix="lmx-warm-") as tmp:
        root = Path(tmp)
        a, b = model(size, root, 0), model(size, root, 1)
        kept = lmx_run(root, a, b, words, kept=True)
        print("kept caches:", kept, flush=True)
        off = lmx_run(root, a, b, words, kept=False)
        print("kept caches off:", off, flush=True)
        registry = registry_run(root, a, b, words)
        print("registry:", registry, flush=True)
    figures = {
        "size": size, "prefix_words": words, "kept": kept, "off": off, "registry": registry,
        "after_swap_back_over_warm": kept["after_swap_back_s"] / kept["warm_turn_s"],
        "registry_after_preemption_over_kept_after_swap_back": registry["after_preemption_s"] / kept["after_swap_back_s"],
        "off_after_swap_back_over_kept": off["after_swap_back_s"] / kept["after_swap_back_s"],
        "swap_away_kept_minus_off_s": kept["swap_away_s"] - off["swap_away_s"],
    }
    save("warm_swaps" + ("-quick" if args.quick else ""), figures)
    for key in ("after_swap_back_over_warm", "registry_after_preemption_over_kept_after_swap_back",
                "off_after_swap_back_over_kept", "swap_away_kept_minus_off_s"):
        print(f"{key}: {figures[key]:.3f}")


if __name__ == "__main__":
    main()
