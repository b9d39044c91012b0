"""models.yaml parsing: errors name the file, line, column and field path."""

from __future__ import annotations

import pytest

from opta_lmx.state.document import ConfigError, DocumentIncomplete, DocumentMissing, parse_document, read_document
from opta_lmx.state.quantities import format_size, parse_duration, parse_size

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
    engine: {tool_call_parser: qwen3_coder, max_num_seqs: 32}
    memory: 18GiB
  - name: chat
    source: ./models/chat
    state: unloaded
"""


def test_good_document_validates_and_merges_defaults():
    document = parse_document(GOOD)
    state = document.state
    assert [m.name for m in state.models] == ["coder", "chat"]
    assert state.resolve("default").name == "coder"
    assert state.resolve("nope") is None
    engine = state.effective_engine(state.models[0])
    assert engine.continuous_batching is True and engine.max_num_seqs == 32
    assert state.models[0].memory_bytes() == 18 * 1024**3
    assert state.memory.budget_bytes(100 * 1024**3) == 50 * 1024**3
    assert document.etag == parse_document(GOOD).etag != parse_document(GOOD + "\n").etag


@pytest.mark.parametrize(
    ("text", "path", "line", "column"),
    [
        ("models:\n  - name: a\n    source: x\n    engine: {max_num_seqs: 0}\n", "models[0].engine.max_num_seqs", 4, 14),
        ("models:\n  - name: a\n    source: x\n    state: sometimes\n", "models[0].state", 4, 5),
        ("models:\n  - name: a\n    source: x\n    colour: blue\n", "models[0].colour", 4, 5),
        ("memory:\n  budget: 150%\n", "memory.budget", 2, 3),
        ("memory:\n  reserve: lots\n", "memory.reserve", 2, 3),
        ("models:\n  - name: 'bad name'\n    source: x\n", "models[0].name", 2, 5),
        ("models:\n  - name: a\n", "models[0].source", 2, 5),
    ],
)
def test_errors_point_at_the_field(text, path, line, column):
    with pytest.raises(ConfigError) as caught:
        parse_document(text, "models.yaml")
    (problem,) = caught.value.problems
    assert (problem.path, problem.line, problem.column) == (path, line, column)
    assert f"models.yaml:{line}:{column}: {path}:" in caught.value.describe()


def test_duplicate_names_and_aliases_are_rejected():
    text = "models:\n  - {name: a, source: x, aliases: [b]}\n  - {name: b, source: y}\n"
    with pytest.raises(ConfigError, match="'b' is already used by an alias of 'a'"):
        parse_document(text)


def test_yaml_syntax_error_has_position():
    with pytest.raises(ConfigError) as caught:
        parse_document("models:\n  - name: a\n   source: x\n")
    (problem,) = caught.value.problems
    assert problem.line == 3 and "YAML syntax" in problem.message


def test_missing_file_and_empty_file_are_not_an_empty_desired_state(tmp_path):
    with pytest.raises(DocumentMissing, match="file not found") as caught:
        read_document(tmp_path / "absent.yaml")
    assert caught.value.kind == "missing"
    empty = tmp_path / "empty.yaml"
    for text in ["", "  \n\t\n", "# nothing yet\n"]:
        empty.write_text(text)
        with pytest.raises(DocumentIncomplete, match="being written") as caught:
            read_document(empty)
        assert caught.value.kind == "incomplete" and caught.value.to_dict()["kind"] == "incomplete"
    empty.write_text("models: []\n")
    assert read_document(empty).state.models == []


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        parse_document("- a\n- b\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("600MiB", 600 * 1024**2), ("48GiB", 48 * 1024**3), ("1.5GB", 1_500_000_000), (1024, 1024), ("2 gib", 2 * 1024**3)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-1", "GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("500ms", 0.5), (12, 12)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


def test_parse_duration_rejects():
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_format_size():
    assert format_size(1536 * 1024**2) == "1.5 GiB"
    assert format_size(None) == "-"
