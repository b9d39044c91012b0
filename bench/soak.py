"""Soak: minutes of mixed traffic against a real `lmx serve` while faults land, then check invariants.

Streaming and non-streaming OpenAI-SDK clients ask two generated tiny models; meanwhile workers
are SIGKILLed at random moments, models.yaml is edited by hand (by rename, and in place), admin
writers race PATCHes with If-Match, and the control plane is killed once and started again on
the same state directory (it must adopt the workers). Then it checks: no lost admin update or
hand edit, no process left behind, no failed request that no worker kill explains, and the
control plane's memory flat. Prints a summary, saves bench/results/soak.json and exits 1 if an
invariant is broken (so CI can run it):

    .venv/bin/python bench/soak.py [--minutes 3] [--port 0] [--seed 1]

Only 127.0.0.1 is ever contacted; the state directory is a fresh /tmp/soak-* (removed after,
unless --keep).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import save  # noqa: E402
from bench._soak_actors import Soak, WriterStats, config_text  # noqa: E402
from bench._soak_checks import leftover_processes, summary  # noqa: E402
from tests.lmx_harness import REPO, free_port, lmx_env  # noqa: E402

MODELS = ("a", "b")


@dataclasses.dataclass
class SoakOptions:
    minutes: float = 3.0
    max_requests: int = 20_000
    streams: int = 3
    plain: int = 2
    writers: int = 4  # two per model, so each pair races
    max_admin_writes: int = 500  # per writer
    kills: int | None = None  # default: one per 30 s
    edits: int | None = None  # default: one per 15 s, alternating by rename and in place
    edit_pause: float = 0.03  # an in-place edit leaves the file empty this long (issue 15, case 4)
    restart: bool = True
    restart_signal: str = "KILL"  # KILL: adoption expected; TERM: a clean stop stops the workers
    port: int = 0
    seed: int = 1
    rss_interval: float = 2.0
    rss_warmup: float = 20.0
    rss_tolerance_mib: float = 16.0
    keep: bool = False


class ServeProcess:
    """`lmx serve` on a fixed port and state dir, so it can be killed and started again in place."""

    def __init__(self, config: Path, state_dir: Path, port: int, log_path: Path):
        self.config, self.state_dir, self.port, self.log_path = config, state_dir, port, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opta_lmx.cli", "serve", "--config", str(self.config), "--port", str(self.port),
             "--state-dir", str(self.state_dir), "--grace", "5"],
            stdout=log, stderr=subprocess.STDOUT, env=lmx_env(), cwd=REPO,
        )
        log.close()
        self.wait_for(lambda: httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200, timeout, "/healthz")

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"lmx serve exited while waiting for {what}; log: {self.log_path}")
            try:
                if predicate():
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; log: {self.log_path}")

    def models(self) -> dict[str, dict]:
        response = httpx.get(self.base_url + "/admin/models", timeout=30)
        response.raise_for_status()
        return {m["name"]: m for m in response.json()["models"]}

    def converged(self) -> bool:
        response = httpx.get(self.base_url + "/admin/models", timeout=30).json()
        phases = [(m["status"] or {}).get("phase") for m in response["models"]]
        return response["converged"] and all(p == "Ready" for p in phases)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                return None  # did not stop in time
        return self.proc.returncode


def plan_faults(opts: SoakOptions, rng: random.Random) -> list[tuple[float, str]]:
    """When each fault lands: kills and edits spread over the run with jitter, the restart at a third."""
    length = opts.minutes * 60
    restart_at = length / 3 if opts.restart else None
    n_kills = opts.kills if opts.kills is not None else max(1, int(length // 30))
    n_edits = opts.edits if opts.edits is not None else max(1, int(length // 15))
    plan: list[tuple[float, str]] = [(restart_at, "restart")] if restart_at is not None else []
    usable = max(length - 20.0, 4.0)  # leave time at the end to recover from the last kill

    def spread(count: int, offset: float) -> list[float]:
        slot = usable / max(count, 1)
        times = [2.0 + slot * (i + offset) + rng.uniform(-0.3, 0.3) * slot for i in range(count)]
        if restart_at is not None:  # keep faults off the restart itself
            times = [t + 10.0 if abs(t - restart_at) < 8.0 else t for t in times]
        return [min(max(t, 1.0), usable + 2.0) for t in times]

    plan += [(t, "kill") for t in spread(n_kills, 0.5)]
    plan += [(t, "edit-in-place" if i % 2 == 0 else "edit-atomic") for i, t in enumerate(spread(n_edits, 0.25))]
    return sorted(plan)


def restart_control_plane(server: ServeProcess, soak: Soak, opts: SoakOptions) -> dict:
    """Drain clients, kill the control plane, start it again on the same state dir and port."""
    drained = soak.traffic.close_and_drain(60)
    try:
        server.wait_for(server.converged, 90, "convergence before the restart")
        settled = True
    except RuntimeError:
        settled = False
    before = {name: (m["status"] or {}).get("pid") for name, m in server.models().items()}
    at = soak.now()
    sig = signal.SIGKILL if opts.restart_signal == "KILL" else signal.SIGTERM
    exit_code = server.stop(sig, timeout=60)
    server.start()
    soak.server_pid = server.proc.pid
    server.wait_for(server.converged, 180, "convergence after the restart")
    back = soak.now()
    after = {name: (m["status"] or {}).get("pid") for name, m in server.models().items()}
    events = httpx.get(server.base_url + "/admin/events", params={"limit": 500}, timeout=30).json()["events"]
    adopted_events = sorted({e["object"] for e in events if e["reason"] == "Adopted"})
    soak.traffic.reopen()
    return {"at_s": round(at, 1), "signal": f"SIG{opts.restart_signal}", "exit_code": exit_code,
            "clients_drained": drained, "converged_before": settled, "down_s": round(back - at, 1),
            "pids_before": before, "pids_after": after,
            "kept_pid": sorted(n for n in before if before[n] and after.get(n) == before[n]),
            "adopted_events": adopted_events, "back_at_s": round(back, 1)}


def _apply(action: str, server: ServeProcess, soak: Soak, opts: SoakOptions, restarts: list[dict]) -> None:
    if action == "kill":
        kill = soak.kill_worker(MODELS)
        for _ in range(10):  # none Ready (both loading or swapping): try again shortly
            if kill is not None or soak.stop.wait(2.0):
                break
            kill = soak.kill_worker(MODELS)
        print(f"  {soak.now():6.1f}s kill: " + (f"{kill.model} pid {kill.pid}" if kill else "no Ready worker"), flush=True)
    elif action.startswith("edit"):
        edit = soak.hand_edit(atomic=action == "edit-atomic")
        print(f"  {soak.now():6.1f}s edit ({edit.kind}): {edit.what}", flush=True)
    elif action == "restart":
        print(f"  {soak.now():6.1f}s control plane restart (SIG{opts.restart_signal})", flush=True)
        restarts.append(restart_control_plane(server, soak, opts))
        print(f"  {soak.now():6.1f}s back: {restarts[-1]}", flush=True)


def drive(server: ServeProcess, soak: Soak, opts: SoakOptions) -> tuple[list[dict], list[str]]:
    """Run the clients and writers for the soak's length while the planned faults land."""
    problems: list[str] = []

    def guarded(target, *args) -> threading.Thread:
        def body() -> None:
            try:
                target(*args)
            except Exception as error:  # noqa: BLE001 - an actor that dies is itself a finding
                problems.append(f"{target.__name__}{args[:1]} died at {soak.now():.1f}s: {error!r}")
        return threading.Thread(target=body, daemon=True)

    threads = [guarded(soak.chat_client, i, i < opts.streams) for i in range(opts.streams + opts.plain)]
    for i in range(opts.writers):
        stats = WriterStats(MODELS[i % 2])
        soak.writers.append(stats)
        threads.append(guarded(soak.admin_writer, stats, random.Random(opts.seed * 100 + i)))
    for thread in threads:
        thread.start()
    restarts: list[dict] = []
    end = opts.minutes * 60
    for at, action in plan_faults(opts, random.Random(opts.seed)):
        if soak.stop.wait(max(0.0, at - soak.now())) or soak.now() > end:
            break
        try:
            _apply(action, server, soak, opts, restarts)
        except (RuntimeError, httpx.HTTPError, OSError) as error:
            problems.append(f"{action} at {soak.now():.1f}s failed: {error!r}")
            soak.traffic.reopen()
    soak.stop.wait(max(0.0, end - soak.now()))
    soak.stop.set()
    for thread in threads:
        thread.join(150)
    problems += [f"thread {t.name} did not end" for t in threads if t.is_alive()]
    return restarts, problems


def final_file(config: Path) -> dict[str, dict]:
    return {m["name"]: m for m in YAML(typ="safe").load(config.read_text())["models"]}


def run(opts: SoakOptions, model_a: Path | None = None, model_b: Path | None = None) -> dict:
    """One soak; the figures, with `violations` listing every broken invariant (empty: all held)."""
    root = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    try:
        if model_a is None or model_b is None:
            from opta_lmx.devmodel import make_model

            model_a, model_b = make_model(root / "model-a", size="tiny", seed=0), make_model(
                root / "model-b", size="tiny", seed=1)
        config = root / "models.yaml"
        config.write_text(config_text(model_a, model_b))
        server = ServeProcess(config, root / "state", opts.port or free_port(), root / "lmx-serve.log")
        server.start()
        try:
            server.wait_for(server.converged, 300, "a and b Ready")
            return _soak_and_check(server, opts)
        finally:
            server.stop(signal.SIGKILL)  # no-op after the checked stop; cleans up after an error
            for proc in leftover_processes(server.state_dir, wait=0):
                proc.kill()
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


def _soak_and_check(server: ServeProcess, opts: SoakOptions) -> dict:
    soak = Soak(server.base_url, server.config, server.state_dir, opts.seed, opts.max_requests, opts.max_admin_writes)
    soak.edit_pause = opts.edit_pause
    soak.server_pid = server.proc.pid
    sampler = threading.Thread(target=soak.sample_rss, args=(opts.rss_interval,), daemon=True)
    follower = threading.Thread(target=soak.follow_events, args=(1.0,), daemon=True)
    sampler.start()
    follower.start()
    restarts, problems = drive(server, soak, opts)
    traffic_end = soak.now()
    try:
        server.wait_for(server.converged, 180, "convergence at the end")
    except RuntimeError as error:
        problems.append(str(error))
    for watcher in soak.watchers:  # each kill's watcher notes when its model was Ready again
        watcher.join(30)
    time.sleep(1.5)  # the event follower's last poll
    api_view = {name: m["spec"] for name, m in server.models().items()}
    exit_code = server.stop(signal.SIGTERM, timeout=60)
    soak.finished.set()
    sampler.join(10)
    follower.join(10)
    leftovers = leftover_processes(server.state_dir, wait=15)
    figures = summary(soak, opts, restarts, final_file(server.config), api_view, exit_code,
                      [f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in leftovers], traffic_end)
    figures["violations"] = problems + figures["violations"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakOptions()
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests)
    parser.add_argument("--streams", type=int, default=defaults.streams, help="streaming chat clients")
    parser.add_argument("--plain", type=int, default=defaults.plain, help="non-streaming chat clients")
    parser.add_argument("--writers", type=int, default=defaults.writers, help="admin writers (two per model)")
    parser.add_argument("--max-admin-writes", type=int, default=defaults.max_admin_writes,
                        help="acknowledged writes per writer before it stops")
    parser.add_argument("--kills", type=int, help="worker SIGKILLs (default one per 30 s)")
    parser.add_argument("--edits", type=int, help="hand edits of models.yaml (default one per 15 s)")
    parser.add_argument("--edit-pause", type=float, default=defaults.edit_pause,
                        help="seconds an in-place edit leaves models.yaml empty (default 0.03)")
    parser.add_argument("--no-restart", dest="restart", action="store_false")
    parser.add_argument("--restart-signal", choices=["KILL", "TERM"], default=defaults.restart_signal)
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rss-tolerance-mib", type=float, default=defaults.rss_tolerance_mib)
    parser.add_argument("--keep", action="store_true", help="keep the /tmp/soak-* directory")
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = vars(parser.parse_args())
    do_save = args.pop("save")
    opts = SoakOptions(**args)
    os.environ["HF_HUB_OFFLINE"] = "1"
    figures = run(opts)
    print_summary(figures)
    if do_save:
        save("soak", figures)
    sys.exit(1 if figures["violations"] else 0)


def print_summary(figures: dict) -> None:
    req, adm, mem = figures["requests"], figures["admin_writes"], figures["memory"]
    print(f"\nsoak: {figures['minutes']} min, {req['total']} requests ({req['ok']} ok, {req['failed']} failed: "
          f"{req['failed_attributed']} during a worker kill, {req['failed_unattributed']} unexplained)")
    print(f"  kills {len(figures['kills'])}, hand edits {len(figures['edits'])}, restarts {len(figures['restarts'])}")
    print(f"  admin writes: {adm['acked']} acked, {adm['conflicts_412']} answered 412 and retried, "
          f"lost {adm['lost']}; hand edits lost {figures['hand_edits_lost']}")
    for seg in mem["segments"]:
        print(f"  control plane pid {seg['pid']}: RSS start {seg['start_mib']} MiB, max {seg['max_mib']}, "
              f"end {seg['end_mib']}, slope {seg['slope_mib_per_min']} MiB/min over {seg['seconds']} s")
    print(f"  leftover processes after the stop: {len(figures['leftovers'])}; exit code {figures['exit_code']}")
    print("  violations: " + ("none" if not figures["violations"] else ""))
    for violation in figures["violations"]:
        print(f"    - {violation}")


if __name__ == "__main__":
    main()
