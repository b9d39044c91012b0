"""A cancelled pass can never strand a worker outside the ledger (issue 20): adoption is cancelled
at each of its awaits in turn (as the watchdog or a shutdown would cancel it), and the next pass
finishes the job: every previous run's worker ends adopted (in the ledger, routed) or stopped."""

from __future__ import annotations

import asyncio
import types

import pytest

from opta_lmx.engine.pool import Recovered
from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from tests.reconciler.fakes import FakePool, FakeWorker, MiB

MODELS = "models:\n  - {name: a, source: /tmp, memory: 10MiB}\n  - {name: b, source: /tmp, memory: 10MiB}\n"


class CancelAt:
    """Cancels the pass (as the watchdog does) at the `n`-th await it is asked about (0: never)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0
        self.target: asyncio.Task | None = None

    async def point(self) -> None:
        self.seen += 1
        if self.seen == self.n and self.target is not None:
            self.target.cancel()
        await asyncio.sleep(0)


class RecoveringPool(FakePool):
    """A previous run left three workers: `a` (healthy, wanted), `b` (unhealthy), `c` (not wanted)."""

    def __init__(self, cancel: CancelAt, fingerprints: dict[str, str]):
        super().__init__()
        self.cancel = cancel
        self.fingerprints = fingerprints

    def recover(self):
        workers = []
        for name, healthy in (("a", True), ("b", False), ("c", True)):
            spec = types.SimpleNamespace(name=name, fingerprint=self.fingerprints.get(name, "gone"), source="/tmp")
            worker = FakeWorker(spec)

            async def check(healthy=healthy):
                await self.cancel.point()
                return healthy

            worker.healthy = check
            self._workers[worker.id] = worker
            workers.append(worker)
        return Recovered(workers)

    async def stop(self, worker, grace):
        await self.cancel.point()
        await super().stop(worker, grace)


def _scenario(tmp_path, n: int):
    (tmp_path / "models.yaml").write_text(MODELS)
    cancel = CancelAt(n)
    pool = RecoveringPool(cancel, {})
    reconciler = Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(),
                            memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))

    async def run():
        await reconciler.intake.read()
        pool.fingerprints.update(reconciler.fingerprints())
        cancel.target = asyncio.create_task(reconciler.reconcile_once())
        with pytest.raises(asyncio.CancelledError):
            await cancel.target
        cancel.n = 0  # the next passes are not cancelled
        for _ in range(3):
            await reconciler.reconcile_once()
        recovered = [w for w in pool.started_and_recovered]
        return recovered

    pool.started_and_recovered = []
    original = pool.recover

    def recover():
        found = original()
        pool.started_and_recovered.extend(found.workers)
        return found

    pool.recover = recover
    workers = asyncio.run(run())
    return reconciler, pool, workers, cancel.seen


@pytest.mark.parametrize("n", range(1, 6))  # three health checks, then two stops
def test_a_pass_cancelled_at_any_await_of_adoption_strands_no_worker(tmp_path, n):
    reconciler, pool, recovered, seen = _scenario(tmp_path, n)
    assert seen >= n  # the cancellation did happen, at the n-th await
    by_name = {w.spec.name: w for w in recovered}
    for name, worker in by_name.items():
        in_pool = pool.get(worker.id) is not None
        in_ledger = reconciler.ledger.get(worker.id) is not None
        assert in_pool == in_ledger, f"{name}: in the pool {in_pool}, in the ledger {in_ledger} (await {n})"
    assert reconciler.ledger.get(by_name["a"].id) is not None and reconciler.route("a").worker_id == by_name["a"].id
    assert "b" in pool.stopped and "c" in pool.stopped  # the unhealthy one and the unwanted one were stopped
    assert reconciler.adopter.pending == []
