"""Reading models.yaml is bounded: bombs, depth, size and odd files are positioned ConfigErrors.

The attacks of issue 12 (a nine-level alias bomb ran past 60 s and 2.7 GB) and issue 15
(a FIFO froze the server, a zero-byte file removed every model).
"""

from __future__ import annotations

import os
import resource
import threading

import pytest

from opta_lmx.state.document import (
    MAX_DOCUMENT_BYTES,
    ConfigError,
    DocumentIncomplete,
    parse_document,
    read_document,
)


def alias_bomb(levels: int, width: int = 9, where: str = "models") -> str:
    lines = ['a0: &a0 ["lol"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    lines.append(f"{where}: *a{levels}")
    return "\n".join(lines) + "\n"


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_document(text, "models.yaml")
    for problem in caught.value.problems:
        assert problem.line is not None and problem.column is not None
    return caught.value


@pytest.mark.parametrize("levels", [6, 8, 9, 12])
def test_alias_bombs_are_refused_with_a_position_in_bounded_memory(levels):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = refused(alias_bomb(levels))
    assert "refused" in error.problems[0].message and "aliases" in error.problems[0].message
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024  # the unbounded parse took 2.7 GB


def test_an_alias_bomb_inside_a_model_is_refused_too():
    text = "models:\n  - name: a\n    source: x\n" + alias_bomb(8, where="bomb")
    assert "refused" in refused(text).problems[0].message


def test_ordinary_aliases_still_work():
    text = ("defaults: {engine: &eng {max_num_seqs: 4}}\nmodels:\n"
            "  - {name: a, source: x, engine: *eng}\n  - {name: b, source: y, engine: *eng}\n")
    state = parse_document(text).state
    assert [m.engine.max_num_seqs for m in state.models] == [4, 4]


@pytest.mark.parametrize("text", [
    "models: " + "[" * 100_000,
    "models: " + "{a: " * 5_000 + "1" + "}" * 5_000,
    "".join(" " * i + "a:\n" for i in range(200)),
    "".join(" " * i + "-\n" for i in range(200)),
])
def test_deep_nesting_is_refused_with_a_position(text):
    error = refused(text)
    assert "refused" in error.describe() or "deeper" in error.describe()


def test_a_self_referencing_alias_is_an_error_not_a_hang():
    refused("a: &x [*x]\nmodels: *x\n")
    refused("models: &x [{name: a, source: x, aliases: *x}]\n")


def test_large_documents_are_refused_before_parsing(tmp_path):
    assert "refused" in refused("models: []\n" + "#" * MAX_DOCUMENT_BYTES).problems[0].message
    assert "refused" in refused("models: []\n" + "k: 1\n" * 6000).problems[0].message
    big = tmp_path / "big.yaml"
    big.write_bytes(b"models: []\n" + b"#" * (20 * MAX_DOCUMENT_BYTES))
    with pytest.raises(ConfigError, match="refused: larger than"):
        read_document(big)


def test_many_problems_are_summarised():
    text = "models:\n" + "".join(f"  - {{name: 'bad {i}', source: x}}\n" for i in range(100))
    error = refused(text)
    assert len(error.problems) == 21 and "80 more" in error.problems[-1].message


@pytest.mark.parametrize("text", ["", " ", "\n\n", "\t\n  \n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_being_written_not_no_models(text):
    with pytest.raises(DocumentIncomplete) as caught:
        parse_document(text)
    assert caught.value.kind == "incomplete"


def test_only_an_explicit_empty_list_means_no_models():
    assert parse_document("models: []\n").state.models == []
    error = refused("memory: {budget: 50%}\n")
    assert error.problems[0].path == "models" and "models: []" in error.problems[0].message


def test_a_fifo_a_device_and_a_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "models.yaml"
    os.mkfifo(fifo)
    done = threading.Event()
    outcome: list[BaseException] = []

    def read():
        try:
            read_document(fifo)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(error)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(30), "read_document blocked on a FIFO"
    assert isinstance(outcome[0], ConfigError) and "not a regular file" in str(outcome[0])
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_document(zero)
    with pytest.raises(ConfigError, match="directory"):
        read_document(tmp_path)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match="cannot read"):
        read_document(loop)


def test_a_link_to_a_regular_file_is_read(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text("models: []\n")
    link = tmp_path / "models.yaml"
    link.symlink_to(real)
    assert read_document(link).state.models == []


def test_non_utf8_bytes_are_an_error_with_a_position(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_bytes(b"models:\n  - name: a\n    source: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        read_document(path)
    problem = caught.value.problems[0]
    assert (problem.line, problem.column) == (3, 16) and "UTF-8" in problem.message


def test_read_document_is_safe_from_many_threads(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - {name: a, source: x}\n  - {name: b, source: y, aliases: [c]}\n")
    results: list[object] = []

    def read():
        for _ in range(20):
            results.append(read_document(path).state.resolve("c").name)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["b"] * 80


@pytest.mark.parametrize("tail", [
    "models: *a12\nmodels: []\n",  # a duplicate key whose value is a bomb (ruamel printed it)
    "? *a12\n: 1\nmodels: []\n",  # a bomb as a key (hashing it is exponential)
    "x: !!set {a: *a12}\nmodels: []\n",
    "x: !custom 1\nmodels: []\n",
    "models: !!omap [a: 1]\n",
])
def test_keys_duplicates_and_tags_cannot_smuggle_a_bomb(tail):
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 12) + "]" for i in range(1, 13)]
    refused("\n".join(lines) + "\n" + tail)


def test_merge_keys_still_work_and_errors_in_them_have_a_position():
    state = parse_document("defaults: &d {engine: {max_num_seqs: 2}}\nmodels: [{<<: *d, name: a, source: x}]\n").state
    assert state.models[0].engine.max_num_seqs == 2
    refused("models: []\nx: &m {a: 1}\n<<: *m\n")
