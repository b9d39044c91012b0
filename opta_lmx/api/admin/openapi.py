"""What each admin write takes, for the OpenAPI schema (`/openapi.json`, the docs pages, the fuzzer).

The routes read their bodies by hand (so a wrong value gets the API's own clear error, not
pydantic's), which leaves FastAPI nothing to describe: these `openapi_extra` blocks say what
the bodies and query parameters are, derived from the same pydantic models the file is
validated with, so the schema cannot drift from the validation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from opta_lmx.api.admin.protocol import MAX_WAIT
from opta_lmx.state.spec import DesiredState, ModelSpec


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` resolved in place (openapi_extra has no $defs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any, depth: int = 0) -> Any:
        if depth > 20:  # a recursive model: stop describing, accept anything
            return {}
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]], depth + 1)
            return {key: resolve(value, depth) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value, depth) for value in node]
        return node

    return resolve(schema)


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


WAIT = [
    _query("wait", {"type": "string", "enum": ["ready", "none"]},
           "`ready`: answer once the loop has converged on this write (200), or 504/502"),
    _query("timeout", {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
           "seconds `wait=ready` waits"),
]
CREATE = _query("create", {"type": "boolean"},
                "start a new models.yaml holding only this change when there is none (or it is blank); "
                "without it such a write is refused with 409")
DRY_RUN = _query("dry_run", {"type": "boolean"}, "only validate and diff; write nothing")


def _body(schema: dict, *media_types: str) -> dict:
    return {"required": True, "content": {media: {"schema": schema} for media in media_types}}


def _loose(schema: dict) -> dict:
    """A schema for a merge patch of `schema`: nothing required, `null` deletes."""
    return {**schema, "required": [], "properties": {
        key: {"anyOf": [value, {"type": "null"}]} for key, value in schema.get("properties", {}).items()}}


_SPEC = inline_schema(ModelSpec)
_SPEC_BODY = {**_SPEC, "required": [key for key in _SPEC.get("required", []) if key != "name"]}
_STATE = inline_schema(DesiredState)
_CONFIG = {"type": "object", "properties": {k: v for k, v in _STATE.get("properties", {}).items() if k != "models"}}
_TIMEOUT = {"type": "number", "minimum": 0, "maximum": MAX_WAIT}
_JSON = "application/json"


def _doc(body: dict | None = None, params: tuple[dict, ...] | list[dict] = ()) -> dict:
    out: dict[str, Any] = {"parameters": list(params)}
    if body is not None:
        out["requestBody"] = body
    return out


PUT_MODEL = _doc(_body(_SPEC_BODY, _JSON), [*WAIT, CREATE])
PATCH_MODEL = _doc(_body(_loose(_SPEC), "application/merge-patch+json", _JSON), [*WAIT, CREATE])
DELETE_MODEL = _doc(None, [*WAIT, CREATE])
SET_STATE = _doc(_body({"type": "object", "required": ["model_id"], "properties": {
    "model_id": {"type": "string", "minLength": 1, "description": "a name, an alias, a hub id or a path"},
    "timeout": _TIMEOUT}}, _JSON), [*WAIT, CREATE])
SWAP = _doc(_body({"type": "object", "required": ["to"], "properties": {
    "to": {"type": "string", "minLength": 1}, "from": {"type": "string"}, "alias": {"type": "string"},
    "unload_previous": {"type": "boolean"}, "timeout": _TIMEOUT}}, _JSON), [*WAIT, CREATE])
PATCH_CONFIG = _doc(_body(_loose(_CONFIG), "application/merge-patch+json", _JSON), [*WAIT, CREATE])
PUT_DESIRED = _doc(_body({"type": "string", "description": "the whole models.yaml"}, "application/yaml"),
                   [*WAIT, DRY_RUN])
