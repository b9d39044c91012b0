"""The desired state: what models.yaml says should be running.

Pure data. The same schema validates the file loader and every admin write, and is
published as JSON Schema (`lmx schema`).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from opta_lmx.state.quantities import parse_duration, parse_size

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)


def _check_size(value: int | str) -> int | str:
    parse_size(value)
    return value


def _check_duration(value: int | float | str) -> int | float | str:
    parse_duration(value)
    return value


def _check_budget(value: int | str) -> int | str:
    if isinstance(value, str) and value.strip().endswith("%"):
        number = float(value.strip()[:-1])
        if not 0 < number <= 100:
            raise ValueError("a percentage budget must be between 0% and 100%")
        return value
    parse_size(value)
    return value


Size = Annotated[int | str, AfterValidator(_check_size)]
Duration = Annotated[int | float | str, AfterValidator(_check_duration)]


class DesiredModelState(str, enum.Enum):
    LOADED = "loaded"
    UNLOADED = "unloaded"
    ON_DEMAND = "on-demand"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EngineOptions(_Strict):
    """vllm-mlx `serve` options under their own names, in snake_case.

    Unset fields are left to vllm-mlx's own defaults; `extra_args` passes anything
    else through verbatim for options this schema does not name yet.
    """

    continuous_batching: bool | None = None
    max_num_seqs: int | None = Field(default=None, gt=0)
    prefill_batch_size: int | None = Field(default=None, gt=0)
    completion_batch_size: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    max_request_tokens: int | None = Field(default=None, gt=0)
    max_kv_size: int | None = Field(default=None, gt=0)
    stream_interval: int | None = Field(default=None, gt=0)
    chunked_prefill_tokens: int | None = Field(default=None, ge=0)
    enable_prefix_cache: bool | None = None
    cache_memory_mb: int | None = Field(default=None, gt=0)
    kv_cache_quantization: bool | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool | None = None
    reasoning_parser: str | None = None
    trust_remote_code: bool | None = None
    timeout: float | None = Field(default=None, gt=0)
    default_temperature: float | None = Field(default=None, ge=0)
    default_top_p: float | None = Field(default=None, gt=0, le=1)
    extra_args: list[str] = Field(default_factory=list)

    def merged_over(self, base: "EngineOptions") -> "EngineOptions":
        """These options with every unset field taken from `base` (the defaults)."""
        mine = self.model_dump(exclude_unset=True, exclude_none=True)
        merged = base.model_dump(exclude_unset=True, exclude_none=True)
        merged.update(mine)
        return EngineOptions(**merged)


class MemorySpec(_Strict):
    budget: Annotated[int | str, AfterValidator(_check_budget)] = "75%"
    reserve: Size = "4GiB"

    def budget_bytes(self, physical_bytes: int) -> int:
        """The budget in bytes on a machine with `physical_bytes` of memory."""
        if isinstance(self.budget, str) and self.budget.strip().endswith("%"):
            return int(physical_bytes * float(self.budget.strip()[:-1]) / 100)
        return parse_size(self.budget)

    def reserve_bytes(self) -> int:
        return parse_size(self.reserve)


class EngineStart(_Strict):
    """How new workers start (docs/models-yaml.md): `auto` forks from a pre-imported template on
    Linux and uses waiting spare processes elsewhere; `cold` starts a fresh process every time."""

    mode: Literal["auto", "template", "spare", "cold"] = "auto"
    spares: int = Field(default=1, ge=1, le=4, description="Spare processes kept waiting (mode spare)")


class Defaults(_Strict):
    engine: EngineOptions = Field(default_factory=EngineOptions)


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="The OpenAI `model` id")
    source: str = Field(min_length=1, description="A local path or a model hub id")
    aliases: list[str] = Field(default_factory=list)
    state: DesiredModelState = DesiredModelState.LOADED
    priority: int = 0
    pinned: bool = False
    idle_ttl: Duration | None = None
    engine: EngineOptions = Field(default_factory=EngineOptions)
    memory: Size | None = Field(default=None, description="Overrides the memory estimate")
    max_concurrency: int | None = Field(default=None, gt=0)

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if not _NAME_RE.match(alias):
                raise ValueError(f"alias {alias!r} must match {NAME_PATTERN}")
        if len(set(aliases)) != len(aliases):
            raise ValueError("aliases must not repeat")
        return aliases

    def idle_ttl_seconds(self) -> float | None:
        return None if self.idle_ttl is None else parse_duration(self.idle_ttl)

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)


class DesiredState(_Strict):
    """The whole of models.yaml, validated."""

    memory: MemorySpec = Field(default_factory=MemorySpec)
    defaults: Defaults = Field(default_factory=Defaults)
    engine_start: EngineStart = Field(default_factory=EngineStart)
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_are_unique(self) -> "DesiredState":
        seen: dict[str, str] = {}
        for index, model in enumerate(self.models):
            for key in [model.name, *model.aliases]:
                if key in seen:
                    raise ValueError(
                        f"models[{index}] ({model.name}): {key!r} is already used by {seen[key]}"
                    )
                seen[key] = f"model {model.name!r}" if key == model.name else f"an alias of {model.name!r}"
        return self

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def resolve(self, name_or_alias: str) -> ModelSpec | None:
        """The model an OpenAI `model` field names, by name or alias."""
        for model in self.models:
            if model.name == name_or_alias or name_or_alias in model.aliases:
                return model
        return None

    def effective_engine(self, model: ModelSpec) -> EngineOptions:
        return model.engine.merged_over(self.defaults.engine)


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of models.yaml."""
    return DesiredState.model_json_schema()
