"""Round-trip edits of a ruamel tree: values change, comments and layout stay where they were.

A key or list item that is removed or added hands the comment lines that followed it to its
neighbour, so a comment introducing the next model never vanishes with the one before it.
"""

from __future__ import annotations

import json
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.scalarstring import ScalarString
from ruamel.yaml.tokens import CommentToken


class EditError(Exception):
    """The edit cannot apply to this document (e.g. the model it names does not exist).

    `code` says which kind (invalid_edit, invalid_document, model_not_found, model_exists,
    write_failed); the api maps it to an HTTP status.
    """

    def __init__(self, message: str, code: str = "invalid_edit"):
        super().__init__(message)
        self.message = message
        self.code = code


def to_node(value: Any, like: Any = None) -> Any:
    """A JSON value as a round-trip node; a string replacing a quoted one keeps its quotes."""
    if isinstance(value, dict):
        node = CommentedMap()
        if isinstance(like, CommentedMap) and like.fa.flow_style():
            node.fa.set_flow_style()
        for key, item in value.items():
            node[key] = to_node(item)
        return node
    if isinstance(value, list):
        seq = CommentedSeq(to_node(item) for item in value)
        if isinstance(like, CommentedSeq) and like.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    if isinstance(value, str) and isinstance(like, ScalarString) and not isinstance(value, ScalarString):
        return type(like)(value)
    return value


def _same(old: Any, new: Any) -> bool:
    """Equal as data (so an unchanged value keeps its original spelling); bools never equal ints."""
    if isinstance(old, bool) != isinstance(new, bool):
        return False
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return False
    if isinstance(old, str) != isinstance(new, str):
        return False
    return old == new


def _holder(mapping: CommentedMap, key: Any) -> tuple[CommentedMap, Any]:
    """The (mapping, key) whose comment token carries the lines that follow `mapping[key]`."""
    value = mapping[key]
    if isinstance(value, CommentedMap) and value and not value.fa.flow_style():
        return _holder(value, list(value)[-1])
    return mapping, key


def _last_holder(node: Any) -> tuple[CommentedMap, Any] | None:
    if not isinstance(node, CommentedMap) or not node or node.fa.flow_style():
        return None
    return _holder(node, list(node)[-1])


def take_trailer(holder: tuple[CommentedMap, Any] | None) -> str:
    """Detach the comment and blank lines after a key (they belong to whatever comes next)."""
    if holder is None:
        return ""
    mapping, key = holder
    entry = mapping.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if token is None or "\n" not in token.value:
        return ""
    eol, rest = token.value.split("\n", 1)
    if not rest:
        return ""
    token.value = eol + "\n"
    if not eol.strip():
        entry[2] = None
    return rest


def give_trailer(holder: tuple[CommentedMap, Any] | None, rest: str) -> None:
    """Attach lines taken by `take_trailer` after another key."""
    if holder is None or not rest:
        return
    mapping, key = holder
    entry = mapping.ca.items.setdefault(key, [None, None, None, None])
    if entry[2] is None:
        entry[2] = CommentToken("\n" + rest, CommentMark(0), None)
    else:
        entry[2].value = entry[2].value + rest


def delete_key(node: CommentedMap, key: Any) -> None:
    """Remove `key`, keeping the comment lines that followed it (they introduce the next key)."""
    keys = list(node)
    index = keys.index(key)
    rest = take_trailer(_holder(node, key))
    del node[key]
    if index > 0:
        give_trailer(_holder(node, keys[index - 1]), rest)


def set_key(node: CommentedMap, key: Any, value: Any) -> None:
    """Set `key`; a new last key takes over the trailing lines of the previous last one."""
    if key in node:
        node[key] = value
        return
    rest = take_trailer(_last_holder(node))
    node[key] = value
    give_trailer(_holder(node, key), rest)


def append_item(seq: CommentedSeq, item: Any) -> None:
    """Append to a sequence of mappings; the new last item takes over the trailing lines."""
    rest = take_trailer(_last_holder(seq[-1])) if seq else ""
    seq.append(item)
    give_trailer(_last_holder(item), rest)


def delete_item(seq: CommentedSeq, index: int) -> None:
    """Remove an item of a sequence of mappings, keeping the comment lines after it."""
    rest = take_trailer(_last_holder(seq[index]))
    del seq[index]
    if index > 0:
        give_trailer(_last_holder(seq[index - 1]), rest)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def merge_patch(node: Any, patch: dict[str, Any]) -> None:
    """RFC 7396 JSON merge patch, applied in place so untouched keys keep their comments."""
    for key, value in patch.items():
        if value is None:
            if key in node:
                delete_key(node, key)
        elif isinstance(value, dict):
            current = node.get(key)
            if isinstance(current, CommentedMap):
                merge_patch(current, value)
            else:
                set_key(node, key, to_node(_without_nulls(value), current))
        elif key not in node or not _same(node[key], value):
            set_key(node, key, to_node(value, node.get(key)))


def replace_mapping(node: CommentedMap, new: dict[str, Any]) -> None:
    """Make `node` equal `new`, in place: keys that stay keep their place and comments."""
    for key in [k for k in node if k not in new]:
        delete_key(node, key)
    for key, value in new.items():
        current = node.get(key)
        if isinstance(value, dict) and isinstance(current, CommentedMap):
            replace_mapping(current, value)
        elif key not in node or not _same(current, value):
            set_key(node, key, to_node(value, current))


def models_of(tree: CommentedMap) -> Any:  # a CommentedSeq (a list for a tree built in code)
    models = tree.get("models")
    if models is None:
        models = CommentedSeq()
        tree["models"] = models
    if not isinstance(models, list):
        raise EditError("`models` in models.yaml is not a list", "invalid_document")
    return models


def find_model(tree: CommentedMap, name: str) -> Any:  # the entry (a CommentedMap), or None
    for entry in models_of(tree):
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def require_model(tree: CommentedMap, name: str) -> CommentedMap:
    entry = find_model(tree, name)
    if entry is None:
        raise EditError(f"no model named `{name}` in models.yaml", "model_not_found")
    return entry


def describe_patch(patch: Any, prefix: str = "") -> str:
    """`a.b=1, c=null`: a one-line account of a merge patch, for commit messages and events."""
    if not isinstance(patch, dict) or not patch:
        return f"{prefix}={_short(patch)}" if prefix else _short(patch)
    parts = []
    for key, value in patch.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        parts.append(describe_patch(value, path) if isinstance(value, dict) and value else f"{path}={_short(value)}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
