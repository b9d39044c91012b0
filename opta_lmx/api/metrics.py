"""Prometheus metrics: the gateway's request figures plus the control loop's view of every model."""

from __future__ import annotations

import asyncio

from prometheus_client import Info, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from opta_lmx.reconciler.routes import RouteTable
from opta_lmx.reconciler.view import ControlLoopView
from opta_lmx.state.status import Phase

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self, reconciler: ControlLoopView, routes: RouteTable):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmx_requests", "Inference requests by model and HTTP status", ["model", "status"], registry=r)
        self.ttft = Histogram("lmx_time_to_first_token_seconds", "Arrival to first body byte from the worker",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("lmx_request_duration_seconds", "Arrival to last byte", ["model"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmx_prompt_tokens", "Prompt tokens reported by workers", ["model"], registry=r)
        self.completion_tokens = Counter("lmx_completion_tokens", "Completion tokens reported by workers", ["model"], registry=r)
        self.load_wait = Histogram("lmx_load_wait_seconds", "How long requests waited for their model to load",
                                   ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.reconcile_duration = Histogram("lmx_reconcile_duration_seconds", "Duration of reconcile passes",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.loop_lag = Histogram("lmx_event_loop_lag_seconds", "How late the event loop ran a timer (what "
                                  "every relayed token waits when something blocks the loop)",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.forwarded = Counter("lmx_requests_forwarded", "Requests forwarded to the fleet host that runs their model",
                                 ["model", "peer"], registry=r)
        fleet = getattr(reconciler, "fleet", None)
        if fleet is not None:  # every series of this endpoint is this host's: say which (docs/fleet.md)
            Info("lmx_fleet_host", "The fleet host this server is", registry=r).info({"host": fleet.me})
        r.register(_ModelCollector(reconciler))
        r.register(_TrafficCollector(routes))


class _TrafficCollector:
    """Requests in flight and waiting, read at scrape time from their one owner, the route table."""

    def __init__(self, routes: RouteTable):
        self.routes = routes

    def describe(self):
        return []

    def collect(self):
        in_flight = GaugeMetricFamily("lmx_requests_in_flight", "Requests being answered now", labels=["model"])
        for name, count in sorted(self.routes.in_flight_by_model().items()):
            in_flight.add_metric([name], count)
        queued = GaugeMetricFamily("lmx_queue_depth", "Requests waiting for their model or a concurrency slot",
                                   labels=["model"])
        for name, count in sorted(self.routes.waiters_by_model().items()):
            queued.add_metric([name], count)
        yield from (in_flight, queued)


class _DownloadGauges:
    """Per model while it downloads from the hub: bytes done, bytes in the repo, rate."""

    def __init__(self):
        self.done = GaugeMetricFamily("lmx_model_download_done_bytes", "Bytes of the model's repo in the local "
                                      "cache (while it downloads)", labels=["model"])
        self.total = GaugeMetricFamily("lmx_model_download_total_bytes", "Bytes of the model's repo on the hub "
                                       "(while it downloads)", labels=["model"])
        self.rate = GaugeMetricFamily("lmx_model_download_rate_bytes_per_second", "Download rate over the last "
                                      "few seconds", labels=["model"])

    def add(self, name: str, download) -> None:
        if download is None:
            return
        self.done.add_metric([name], download.done_bytes)
        if download.total_bytes is not None:
            self.total.add_metric([name], download.total_bytes)
        self.rate.add_metric([name], download.rate_bytes_per_s)

    def families(self):
        return self.done, self.total, self.rate


class _ModelCollector:
    """Read at scrape time from the reconciler's status, so it never goes stale."""

    def __init__(self, reconciler: ControlLoopView):
        self.reconciler = reconciler

    def describe(self):
        return []

    def collect(self):
        rec = self.reconciler
        phase = GaugeMetricFamily("lmx_model_phase", "1 for the phase each model is in", labels=["model", "phase"])
        load = GaugeMetricFamily("lmx_model_load_seconds", "Seconds the current worker took to load", labels=["model"])
        restarts = CounterMetricFamily("lmx_model_restarts", "Unexpected worker exits", labels=["model"])
        estimated = GaugeMetricFamily("lmx_model_estimated_bytes", "Memory estimated before loading", labels=["model"])
        measured = GaugeMetricFamily("lmx_model_measured_bytes", "Memory measured once loaded", labels=["model"])
        downloads = _DownloadGauges()
        for name, status in list(rec.statuses.items()):
            for candidate in Phase:
                phase.add_metric([name, candidate.value], 1.0 if status.phase == candidate else 0.0)
            if status.load_seconds is not None:
                load.add_metric([name], status.load_seconds)
            restarts.add_metric([name], status.restarts)
            if status.estimated_bytes is not None:
                estimated.add_metric([name], status.estimated_bytes)
            if status.measured_bytes is not None:
                measured.add_metric([name], status.measured_bytes)
            downloads.add(name, status.download)
        yield from (phase, load, restarts, estimated, measured, *downloads.families())
        yield GaugeMetricFamily("lmx_generation", "Generation of the accepted models.yaml", value=rec.generation)
        yield GaugeMetricFamily("lmx_observed_generation", "Generation the loop has acted on", value=rec.observed_generation)
        yield GaugeMetricFamily("lmx_converged", "1 when every model is in its desired phase", value=1.0 if rec.converged() else 0.0)
        unloads = CounterMetricFamily("lmx_worker_unloads", "Workers unloaded (swapped away), by reason",
                                      labels=["reason"])
        for reason, count in sorted(rec.unloads_by_reason.items()):
            unloads.add_metric([reason], count)
        evictions = CounterMetricFamily("lmx_demand_evictions", "Resident models evicted by demand for another",
                                        labels=["model", "for_model"])
        for (evicted, wanted), count in sorted(rec.demand_evictions.items()):
            evictions.add_metric([evicted, wanted], count)
        yield from (unloads, evictions)
        yield CounterMetricFamily("lmx_reconcile_passes", "Reconcile passes run", value=rec.passes)
        health = rec.health()
        yield CounterMetricFamily("lmx_reconcile_errors", "Reconcile passes that raised (each logged, retried after "
                                  "a backoff)", value=health.pass_failures)
        yield GaugeMetricFamily("lmx_loop_running", "1 while the control loop task runs", value=1.0 if health.running else 0.0)


async def watch_loop_lag(histogram: Histogram, interval: float = 0.05) -> None:
    """Observe how late the event loop runs a timer, every `interval` seconds, until cancelled:
    anything that blocks the loop (a read, a wait) delays every relayed token by as much."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - asked - interval))


class HostLabelled:
    """A fleet host's registry as scraped: every series with a `host` label (docs/fleet.md), so
    the fleet's hosts can be scraped into one Prometheus and told apart."""

    def __init__(self, registry: CollectorRegistry, host: str):
        self.registry, self.host = registry, host

    def collect(self):
        for family in self.registry.collect():
            family.samples = [sample._replace(labels={**sample.labels, "host": self.host})
                              for sample in family.samples]
            yield family
