"""Emitting an edited tree so that every untouched line of the file survives byte for byte."""

from __future__ import annotations

import difflib
import io
import logging
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from opta_lmx.state.document import new_yaml, plain
from opta_lmx.state.yamledit import EditError

log = logging.getLogger(__name__)

# Indentation styles tried when re-emitting a file, so a file written in another common style
# (for example `- name:` flush with its parent key) is re-emitted in that same style.
_INDENTS = [(2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (4, 4, 0), (2, 3, 1)]


def _yaml_with(indent: tuple[int, int, int]) -> YAML:
    yaml = new_yaml()
    yaml.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    return yaml


def _dump(yaml: YAML, tree: Any) -> str:
    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    return buffer.getvalue()


def _load_with_style(text: str) -> tuple[YAML, Any, str]:
    """Load `text`, picking the indentation style that re-emits it most faithfully."""
    best: tuple[float, YAML, Any, str] | None = None
    for indent in _INDENTS:
        yaml = _yaml_with(indent)
        tree = yaml.load(text)
        dumped = _dump(yaml, tree) if tree is not None else ""
        if dumped == text:
            return yaml, tree, dumped
        score = difflib.SequenceMatcher(None, dumped.splitlines(), text.splitlines(), autojunk=False).ratio()
        if best is None or score > best[0]:
            best = (score, yaml, tree, dumped)
    assert best is not None
    return best[1], best[2], best[3]


def splice(original: str, before: str, after: str) -> str | None:
    """Apply the line changes between two dumps (`before` -> `after`) to the original text.

    ruamel re-emits some layouts differently from how a person wrote them (extra spaces,
    flow-style spacing); splicing only the changed lines into the original keeps every
    untouched line byte for byte. None when the changes do not map onto the original.
    """
    orig, old, new = (t.splitlines(keepends=True) for t in (original, before, after))
    if orig == old:
        return after
    mapping: dict[int, int] = {}
    for tag, i1, i2, j1, _j2 in difflib.SequenceMatcher(None, old, orig, autojunk=False).get_opcodes():
        if tag == "equal":
            mapping.update({i1 + k: j1 + k for k in range(i2 - i1)})
    out: list[str] = []
    pos = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if i1 < i2:
            if any(k not in mapping for k in range(i1, i2)):
                return None
            start, end = mapping[i1], mapping[i2 - 1] + 1
            if end - start != i2 - i1:
                return None
        elif i1 in mapping:
            start = end = mapping[i1]
        elif i1 == len(old):
            start = end = len(orig)
        elif i1 - 1 in mapping:
            start = end = mapping[i1 - 1] + 1
        else:
            return None
        if start < pos:
            return None
        out += orig[pos:start]
        out += new[j1:j2]
        pos = end
    out += orig[pos:]
    return "".join(out)


def render_edit(text: str, mutate: Callable[[CommentedMap], str]) -> tuple[str, str]:
    """The new file text after `mutate` edits the tree of `text`, and its summary.

    Untouched lines survive byte for byte: the edit is emitted by ruamel and spliced into
    the original, falling back to ruamel's whole output only if the splice would not mean
    the same data.
    """
    if "\r\n" in text:  # keep Windows line endings: edit with \n, write back with \r\n
        new_text, summary = render_edit(text.replace("\r\n", "\n"), mutate)
        return new_text.replace("\n", "\r\n"), summary
    try:
        yaml, tree, before = _load_with_style(text) if text.strip() else (new_yaml(), None, "")
    except YAMLError as error:
        raise EditError(
            f"models.yaml does not parse, so it cannot be edited; fix it by hand or replace it "
            f"whole (PUT /admin/desired): {error}", "invalid_document",
        ) from None
    if tree is None:
        tree = CommentedMap()
        before = ""
    if not isinstance(tree, CommentedMap):
        raise EditError("the top level of models.yaml is not a mapping", "invalid_document")
    summary = mutate(tree)
    after = _dump(yaml, tree)
    spliced = splice(text, before, after) if before else None
    if spliced is not None and spliced != after:
        try:
            if plain(new_yaml().load(spliced)) == plain(new_yaml().load(after)):
                return spliced, summary
        except YAMLError:
            pass
        log.info("could not splice the edit into models.yaml's own layout; re-emitting it whole")
        return after, summary
    return (spliced if spliced is not None else after), summary
