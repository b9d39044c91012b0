"""The soak's invariants, computed from what its actors recorded (see bench/soak.py)."""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import psutil

MIB = 1024 * 1024
SLACK = 1.0  # seconds around a failure window: the client's and the poller's clocks see an event apart
# What a request sees when its model's worker dies: the gateway's 502 (connection refused or cut),
# its mid-stream error event, a truncated answer, or a 503 while the model restarts (crash backoff).
KILL_ERRORS = re.compile(r"did not answer|failed mid-stream|incomplete|not loaded|did not become ready|"
                         r"RemoteProtocolError|peer closed|Connection(Error| reset)")


def leftover_processes(state_dir: Path, wait: float) -> list[psutil.Process]:
    """Processes of this soak still alive: a cmdline naming the state dir, or HOME under it (workers)."""
    marker = str(state_dir)
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                home = proc.environ().get("HOME", "") if "python" in cmdline or "vllm" in cmdline else ""
                if proc.status() != psutil.STATUS_ZOMBIE and (marker in cmdline or home.startswith(marker)):
                    found.append(proc)
            except psutil.Error:
                continue
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def attribute_failures(outcomes, kills, restarts: list[dict], end: float) -> list[dict]:
    """Each failed request, with what explains it (or `None`).

    The gateway's errors name the model, not the worker pid, so a failure is put on a kill of
    its model when the request's [start, end] overlaps [kill, that model Ready on a new pid]
    (+-1 s), and its error is one a dead worker causes (KILL_ERRORS: a 404 or a client timeout
    is never credited to a kill). A pid in the error text, if some version names one, must
    match the kill exactly.
    """
    failures = []
    for outcome in outcomes:
        if outcome.error is None:
            continue
        cause = None
        for kill in kills if KILL_ERRORS.search(outcome.error) else []:
            if outcome.worker_pid is not None:
                if outcome.worker_pid == kill.pid:
                    cause = f"worker pid {kill.pid} of {kill.model} killed at {kill.at:.1f}s (pid named in the error)"
                continue
            window_end = (kill.recovered_at if kill.recovered_at is not None else end) + SLACK
            if kill.model == outcome.model and outcome.start <= window_end and outcome.end >= kill.at - SLACK:
                when = "in flight at the kill" if outcome.start < kill.at else "sent before the model was Ready again"
                cause = f"{kill.model} pid {kill.pid} killed at {kill.at:.1f}s ({when})"
                break
        for restart in restarts if cause is None else []:
            if outcome.start <= restart["back_at_s"] + SLACK and outcome.end >= restart["at_s"] - SLACK:
                cause = f"control plane restart at {restart['at_s']}s (traffic was drained: unexpected)"
        failures.append({"kind": outcome.kind, "model": outcome.model, "start_s": round(outcome.start, 2),
                         "end_s": round(outcome.end, 2), "error": outcome.error, "cause": cause})
    return failures


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0


def memory_segments(samples: list[tuple[float, int, int]], warmup: float) -> list[dict]:
    """RSS per control-plane process (a restart starts a new one), after its first `warmup` seconds."""
    segments = []
    for pid in dict.fromkeys(p for _t, p, _r in samples):
        mine = [(t, r / MIB) for t, p, r in samples if p == pid]
        settled = [(t, r) for t, r in mine if t >= mine[0][0] + warmup] or mine
        values = [r for _t, r in settled]
        head, tail = values[: max(1, len(values) // 4)], values[-max(1, len(values) // 4):]
        segments.append({
            "pid": pid, "samples": len(mine), "seconds": round(settled[-1][0] - settled[0][0], 1),
            "first_mib": round(mine[0][1], 1), "start_mib": round(values[0], 1), "max_mib": round(max(values), 1),
            "end_mib": round(values[-1], 1), "growth_mib": round(statistics.median(tail) - statistics.median(head), 1),
            "slope_mib_per_min": round(_slope_per_min(settled), 2),
        })
    return segments


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 3) if ordered else None


def _request_figures(outcomes, failures: list[dict]) -> dict:
    by_kind = {}
    for kind in ("stream", "plain"):
        mine = [o for o in outcomes if o.kind == kind]
        seconds = [o.end - o.start for o in mine if o.error is None]
        by_kind[kind] = {"total": len(mine), "failed": sum(o.error is not None for o in mine),
                         "p50_s": _percentile(seconds, 0.5), "p95_s": _percentile(seconds, 0.95)}
    return {"total": len(outcomes), "ok": sum(o.error is None for o in outcomes), "failed": len(failures),
            "failed_attributed": sum(f["cause"] is not None for f in failures),
            "failed_unattributed": sum(f["cause"] is None for f in failures), "by_kind": by_kind}


def _admin_figures(writers, final: dict, api_view: dict) -> dict:
    per_model = {}
    for name in sorted({w.model for w in writers}):
        mine = [w for w in writers if w.model == name]
        acked, unknown = sum(w.acked for w in mine), sum(w.unknown for w in mine)
        in_file = final.get(name, {}).get("priority", 0)
        per_model[name] = {"acked": acked, "conflicts_412": sum(w.conflicts_412 for w in mine), "unknown": unknown,
                           "reads_without_spec": sum(w.reads_without_spec for w in mine),
                           "final_priority_in_file": in_file,
                           "final_priority_via_api": (api_view.get(name) or {}).get("priority", 0),
                           "lost": max(0, acked - in_file), "unacked_applied": max(0, in_file - acked)}
    return {"per_model": per_model, "acked": sum(m["acked"] for m in per_model.values()),
            "conflicts_412": sum(m["conflicts_412"] for m in per_model.values()),
            "lost": sum(m["lost"] for m in per_model.values()),
            "reads_without_spec": sum(m["reads_without_spec"] for m in per_model.values()),
            "errors": [e for w in writers for e in w.errors]}


def _hand_edits_lost(edits, final: dict) -> list[str]:
    """The last edit of each kind must still be in the file (an admin write must not undo it)."""
    lost = []
    atomic = [e for e in edits if e.kind == "atomic" and e.value is not None]
    in_place = [e for e in edits if e.kind == "in-place" and e.value is not None]
    b_tokens = (final.get("b", {}).get("engine") or {}).get("max_tokens")
    if atomic and str(b_tokens) != atomic[-1].value:
        lost.append(f"b max_tokens is {b_tokens}, last edit set {atomic[-1].value}")
    a_aliases = final.get("a", {}).get("aliases")
    if in_place and list(a_aliases or []) != ([] if in_place[-1].value == "[]" else ["a-alias"]):
        lost.append(f"a aliases are {a_aliases}, last edit set {in_place[-1].value}")
    return lost


def _event_figures(events: list[dict]) -> dict:
    """How often each event reason came up; `Removed` is listed in full (the soak never removes a model)."""
    reasons: dict[str, int] = {}
    for event in events:
        reasons[event["reason"]] = reasons.get(event["reason"], 0) + 1
    removed = [{k: e.get(k) for k in ("reason", "object", "message", "server_pid")} for e in events
               if e["reason"] == "Removed"]
    return {"reasons": dict(sorted(reasons.items())), "removed": removed}


def _violations(figures: dict, opts, kills, failures: list[dict]) -> list[str]:
    found = []
    adm, mem = figures["admin_writes"], figures["memory"]
    if adm["lost"]:
        found.append(f"{adm['lost']} acknowledged admin writes lost: {adm['per_model']}")
    found += [f"admin write failed: {e}" for e in adm["errors"]]
    found += [f"{name}: {m['unacked_applied']} more increments in the file than acknowledged writes"
              for name, m in adm["per_model"].items() if m["unacked_applied"] > m["unknown"]]
    found += [f"hand edit lost: {what}" for what in figures["hand_edits_lost"]]
    found += [f"left running after the stop: {p}" for p in figures["leftovers"]]
    found += [f"failed, not explained by a kill: {f}" for f in failures if f["cause"] is None]
    found += [f"{k.model} pid {k.pid} killed at {k.at:.1f}s never came back Ready" for k in kills
              if k.recovered_at is None]
    found += [f"the control plane removed a model the file never dropped (pid {e['server_pid']}): {e['reason']} "
              f"{e['object']}: {e['message']}" for e in figures["events"]["removed"]]
    if figures["exit_code"] != 0:
        found.append(f"lmx serve exited with {figures['exit_code']} after SIGTERM")
    for restart in figures["restarts"]:
        expected = sorted(n for n, pid in restart["pids_before"].items() if pid)
        if restart["signal"] == "SIGKILL" and (restart["kept_pid"] != expected or restart["adopted_events"] != expected):
            found.append(f"restart did not adopt every worker: expected {expected}, kept pid {restart['kept_pid']}, "
                         f"Adopted events {restart['adopted_events']}")
    for seg in mem["segments"]:
        if seg["seconds"] >= 60 and seg["growth_mib"] > opts.rss_tolerance_mib:
            found.append(f"control plane pid {seg['pid']} RSS grew {seg['growth_mib']} MiB in {seg['seconds']} s "
                         f"(tolerance {opts.rss_tolerance_mib} MiB)")
    return found


def summary(soak, opts, restarts: list[dict], final: dict, api_view: dict, exit_code, leftovers: list[str],
            traffic_end: float) -> dict:
    """All figures of one run, `violations` included."""
    failures = attribute_failures(soak.outcomes, soak.kills, restarts, traffic_end)
    figures = {
        "minutes": opts.minutes, "seed": opts.seed, "traffic_seconds": round(traffic_end, 1),
        "clients": {"streaming": opts.streams, "plain": opts.plain, "admin_writers": opts.writers},
        "requests": _request_figures(soak.outcomes, failures),
        "failures": failures,
        "kills": [{"model": k.model, "pid": k.pid, "at_s": round(k.at, 1), "new_pid": k.new_pid,
                   "back_ready_after_s": round(k.recovered_at - k.at, 1) if k.recovered_at else None}
                  for k in soak.kills],
        "edits": [{"kind": e.kind, "at_s": round(e.at, 1), "what": e.what} for e in soak.edits],
        "restarts": restarts,
        "admin_writes": _admin_figures(soak.writers, final, api_view),
        "hand_edits_lost": _hand_edits_lost(soak.edits, final),
        "memory": {"interval_s": opts.rss_interval, "warmup_s": opts.rss_warmup,
                   "tolerance_mib": opts.rss_tolerance_mib,
                   "segments": memory_segments(soak.rss, opts.rss_warmup) if soak.rss else []},
        "events": _event_figures(soak.events),
        "exit_code": exit_code,
        "leftovers": leftovers,
    }
    figures["violations"] = _violations(figures, opts, soak.kills, failures)
    return figures
