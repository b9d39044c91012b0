"""Edit of models.yaml -> first answer through a real `lmx serve`, per start path, in one run.

For each `engine_start` mode (template on Linux, spare, cold) one `lmx serve` runs with one
entry `m` whose source flips between two generated models (issue 10's: hidden 1024, 8 layers,
float32; `--quick`: the `small` size). Timed, from saving the file (rename, as editors do):

- swap, budget for one (drain, unload, load) and for both (make-before-break): until status
  shows the new worker Ready, then its 1-token answer through the gateway;
- a new model: a fresh tiny model appended as a new entry, until its first answer (then it is
  removed again).

Baselines, interleaved with every repeat of every mode: vllm-mlx's registry (`--models-config`, budget for one) swapping the
same two files + 1-token answer; a bare fresh process that imports mlx-lm, loads the tiny model
and answers; and the same load + answer inside this (already-imported) process. Memory: USS
of each worker after its first answer (beyond its weights) and of the waiting template/spare.

    .venv/bin/python bench/serve_fast_start.py [--quick] [--repeats N] [--modes template spare cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil

import swap_vs_registry
from _common import REPO, lmx_env, save
from first_answer import bare_seconds
from swap_vs_registry import CLIENT, Registry

from opta_lmx.devmodel import make_model, model_files
from opta_lmx.engine.template import fork_supported
from tests.lmx_harness import Server, start_server, worker_processes

MiB = 2**20
swap_vs_registry.PORTS = iter(range(18240, 18250))


def config_text(mode: str, source: Path, budget: int, model_bytes: int, extra: str = "") -> str:
    return (f"engine_start: {{mode: {mode}}}\nmemory: {{budget: {budget}, reserve: 0}}\n"
            f"models:\n  - name: m\n    source: {source}\n    memory: {model_bytes}\n{extra}")


def status(server: Server, name: str) -> dict:
    for model in CLIENT.get(server.base_url + "/admin/models").json()["models"]:
        if model["name"] == name:
            return model["status"] or {}
    return {}


def answer(server: Server, name: str) -> None:
    response = CLIENT.post(server.base_url + "/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
    assert response.status_code == 200 and response.json()["model"] == name, response.text


def prepared_waiting(server: Server, mode: str) -> bool:
    root = server.state_dir / "workers"
    if mode == "cold":
        return True
    logs = [root / "template" / "template.log"] if mode == "template" else list(root.glob("spares/*/spare.log"))
    return any(p.exists() and f"{mode}: waiting" in p.read_text(errors="replace") for p in logs)


def settle(server: Server, mode: str) -> None:
    """Wait until the template or a spare waits, then until this server's processes are idle: a
    spare refills after each take (seconds of imports and a warm-up), and a refill still running
    would be timed as part of the next swap (the logs of spares already taken also say `waiting`)."""
    server.wait_for(lambda s: prepared_waiting(s, mode), 600, f"{mode} waiting")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = [server.proc.pid, *(p.pid for p in worker_processes(server.state_dir))]
        before = sum(cpu_seconds(pid, children=True) or 0.0 for pid in pids)
        time.sleep(1.0)
        if sum(cpu_seconds(pid, children=True) or 0.0 for pid in pids) - before < 0.05:  # < 5% of a core
            return
    raise RuntimeError("the server's processes did not go idle within 120 s")


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    """CPU time a process has used (with its reaped children's if asked); None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system + ((times.children_user + times.children_system) if children else 0.0)


def timed_edit(server: Server, text: str, done) -> float:
    started = time.perf_counter()
    server.write_config(text)
    while not done():
        time.sleep(0.02)
    return time.perf_counter() - started


def uss_beyond(pid: int, weights: int) -> int:
    return round((psutil.Process(pid).memory_full_info().uss - weights) / MiB)


def run_mode(root: Path, mode: str, models: dict, repeats: int, out: dict, baselines) -> None:
    a, b, weights, model_bytes = models["a"], models["b"], models["weights"], models["model_bytes"]
    budgets = {"one": 1200 * MiB + model_bytes * 3 // 2, "both": 1200 * MiB + model_bytes * 5 // 2}
    if mode == "cold":
        budgets = {k: v - 1200 * MiB for k, v in budgets.items()}
    config = root / f"models-{mode}.yaml"
    config.write_text(config_text(mode, a, budgets["one"], model_bytes))
    server = start_server(config, root / f"state-{mode}")
    try:
        server.wait_ready("m", timeout=600)
        settle(server, mode)
        prepared = [p.pid for p in worker_processes(server.state_dir, waiting=True)
                    if p.pid != status(server, "m").get("pid")]
        out["fixed_uss_mib"] = sum(round(psutil.Process(p).memory_full_info().uss / MiB) for p in prepared)
        current, times, memory = a, {"one": [], "both": [], "new_model": []}, []
        for repeat in range(repeats):
            for budget in ("one", "both"):
                server.write_config(config_text(mode, current, budgets[budget], model_bytes))
                settle(server, mode)
                old_pid, current = status(server, "m").get("pid"), b if current == a else a

                def swapped() -> bool:
                    now = status(server, "m")
                    if now.get("phase") == "Ready" and now.get("pid") not in (None, old_pid):
                        answer(server, "m")
                        return True
                    return False

                times[budget].append(timed_edit(server, config_text(mode, current, budgets[budget], model_bytes),
                                                swapped))
                memory.append(uss_beyond(status(server, "m")["pid"], weights))
            settle(server, mode)
            name, tiny = f"new{repeat}", models["tiny"][repeat]
            extra = f"  - name: {name}\n    source: {tiny}\n    memory: 1\n"
            big = config_text(mode, current, budgets["both"] + 2 * model_bytes, model_bytes)

            def answered() -> bool:
                try:
                    answer(server, name)
                    return True
                except AssertionError:
                    return False

            times["new_model"].append(timed_edit(server, big + extra, answered))
            extra_uss = uss_beyond(status(server, name)["pid"], sum(model_files(tiny).values()))
            out.setdefault("new_worker_uss_beyond_weights_mib", []).append(extra_uss)
            server.write_config(big)
            server.wait_for(lambda s: not status(s, name), 60, f"{name} removed")
            baselines()  # the registry and a bare process, between this mode's repeats (same machine load)
            print(f"  {mode} repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                  flush=True)
        out["times"] = {k: {"median_s": round(statistics.median(v), 3), "all_s": [round(x, 3) for x in v]}
                        for k, v in times.items()}
        out["swap_worker_uss_beyond_weights_mib"] = memory
    finally:
        assert server.stop() == 0
        assert worker_processes(server.state_dir) == [], "something outlived lmx serve"


IN_PROCESS = {}


def in_process_seconds(path: Path) -> float:
    """mlx_lm.load + answer in this process, mlx-lm already imported (what a registry does)."""
    from mlx_lm import generate, load

    started = time.perf_counter()
    model, tokenizer = load(str(path))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                           tokenize=False)
    generate(model, tokenizer, prompt=prompt, max_tokens=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the small models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["template", "spare", "cold"] if fork_supported()
                        else ["spare", "cold"])
    args = parser.parse_args()
    os.environ.update(lmx_env())
    size = "small" if args.quick else "swap"
    result: dict = {"size": size, "repeats": args.repeats, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="fast-wire-bench-") as tmp:
        root = Path(tmp)
        a = make_model(root / f"{size}-0", size=size, seed=0)
        b = make_model(root / f"{size}-1", size=size, seed=1)
        weights = sum(model_files(a).values())
        models = {"a": a, "b": b, "weights": weights, "model_bytes": weights + 900 * MiB,
                  "tiny": [make_model(root / f"tiny-{i}", size="tiny", seed=10 + i) for i in range(args.repeats)]}
        result["weights_mb"] = round(weights / 1e6)
        in_process_seconds(models["tiny"][0])  # import mlx-lm and its model code once
        registry = Registry(root, a, b, weights / 1024**3 * 1.3)
        samples = {"registry_swap_s": [], "bare_tiny_s": [], "in_process_tiny_s": []}

        def baselines() -> None:
            tiny = models["tiny"][len(samples["bare_tiny_s"]) % args.repeats]
            samples["registry_swap_s"].append(round(registry.swap(), 3))
            samples["bare_tiny_s"].append(round(bare_seconds(tiny), 3))
            samples["in_process_tiny_s"].append(round(in_process_seconds(tiny), 3))

        try:
            for mode in args.modes:
                result["modes"][mode] = {}
                run_mode(root, mode, models, args.repeats, result["modes"][mode], baselines)
        finally:
            registry.stop()
        result.update(samples)
    summarise(result)
    save("serve_fast_start-quick" if args.quick else "serve_fast_start", {**result, "repo": str(REPO)})


def summarise(result: dict) -> None:
    registry = statistics.median(result["registry_swap_s"])
    bare, in_process = statistics.median(result["bare_tiny_s"]), statistics.median(result["in_process_tiny_s"])
    result["medians"] = {"registry_swap_s": registry, "bare_tiny_s": bare, "in_process_tiny_s": in_process}
    print(f"registry swap + answer {registry:.2f} s; tiny: bare process {bare:.2f} s, in process {in_process:.2f} s")
    for mode, row in result["modes"].items():
        t = {k: v["median_s"] for k, v in row["times"].items()}
        row["ratio_to_registry"] = {k: round(t[k] / registry, 2) for k in ("one", "both")}
        row["new_model_minus_bare_s"] = round(t["new_model"] - bare, 2)
        row["new_model_minus_in_process_s"] = round(t["new_model"] - in_process, 2)
        print(f"{mode:9s} swap one {t['one']:.2f} s ({row['ratio_to_registry']['one']}x), both {t['both']:.2f} s "
              f"({row['ratio_to_registry']['both']}x); new model {t['new_model']:.2f} s "
              f"(bare {row['new_model_minus_bare_s']:+.2f} s, in-process {row['new_model_minus_in_process_s']:+.2f} s); "
              f"extra worker USS beyond weights {row['new_worker_uss_beyond_weights_mib']} MiB; "
              f"fixed {row['fixed_uss_mib']} MiB")


if __name__ == "__main__":
    main()
