"""The desired-state edits behind each admin write, as functions of the round-trip tree.

Each returns the one-line summary that goes into the event log (and the git commit); each
raises EditError when the edit cannot apply. Pure: no HTTP, no loop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from opta_lmx.state.spec import DesiredModelState
from opta_lmx.state.yamledit import (
    EditError,
    append_item,
    delete_item,
    describe_patch,
    find_model,
    merge_patch,
    models_of,
    replace_mapping,
    require_model,
    to_node,
)


def resolve_entry(tree: CommentedMap, model_id: str) -> Any:  # the entry, or None
    """The entry a client's `model_id` names: by name, then by alias."""
    entry = find_model(tree, model_id)
    if entry is not None:
        return entry
    for candidate in models_of(tree):
        if isinstance(candidate, dict) and model_id in (candidate.get("aliases") or []):
            return candidate
    return None


def is_local_path(model_id: str) -> bool:
    """Whether `model_id` names something on this disk; any id a path cannot be (too long, `~nosuchuser`) is not."""
    try:
        return Path(model_id).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        return False


def name_from_source(source: str) -> str:
    """A model name made from a hub id or a path (its last component, cleaned)."""
    base = Path(source.rstrip("/")).name or source
    name = re.sub(r"[^A-Za-z0-9._:@-]", "-", base).lstrip("-._:@") or "model"
    return name[:128]


def put_model(tree: CommentedMap, name: str, spec: dict[str, Any]) -> str:
    """Create or replace one entry; keys that stay keep their place and comments."""
    entry = find_model(tree, name)
    if entry is None:
        append_item(models_of(tree), to_node(spec))
        return f"add model {name}"
    replace_mapping(entry, spec)
    return f"replace model {name}"


def patch_model(tree: CommentedMap, name: str, patch: dict[str, Any]) -> str:
    merge_patch(require_model(tree, name), patch)
    return f"set {name}: {describe_patch(patch)}"


def delete_model(tree: CommentedMap, name: str) -> str:
    models = models_of(tree)
    for index, entry in enumerate(models):
        if isinstance(entry, dict) and entry.get("name") == name:
            delete_item(models, index)
            return f"delete model {name}"
    raise EditError(f"no model named `{name}` in models.yaml", "model_not_found")


def patch_config(tree: CommentedMap, patch: dict[str, Any]) -> str:
    merge_patch(tree, patch)
    return f"set config: {describe_patch(patch)}"


def set_state(tree: CommentedMap, model_id: str, verb: str, state: DesiredModelState,
              touched: dict[str, str]) -> str:
    """Set one model's `state`; loading an unknown hub id or path adds it. Names it in `touched`."""
    entry = resolve_entry(tree, model_id)
    if entry is None:
        looks_like_source = "/" in model_id or is_local_path(model_id)
        if state != DesiredModelState.LOADED or not looks_like_source:
            raise EditError(f"no model named `{model_id}` in models.yaml", "model_not_found")
        name = name_from_source(model_id)
        if find_model(tree, name) is not None:
            raise EditError(f"a model named `{name}` already exists with another source", "model_exists")
        append_item(models_of(tree), to_node({"name": name, "source": model_id, "state": state.value}))
        touched["name"] = name
        return f"add and load model {name} ({model_id})"
    touched["name"] = entry["name"]
    merge_patch(entry, {"state": state.value})
    return f"{verb} model {entry['name']}"


def swap(tree: CommentedMap, source: str, target: str, names: dict[str, str]) -> str:
    """Unload `source` and load `target` in one edit."""
    old, new = resolve_entry(tree, source), resolve_entry(tree, target)
    for given, entry in ((source, old), (target, new)):
        if entry is None:
            raise EditError(f"no model named `{given}` in models.yaml", "model_not_found")
    names.update({"from": old["name"], "to": new["name"]})
    merge_patch(old, {"state": DesiredModelState.UNLOADED.value})
    merge_patch(new, {"state": DesiredModelState.LOADED.value})
    return f"swap {old['name']} -> {new['name']}"


def load_for_alias(tree: CommentedMap, target: str, alias: str, names: dict[str, str]) -> str:
    """First half of an alias swap: load the model the alias will move to."""
    new = resolve_entry(tree, target)
    if new is None:
        raise EditError(f"no model named `{target}` in models.yaml", "model_not_found")
    names["to"] = new["name"]
    merge_patch(new, {"state": DesiredModelState.LOADED.value})
    return f"load {new['name']} before moving alias {alias} to it"


def move_alias(tree: CommentedMap, alias: str, unload_previous: bool, names: dict[str, Any]) -> str:
    """Second half of an alias swap: take the alias from whoever has it, give it to `names["to"]`."""
    new = require_model(tree, names["to"])
    previous = None
    for entry in models_of(tree):
        if isinstance(entry, dict) and alias in (entry.get("aliases") or []) and entry is not new:
            previous = entry
            merge_patch(entry, {"aliases": [a for a in entry["aliases"] if a != alias]})
            if unload_previous:
                merge_patch(entry, {"state": DesiredModelState.UNLOADED.value})
    if alias not in (new.get("aliases") or []):
        merge_patch(new, {"aliases": [*(new.get("aliases") or []), alias]})
    names["previous"] = previous["name"] if previous is not None else None
    return f"move alias {alias} to {new['name']}" + (f" from {previous['name']}" if previous else "")
