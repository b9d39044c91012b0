"""Issue 15: nothing a model directory or a fault does stops the loop or touches other models.

Each bad model directory (a FIFO or a link to /dev/zero for config.json, a dangling weights
link, a non-numeric config value, `~nosuchuser/x`) becomes a Failed model with its reason while
the good one loads; and each class of exception raised while observing, planning (the
estimates the planner reads) and acting leaves the failing model Failed or backing off with a
reason and the others Ready.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from opta_lmx.engine import memory as engine_memory
from opta_lmx.reconciler.controller import Reconciler
from opta_lmx.state.status import Phase
from tests.reconciler.fakes import FakePool, MiB
from tests.reconciler.test_supervision import SETTINGS, ready, until


def _model_dir(path, config=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"num_hidden_layers": 2, "num_attention_heads": 2,
                                                            "hidden_size": 8}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def _fifo_config(path):
    _model_dir(path)
    (path / "config.json").unlink()
    os.mkfifo(path / "config.json")


def _zero_config(path):
    _model_dir(path)
    (path / "config.json").unlink()
    (path / "config.json").symlink_to("/dev/zero")


def _dangling_weights(path):
    _model_dir(path)
    (path / "model-00002.safetensors").symlink_to(path / "gone.safetensors")


def _non_numeric(path):
    _model_dir(path, {"num_hidden_layers": "many", "num_attention_heads": 2, "hidden_size": 8})


BAD_DIRECTORIES = {
    "fifo": (_fifo_config, "config.json is not a regular file"),
    "dev-zero": (_zero_config, "config.json is not a regular file"),
    "dangling": (_dangling_weights, "dangling link"),
    "non-numeric": (_non_numeric, "num_hidden_layers is not a count"),
}


def _phase(reconciler, name):
    status = reconciler.statuses.get(name)
    return status.phase if status else None


def _run(tmp_path, models_yaml, scenario, pool=None):
    (tmp_path / "models.yaml").write_text(models_yaml)
    pool = pool or FakePool()
    reconciler = Reconciler(tmp_path / "models.yaml", pool, settings=SETTINGS,
                            memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))

    async def main():
        task = asyncio.create_task(reconciler.run())
        try:
            await scenario(reconciler, pool)
        finally:
            await reconciler.shutdown()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)

    asyncio.run(main())
    return reconciler


@pytest.mark.parametrize("case", sorted(BAD_DIRECTORIES))
def test_a_bad_model_directory_fails_its_model_only(tmp_path, case):
    make_bad, reason = BAD_DIRECTORIES[case]
    good = _model_dir(tmp_path / "good")
    make_bad(tmp_path / "bad")
    yaml = f"models:\n  - {{name: good, source: {good}}}\n  - {{name: bad, source: {tmp_path / 'bad'}}}\n"

    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good") and _phase(reconciler, "bad") == Phase.FAILED)
        assert reason in reconciler.statuses["bad"].message
        passes = reconciler.passes
        reconciler.nudge()
        await until(lambda: reconciler.passes > passes)  # the loop keeps converging
        assert pool.started == ["good"] and reconciler.health().pass_failures == 0
        failures = [e for e in reconciler.events.since() if e.object == "bad" and e.reason == "LoadFailed"]
        assert len(failures) == 1  # read once, not on every pass

    _run(tmp_path, yaml, scenario)


def test_an_unknown_user_in_a_source_fails_that_model_only(tmp_path):
    good = _model_dir(tmp_path / "good")
    yaml = f"models:\n  - {{name: good, source: {good}}}\n  - {{name: bad, source: ~nosuchuser-lmx/x}}\n"

    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good") and _phase(reconciler, "bad") == Phase.FAILED)
        assert "nosuchuser-lmx" in reconciler.statuses["bad"].message
        assert reconciler.health().pass_failures == 0

    _run(tmp_path, yaml, scenario)


def test_an_unknown_user_with_a_memory_override_fails_at_load(tmp_path):
    """With `memory:` set the directory is never estimated; the load itself refuses the source."""
    yaml = ("models:\n  - {name: good, source: /tmp, memory: 10MiB}\n"
            "  - {name: bad, source: ~nosuchuser-lmx/x, memory: 10MiB}\n")

    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good") and _phase(reconciler, "bad") == Phase.FAILED)
        assert "nosuchuser-lmx" in reconciler.statuses["bad"].message and pool.started == ["good"]

    _run(tmp_path, yaml, scenario)


def test_a_fifo_config_is_refused_without_reading_it(tmp_path):
    """Opened with O_NONBLOCK and refused by its type: no writer ever appears, yet this returns."""
    _fifo_config(tmp_path / "m")
    with pytest.raises(engine_memory.ModelDirectoryError, match="not a regular file"):
        engine_memory.estimate(str(tmp_path / "m"), engine_memory.EngineOptions())


def test_an_oversized_config_is_refused(tmp_path, monkeypatch):
    _model_dir(tmp_path / "m")
    monkeypatch.setattr(engine_memory, "CONFIG_MAX_BYTES", 10)
    with pytest.raises(engine_memory.ModelDirectoryError, match="over"):
        engine_memory.estimate(str(tmp_path / "m"), engine_memory.EngineOptions())


# -- fault injection: each class of exception through observe, plan and act ---------------------

ERRORS = [OSError(28, "No space left on device"), ValueError("embedded null byte"),
          OverflowError("int too large to convert to float"), RuntimeError("injected")]


class MeasureFails(FakePool):
    """Workers of `bad` raise when measured (observe)."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    async def start(self, spec, timeout):
        worker = await super().start(spec, timeout)
        if spec.name == "bad":
            def broken():
                raise self.error
            worker.memory_bytes = broken
        return worker


class StartFails(FakePool):
    """Starting `bad` raises (act)."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    async def start(self, spec, timeout):
        if spec.name == "bad":
            self.attempts += 1
            raise self.error
        return await super().start(spec, timeout)


YAML = "models:\n  - {name: good, source: /tmp, memory: 10MiB}\n  - {name: bad, source: /tmp/bad-src}\n"


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_observe_fault_leaves_every_model_serving(tmp_path, error):
    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good", "bad"))
        passes = reconciler.passes
        reconciler.nudge()
        await until(lambda: reconciler.passes > passes + 2)
        assert ready(reconciler, "good", "bad") and reconciler.health().pass_failures == 0

    (tmp_path / "bad-src").mkdir()
    _run(tmp_path, YAML.replace("/tmp/bad-src", str(tmp_path / "bad-src")), scenario, MeasureFails(error))


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_plan_fault_in_an_estimate_backs_off_that_model_only(tmp_path, error, monkeypatch):
    real = engine_memory.estimate

    def estimator(source, engine, override=None):
        if source.endswith("bad-src"):
            raise error
        return real(source, engine, override)

    monkeypatch.setattr(engine_memory, "estimate", estimator)
    monkeypatch.setattr("opta_lmx.reconciler.accounting.engine_memory.estimate", estimator)

    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good") and "bad" in reconciler.ledger.failures)
        failure = reconciler.ledger.failures["bad"]
        assert not failure.permanent and type(error).__name__ in failure.message
        assert _phase(reconciler, "bad") in (Phase.PENDING, Phase.FAILED)
        assert pool.started == ["good"] and reconciler.health().pass_failures == 0

    (tmp_path / "bad-src").mkdir()
    from opta_lmx.reconciler import accounting
    monkeypatch.setattr(accounting.MemoryAccounts.__init__, "__defaults__", (estimator,))
    _run(tmp_path, YAML.replace("/tmp/bad-src", str(tmp_path / "bad-src")), scenario)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_act_fault_backs_off_that_model_only(tmp_path, error):
    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good") and "bad" in reconciler.ledger.failures)
        failure = reconciler.ledger.failures["bad"]
        assert not failure.permanent and type(error).__name__ in failure.message
        status = reconciler.statuses["bad"]
        assert status.phase == Phase.PENDING and type(error).__name__ in (status.message or "")
        attempts = pool.attempts
        await asyncio.sleep(0.3)  # not a measurement: a tight retry cycle would make hundreds of attempts
        assert pool.attempts <= attempts + 1 and ready(reconciler, "good")

    (tmp_path / "bad-src").mkdir()
    _run(tmp_path, YAML.replace("/tmp/bad-src", str(tmp_path / "bad-src")), scenario, StartFails(error))


def test_lmx_plan_previews_a_model_whose_directory_cannot_be_read(tmp_path):
    """`lmx plan` reads directories itself: a FIFO config gives an unknown estimate, not a traceback."""
    from opta_lmx.reconciler.preview import describe, preview
    from opta_lmx.state.spec import DesiredState

    _fifo_config(tmp_path / "bad")
    good = _model_dir(tmp_path / "good")
    desired = DesiredState.model_validate({"models": [{"name": "good", "source": str(good)},
                                                      {"name": "bad", "source": str(tmp_path / "bad")}]})
    result = preview(tmp_path / "models.yaml", desired)
    assert not result.estimates["bad"].known and result.estimates["good"].known
    assert "bad" in describe(result, "models.yaml")


def test_an_empty_file_is_being_written_not_no_models(tmp_path):
    """Issue 15 case 4: a zero-byte models.yaml (a `cat >` or a non-atomic editor mid-write) keeps
    every model; only an explicit `models: []` removes them."""
    good = _model_dir(tmp_path / "good")
    yaml = f"models:\n  - {{name: good, source: {good}}}\n"
    config = tmp_path / "models.yaml"

    async def scenario(reconciler, pool):
        await until(lambda: ready(reconciler, "good"))
        generation = reconciler.generation
        for blank in ("", "   \n\n", "# only a comment\n"):
            config.write_text(blank)
            passes = reconciler.passes
            reconciler.nudge()
            await until(lambda: reconciler.passes > passes + 1)
            assert ready(reconciler, "good") and pool.stopped == []
            assert reconciler.generation == generation and not reconciler.config_status.valid
        reasons = [e.reason for e in reconciler.events.since() if e.object == "config"]
        assert "ConfigIncomplete" in reasons and "InvalidConfig" not in reasons
        config.write_text("models: []\n")
        reconciler.nudge()
        await until(lambda: "good" not in reconciler.statuses)
        assert pool.stopped == ["good"]

    _run(tmp_path, yaml, scenario)
