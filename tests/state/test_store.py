"""The models.yaml writer: fidelity of round-trip edits, validation, atomicity, and no lost update."""

from __future__ import annotations

import difflib
import os
import stat
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opta_lmx.state.document import ConfigError, content_etag, read_document
from opta_lmx.state.document import new_yaml, plain
from opta_lmx.api.admin.protocol import edit_error_status, etag_matches, if_match_precondition
from opta_lmx.state.render import _dump, render_edit, splice
from opta_lmx.state.store import ModelsStore, PreconditionFailed
from opta_lmx.state.yamledit import (
    EditError,
    append_item,
    delete_item,
    describe_patch,
    merge_patch,
    models_of,
    replace_mapping,
    require_model,
    to_node,
)

ORIGINAL = """\
# Opta-LMX desired state (hand-written)
memory:
  budget: 75%       # of physical memory
  reserve: 2GiB

defaults:
  engine: {continuous_batching: true, max_tokens: 512}

models:
  # the main model
  - name: coder     # what clients call
    source: "mlx-community/Qwen3-Coder-4bit"
    aliases: [default, c]
    priority: 10
    # keep it resident
    pinned: true

  - name: small
    source: './models/small'
    state: unloaded
    engine:
      max_num_seqs: 4   # tiny machine
# end of file
"""


def _diff(before: str, after: str) -> list[str]:
    """Changed lines only (+/-), without the diff headers."""
    return [
        line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def patch_model(name, patch):
    def mutate(tree):
        merge_patch(require_model(tree, name), patch)
        return f"set {name}: {describe_patch(patch)}"

    return mutate


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(ORIGINAL)
    return ModelsStore(path)


def test_patch_of_one_value_changes_one_line(store):
    result = store.edit(patch_model("coder", {"priority": 50}))
    after = store.path.read_text()
    assert _diff(ORIGINAL, after) == ["-    priority: 10", "+    priority: 50"]
    assert result.changed and result.etag == content_etag(after.encode())
    assert result.state.model("coder").priority == 50
    assert result.summary == "set coder: priority=50"


def test_quotes_and_flow_style_survive_edits(store):
    store.edit(patch_model("coder", {"source": "other/repo", "aliases": ["default"]}))
    store.edit(patch_model("small", {"source": "./models/other"}))
    assert _diff(ORIGINAL, store.path.read_text()) == [
        '-    source: "mlx-community/Qwen3-Coder-4bit"',
        "-    aliases: [default, c]",
        '+    source: "other/repo"',
        "+    aliases: [default]",
        "-    source: './models/small'",
        "+    source: './models/other'",
    ]


def test_nested_patch_add_and_delete_keep_comments(store):
    store.edit(patch_model("small", {"engine": {"max_num_seqs": 8, "max_tokens": 64}, "priority": 3}))
    after = store.path.read_text()
    assert _diff(ORIGINAL, after) == [
        "-      max_num_seqs: 4   # tiny machine",
        "+      max_num_seqs: 8   # tiny machine",
        "+      max_tokens: 64",
        "+    priority: 3",
    ]
    assert after.endswith("# end of file\n")
    # Deleting a key keeps the comment lines that followed it.
    store.edit(patch_model("coder", {"pinned": None}))
    after2 = store.path.read_text()
    assert _diff(after, after2) == ["-    pinned: true"]
    assert "    # keep it resident\n\n  - name: small" in after2


def test_noop_patch_writes_nothing(store):
    before = os.stat(store.path)
    result = store.edit(patch_model("coder", {"priority": 10, "source": "mlx-community/Qwen3-Coder-4bit"}))
    assert not result.changed
    assert store.path.read_text() == ORIGINAL
    assert os.stat(store.path).st_ino == before.st_ino


def test_add_and_remove_models_keep_the_rest(store):
    store.edit(lambda tree: append_item(models_of(tree), to_node({"name": "new", "source": "/m", "state": "unloaded"})) or "add")
    after = store.path.read_text()
    assert _diff(ORIGINAL, after) == ["+  - name: new", "+    source: /m", "+    state: unloaded"]
    assert after.endswith("    state: unloaded\n# end of file\n")
    store.edit(lambda tree: delete_item(models_of(tree), 2) or "delete")
    assert store.path.read_text() == ORIGINAL


def test_replace_mapping_keeps_order_and_comments_of_kept_keys(store):
    def mutate(tree):
        replace_mapping(require_model(tree, "coder"), {
            "name": "coder", "source": "mlx-community/Qwen3-Coder-4bit", "aliases": ["default", "c"],
            "priority": 20, "max_concurrency": 2,
        })
        return "put"

    store.edit(mutate)
    after = store.path.read_text()
    assert "  - name: coder     # what clients call\n" in after
    changed = _diff(ORIGINAL, after)
    assert "+    priority: 20" in changed and "+    max_concurrency: 2" in changed
    assert "-    pinned: true" in changed
    assert not any("source" in line or "aliases" in line for line in changed)


def test_invalid_edit_is_refused_with_field_path_and_file_untouched(store):
    mtime = os.stat(store.path).st_mtime_ns
    with pytest.raises(ConfigError) as caught:
        store.edit(patch_model("small", {"state": "sometimes"}))
    assert caught.value.problems[0].path == "models[1].state"
    assert caught.value.problems[0].line == 20
    with pytest.raises(ConfigError) as caught:
        store.edit(patch_model("small", {"aliases": ["default"]}))  # already coder's alias
    assert "already used" in caught.value.problems[0].message
    assert store.path.read_text() == ORIGINAL and os.stat(store.path).st_mtime_ns == mtime
    with pytest.raises(EditError) as missing:
        store.edit(patch_model("nope", {"priority": 1}))
    assert edit_error_status(missing.value) == 404


def test_stale_if_match_is_refused_and_file_untouched(store):
    etag = store.snapshot().etag
    assert etag_matches(etag, etag) and etag_matches("*", etag) and etag_matches(f'W/{etag}, "x"', etag)
    store.edit(patch_model("coder", {"priority": 1}), precondition=if_match_precondition(etag))
    changed = store.path.read_text()
    with pytest.raises(PreconditionFailed) as caught:
        store.edit(patch_model("coder", {"priority": 2}), precondition=if_match_precondition(etag))
    assert caught.value.current == content_etag(changed.encode())
    assert store.path.read_text() == changed


def test_mode_kept_and_no_temp_files_left(store):
    os.chmod(store.path, 0o640)
    store.edit(patch_model("coder", {"priority": 5}))
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o640
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["models.yaml"]


def test_symlink_stays_a_link_and_its_target_changes(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    target = repo / "models.yaml"
    target.write_text(ORIGINAL)
    link = tmp_path / "etc" / "models.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    store = ModelsStore(link)
    store.edit(patch_model("coder", {"priority": 7}))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "priority: 7" in target.read_text()
    assert read_document(link).state.model("coder").priority == 7
    assert sorted(p.name for p in repo.iterdir()) == ["models.yaml"]


def test_a_person_saving_during_an_edit_is_not_lost(store):
    """The file changes between our read and our write: the edit is redone on the new content."""
    calls = []

    def mutate(tree):
        if not calls:  # a person saves the file (editor-style rename) while we are editing
            edited = ORIGINAL.replace("reserve: 2GiB", "reserve: 3GiB")
            tmp = store.path.with_suffix(".swp")
            tmp.write_text(edited)
            os.replace(tmp, store.path)
        calls.append(1)
        merge_patch(require_model(tree, "coder"), {"priority": 99})
        return "set"

    store.edit(mutate)
    after = store.path.read_text()
    assert len(calls) == 2
    assert "reserve: 3GiB" in after and "priority: 99" in after
    assert _diff(ORIGINAL, after) == ["-  reserve: 2GiB", "+  reserve: 3GiB", "-    priority: 10", "+    priority: 99"]


def test_concurrent_edits_from_threads_each_apply_once(tmp_path):
    text = "models:\n" + "".join(f"  - name: m{i}\n    source: /m{i}\n    state: unloaded\n" for i in range(16))
    path = tmp_path / "models.yaml"
    path.write_text(text)
    stores = [ModelsStore(path), ModelsStore(path)]  # two writers that do not share a lock
    barrier = threading.Barrier(16)
    errors = []

    def work(i):
        try:
            barrier.wait(10)
            stores[i % 2].edit(patch_model(f"m{i}", {"priority": 100 + i}))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    state = read_document(path).state
    assert [m.priority for m in state.models] == [100 + i for i in range(16)]
    assert len(_diff(text, path.read_text())) == 16


def test_unusual_layout_keeps_untouched_lines_byte_for_byte(tmp_path):
    text = (
        "models:\n"
        "- name: a          # flush sequence\n"
        "  source:    /a\n"
        "  engine: { max_tokens: 5 }\n"
        "- name: b\n"
        "  source: /b\n"
    )
    path = tmp_path / "models.yaml"
    path.write_text(text)
    store = ModelsStore(path)
    store.edit(patch_model("b", {"priority": 4}))
    assert _diff(text, path.read_text()) == ["+  priority: 4"]
    store.edit(patch_model("a", {"priority": 1}))
    assert path.read_text().startswith("models:\n- name: a          # flush sequence\n  source:    /a\n")


def test_splice_refuses_what_does_not_map():
    assert splice("a\nb\n", "a\nb\n", "a\nc\n") == "a\nc\n"
    assert splice("x: 1\n", "y: 1\n", "y: 2\n") is None


def _add_a(tree):
    append_item(models_of(tree), to_node({"name": "a", "source": "/a"}))
    return "add a"


@pytest.mark.parametrize("content", [None, b"", b"  \n\n"])
def test_a_missing_or_blank_file_is_not_an_empty_desired_state(tmp_path, content):
    """Issue 15 item 4: an edit of a missing or blank file must not create one holding only itself."""
    store = ModelsStore(tmp_path / "models.yaml")
    if content is not None:
        store.path.write_bytes(content)
    with pytest.raises(EditError) as refused:
        store.edit(_add_a)
    assert refused.value.code == "document_missing" and edit_error_status(refused.value) == 409
    assert "PUT /admin/desired" in refused.value.message and "create=true" in refused.value.message
    if content is None:
        assert not store.path.exists()
    else:
        assert store.path.read_bytes() == content
    store.edit(_add_a, create=True)  # asked for explicitly
    assert [m.name for m in read_document(store.path).state.models] == ["a"]


def test_replace_creates_a_missing_file_but_refuses_a_blank_document(tmp_path):
    store = ModelsStore(tmp_path / "models.yaml")
    with pytest.raises(EditError) as blank:
        store.replace("\n")
    assert "models: []" in blank.value.message and not store.path.exists()
    assert store.replace("models: []\n").changed and store.path.read_text() == "models: []\n"


@pytest.mark.parametrize("broken", [b"models: [\xff]\n", b"models: [unclosed\n", b"\tnot: yaml: at: all\n"])
def test_a_broken_file_can_still_be_replaced_whole_under_its_raw_etag(tmp_path, broken):
    """Issue 15 item 9: non-UTF-8 or unparsable, the whole-file replace always works."""
    store = ModelsStore(tmp_path / "models.yaml")
    store.path.write_bytes(broken)
    with pytest.raises(PreconditionFailed):
        store.replace("models: []\n", precondition=if_match_precondition(content_etag(b"other")))
    assert store.path.read_bytes() == broken
    result = store.replace("models: []\n", precondition=if_match_precondition(content_etag(broken)))
    assert result.changed and store.path.read_text() == "models: []\n"


def test_a_directory_in_place_of_the_file_is_refused_clearly(tmp_path):
    store = ModelsStore(tmp_path / "models.yaml")
    store.path.mkdir()
    (store.path / "keep").write_text("mine")
    snap = store.snapshot()
    assert snap.problem and "is a directory" in snap.problem
    for write in (lambda: store.replace("models: []\n"), lambda: store.edit(_add_a, create=True)):
        with pytest.raises(EditError) as refused:
            write()
        assert refused.value.code == "document_unreadable" and edit_error_status(refused.value) == 409
    assert (store.path / "keep").read_text() == "mine"


def test_a_looping_symlink_is_replaced_by_a_whole_file_but_not_edited(tmp_path):
    store = ModelsStore(tmp_path / "models.yaml")
    os.symlink("loop.yaml", store.path)
    os.symlink("models.yaml", tmp_path / "loop.yaml")
    assert store.snapshot().loops and "loops" in store.snapshot().problem
    with pytest.raises(EditError) as refused:
        store.edit(_add_a, create=True)
    assert refused.value.code == "document_unreadable"
    store.replace("models: []\n")
    assert not store.path.is_symlink() and store.path.read_text() == "models: []\n"


def test_replace_whole_document_validates_first(store):
    with pytest.raises(ConfigError):
        store.replace("models: [{name: x}]\n")
    assert store.path.read_text() == ORIGINAL
    result = store.replace("# new\nmodels: []\n")
    assert result.changed and store.path.read_text() == "# new\nmodels: []\n"


def test_git_commit_names_the_change_and_endpoint(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "models.yaml").write_text(ORIGINAL)
    (repo / "other.txt").write_text("staged but not ours\n")
    env_git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*env_git, "add", "."], check=True)
    subprocess.run([*env_git, "commit", "-qm", "initial"], check=True)
    (repo / "other.txt").write_text("changed and staged\n")
    subprocess.run([*env_git, "add", "other.txt"], check=True)

    store = ModelsStore(repo / "models.yaml", git_commit=True)
    result = store.edit(patch_model("coder", {"priority": 3}), endpoint="PATCH /admin/models/coder")
    assert result.commit and result.commit_error is None
    log = subprocess.run([*env_git, "log", "-1", "--format=%s", "--name-only"], capture_output=True, text=True,
                         check=True).stdout
    assert log.splitlines()[0] == "set coder: priority=3 (via PATCH /admin/models/coder)"
    assert "models.yaml" in log and "other.txt" not in log
    status = subprocess.run([*env_git, "status", "--porcelain"], capture_output=True, text=True).stdout
    assert status.strip() == "M  other.txt"  # someone else's staged change is left alone


def test_windows_line_endings_are_kept(tmp_path):
    path = tmp_path / "models.yaml"
    original = ORIGINAL.replace("\n", "\r\n").encode()
    path.write_bytes(original)
    ModelsStore(path).edit(patch_model("coder", {"priority": 1}))
    data = path.read_bytes()
    assert data.count(b"\r\n") == original.count(b"\r\n") and b"\r\n" in data
    assert data.replace(b"priority: 1\r\n", b"priority: 10\r\n") == original


def test_a_file_that_does_not_parse_is_not_edited(store):
    store.path.write_text("models: [\n")
    with pytest.raises(EditError) as caught:
        store.edit(patch_model("coder", {"priority": 1}))
    assert edit_error_status(caught.value) == 409 and "does not parse" in caught.value.message
    assert store.path.read_text() == "models: [\n"
    store.replace(ORIGINAL)  # replacing it whole is the way out
    assert store.path.read_text() == ORIGINAL


def test_unwritable_directory_is_a_clear_error(store, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(store.path.parent))

    monkeypatch.setattr("opta_lmx.state.atomic.tempfile.mkstemp", refuse)
    with pytest.raises(EditError) as caught:
        store.edit(patch_model("coder", {"priority": 1}))
    assert edit_error_status(caught.value) == 500 and "cannot write" in caught.value.message
    assert store.path.read_text() == ORIGINAL


def _rfc7396(target, patch):
    """The reference algorithm of RFC 7396, section 2, on plain data."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _rfc7396(result.get(key), value)
    return result


_keys = st.sampled_from(["a", "b", "c", "engine", "aliases"])
_scalars = st.one_of(st.integers(-5, 5), st.booleans(), st.text("xyz", max_size=3))
_values = st.recursive(_scalars | st.lists(_scalars, max_size=3),
                       lambda inner: st.dictionaries(_keys, inner, max_size=3), max_leaves=8)
_patches = st.recursive(st.none() | _scalars | st.lists(_scalars, max_size=3),
                        lambda inner: st.dictionaries(_keys, inner, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(document=st.dictionaries(_keys, _values, max_size=4), patch=st.dictionaries(_keys, _patches, max_size=4))
def test_merge_patch_is_rfc7396_and_round_trips(document, patch):
    text = _dump(new_yaml(), to_node(document)) if document else ""
    new_text, _ = render_edit(text, lambda tree: merge_patch(tree, patch) or "patch")
    assert (plain(new_yaml().load(new_text)) or {}) == _rfc7396(document, patch)
