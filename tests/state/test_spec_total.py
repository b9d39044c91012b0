"""Validation is total: every bad value is a ConfigError with a field path and a position.

Each case here once passed validation or raised something else (OverflowError, a 500, a
dead control loop): issues 12 and 15.
"""

from __future__ import annotations

import pytest

from opta_lmx.state.document import ConfigError, parse_document
from opta_lmx.state.quantities import MAX_BYTES, format_size, parse_duration, parse_size
from opta_lmx.state.serve_flags import check_extra_args, serve_parser

HUGE = "9" * 400


def model(**fields: str) -> str:
    lines = ["models:", "  - name: a", "    source: org/a"]
    lines += [f"    {key}: {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def problem_of(text: str):
    with pytest.raises(ConfigError) as caught:
        parse_document(text, "models.yaml")
    problem = caught.value.problems[0]
    assert problem.line is not None and problem.column is not None
    return problem


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (model(memory=HUGE), "models[0].memory"),
        (model(memory=f'"{HUGE}GiB"'), "models[0].memory"),
        (model(memory=".inf"), "models[0].memory"),
        (model(memory="1e400"), "models[0].memory"),
        (model(idle_ttl=HUGE), "models[0].idle_ttl"),
        (model(idle_ttl=f"{HUGE}s"), "models[0].idle_ttl"),
        (model(idle_ttl=".nan"), "models[0].idle_ttl"),
        (model(priority=HUGE), "models[0].priority"),
        (model(max_concurrency=HUGE), "models[0].max_concurrency"),
        (model(engine=f"{{max_kv_size: {HUGE}}}"), "models[0].engine.max_kv_size"),
        (model(engine=f"{{max_num_seqs: {HUGE}}}"), "models[0].engine.max_num_seqs"),
        (model(engine=f"{{timeout: {HUGE}}}"), "models[0].engine.timeout"),
        (model(engine="{timeout: .inf}"), "models[0].engine.timeout"),
        (model(engine="{default_temperature: .nan}"), "models[0].engine.default_temperature"),
        (f"memory: {{budget: {HUGE}}}\nmodels: []\n", "memory.budget"),
        (f"memory: {{budget: '{HUGE}%'}}\nmodels: []\n", "memory.budget"),
        ("memory: {budget: 'nan%'}\nmodels: []\n", "memory.budget"),
        (f"memory: {{reserve: '{HUGE}TiB'}}\nmodels: []\n", "memory.reserve"),
    ],
)
def test_numbers_are_bounded(text, path):
    assert problem_of(text).path == path


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (model(aliases='["ok\\n"]'), "models[0].aliases"),
        ('models:\n  - name: "ok\\n"\n    source: x\n', "models[0].name"),
        ('models:\n  - name: a\n    source: "org/x\\0y"\n', "models[0].source"),
        ('models:\n  - name: a\n    source: "org/x\\ny"\n', "models[0].source"),
        ('models:\n  - name: a\n    source: "   "\n', "models[0].source"),
        (model(engine='{reasoning_parser: "qwen3\\0"}'), "models[0].engine.reasoning_parser"),
        (model(engine='{tool_call_parser: "a\\x1bb"}'), "models[0].engine.tool_call_parser"),
        (model(engine='{extra_args: ["--timeout", "9\\0"]}'), "models[0].engine.extra_args"),
        ('defaults:\n  engine: {extra_args: ["--ssd-cache-dir", "/tmp/\\n"]}\nmodels: []\n', "defaults.engine.extra_args"),
    ],
)
def test_control_characters_and_trailing_newlines_are_refused(text, path):
    assert problem_of(text).path == path


@pytest.mark.parametrize(
    ("engine", "path", "message"),
    [
        ('{host: "0.0.0.0"}', "models[0].engine.host", "cannot be set"),
        ("{port: 9}", "models[0].engine.port", "cannot be set"),
        ("{api_key: x}", "models[0].engine.api_key", "cannot be set"),
        ("{served_model_name: other}", "models[0].engine.served_model_name", "cannot be set"),
        ('{extra_args: ["--host", "0.0.0.0"]}', "models[0].engine.extra_args", "--host"),
        ('{extra_args: ["--host=0.0.0.0"]}', "models[0].engine.extra_args", "--host"),
        ('{extra_args: ["--ho", "0.0.0.0"]}', "models[0].engine.extra_args", "--host"),
        ('{extra_args: ["--port", "80"]}', "models[0].engine.extra_args", "--port"),
        ('{extra_args: ["--api-key", "k"]}', "models[0].engine.extra_args", "--api-key"),
        ('{extra_args: ["--served-model-name", "gpt-4"]}', "models[0].engine.extra_args", "--served-model-name"),
        ('{extra_args: ["--models-config", "/tmp/x.yaml"]}', "models[0].engine.extra_args", "--models-config"),
        ('{extra_args: ["--max-num-seq", "4"]}', "models[0].engine.extra_args", "unrecognized"),
        ('{extra_args: ["--no-such-flag"]}', "models[0].engine.extra_args", "unrecognized"),
        ('{extra_args: ["-h"]}', "models[0].engine.extra_args", "unrecognized"),
        ('{extra_args: ["--timeout", "soon"]}', "models[0].engine.extra_args", "invalid float"),
        ('{extra_args: ["--kv-cache-quantization-bits", "5"]}', "models[0].engine.extra_args", "invalid choice"),
        ('{extra_args: ["another-model"]}', "models[0].engine.extra_args", "unrecognized"),
    ],
)
def test_worker_flags_the_control_plane_owns_and_unknown_flags_are_refused(engine, path, message):
    problem = problem_of(model(engine=engine))
    assert problem.path == path and message in problem.message


def test_known_flags_pass_through_and_are_read_without_importing_vllm_mlx():
    import sys

    check_extra_args(["--max-num-seqs", "4", "--continuous-batching", "--timeout=9", "--kv-cache-quantization-bits", "4"])
    parse_document(model(engine='{extra_args: ["--enable-metrics", "--rate-limit", "10"]}'))
    assert serve_parser() is not None
    assert "vllm_mlx.cli" not in sys.modules and "transformers" not in sys.modules


def test_the_largest_sizes_are_accepted_and_anything_larger_is_not():
    assert parse_size(MAX_BYTES) == MAX_BYTES
    assert parse_size("8EiB".replace("EiB", "TiB")) == 8 * 1024**4
    for value in (MAX_BYTES + 1, 10**400, float("inf"), float("nan"), -1, True, None, [1]):
        with pytest.raises(ValueError):
            parse_size(value)
    for value in (10**400, float("inf"), float("nan"), "1" * 100 + "s", True):
        with pytest.raises(ValueError):
            parse_duration(value)


def test_format_size_never_raises():
    assert format_size(10**400) == "huge"
    assert format_size(float("nan")) == "?"
    assert format_size(2**63).endswith("PiB")


def test_any_exception_inside_a_validator_is_a_field_error(monkeypatch):
    import opta_lmx.state.spec as spec

    def broken(_args):
        raise RuntimeError("the flag table is broken")

    monkeypatch.setattr(spec, "check_extra_args", broken)
    problem = problem_of(model(engine='{extra_args: ["--timeout", "9"]}'))
    assert problem.path == "models[0].engine.extra_args" and "RuntimeError" in problem.message


def test_an_exception_escaping_validation_is_still_a_config_error(monkeypatch):
    import opta_lmx.state.document as document

    def broken(_data):
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(document.DesiredState, "model_validate", broken)
    problem = problem_of(model())
    assert "OverflowError" in problem.message and (problem.line, problem.column) == (1, 1)
