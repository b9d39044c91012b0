"""Fuzzed models.yaml: whatever the bytes, reading them is a Document or a positioned ConfigError.

Mutations of a good file (truncation, inserted bytes, wrong types, duplicate keys, unicode
names, deep nesting, alias bombs, binary, huge values) and documents generated from JSON-like
values. The budget is small enough for CI (a few hundred examples, no deadline per example:
the machine is shared); pytest-timeout bounds each test.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opta_lmx.state.document import ConfigError, Document, parse_document, read_document

GOOD = """\
# comment kept
memory:
  budget: 50%
  reserve: 2GiB
defaults:
  engine: {continuous_batching: true, max_num_seqs: 8}
models:
  - name: coder
    source: mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit
    aliases: [default]
    engine: {tool_call_parser: qwen3_coder, max_num_seqs: 32, extra_args: ["--timeout", "30"]}
    memory: 18GiB
    idle_ttl: 30m
  - name: chat
    source: ./models/chat
    state: unloaded
    priority: 5
"""

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["memory", "budget", "reserve", "defaults", "engine", "models", "name", "source", "aliases", "state",
          "priority", "pinned", "idle_ttl", "max_num_seqs", "max_kv_size", "timeout", "extra_args", "tool_call_parser"]
WEIRD_VALUES = ["9" * 400, "-1", ".inf", ".nan", "null", "[]", "{}", "''", "'\\0'", '"a\\nb"', "1e400", "true",
                "&a x", "*nope", "!!binary aGk=", "!!python/object:os.system x", "'" + "x" * 5000 + "'",
                "\"\\u202e\\u0000\"", "[" * 50, "{a: " * 40, "0x10", "0o17", "1_000", "~", "ńåmé", "🦙"]


def check(text: str) -> Document | None:
    """The property: a Document, or a ConfigError whose every problem has a position."""
    try:
        return parse_document(text, "models.yaml")
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.line is not None and problem.line >= 1, problem
            assert problem.column is not None and problem.column >= 1, problem
        assert error.describe() and json.dumps(error.to_dict())
        return None


@FUZZ
@given(st.integers(min_value=0, max_value=len(GOOD)))
def test_truncated_files(cut):
    check(GOOD[:cut])


@FUZZ
@given(st.integers(min_value=0, max_value=len(GOOD)), st.text(max_size=40))
def test_inserted_text(at, inserted):
    check(GOOD[:at] + inserted + GOOD[at:])


@FUZZ
@given(st.sampled_from(FIELDS), st.sampled_from(WEIRD_VALUES) | st.text(max_size=30))
def test_wrong_types_and_odd_values(field, value):
    lines = GOOD.splitlines(keepends=True)
    for index, line in enumerate(lines):
        stripped = line.lstrip(" -")
        if stripped.startswith(field + ":"):
            indent = line[: len(line) - len(stripped)]
            lines[index] = f"{indent}{field}: {value}\n"
    check("".join(lines))


@FUZZ
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4), st.booleans())
def test_unicode_names_aliases_and_duplicate_keys(names, duplicate):
    entries = "".join(f"  - name: {json.dumps(n)}\n    source: {json.dumps(n)}\n    aliases: [{json.dumps(n[::-1])}]\n"
                      for n in names)
    extra = "models: []\n" if duplicate else ""
    check("models:\n" + entries + extra)


@FUZZ
@given(st.binary(max_size=400))
def test_binary_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "models.yaml"
    path.write_bytes(data)
    try:
        read_document(path)
    except ConfigError as error:
        assert error.problems


@FUZZ
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=2, max_value=12),
       st.sampled_from(["models", "defaults", "bomb"]))
def test_alias_bombs(levels, width, where):
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    check("\n".join(lines) + f"\n{where}: *a{levels}\nmodels: []\n")


@FUZZ
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", "{a: ", "- ", "a:\n  "]))
def test_deep_nesting(depth, opener):
    check("models: " + opener * depth)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8),
                                                                     children, max_size=4),
    max_leaves=30,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["memory", "defaults", "models"]) | st.text(max_size=8), JSONISH, max_size=4))
def test_generated_documents(document):
    text = json.dumps(document, allow_nan=True)  # JSON is YAML; NaN and Infinity are not, which is fine too
    check(text)


@pytest.mark.parametrize("size", [10**3, 10**5, 10**6, 10**7])
def test_huge_files(tmp_path, size):
    for filler in (b"#", b"a", b"["):
        path = tmp_path / "models.yaml"
        path.write_bytes(b"models: " + filler * size)
        with pytest.raises(ConfigError):
            read_document(path)
