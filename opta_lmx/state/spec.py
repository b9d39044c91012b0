"""The desired state: what models.yaml says should be running.

Pure data. The same schema validates the file loader and every admin write, and is
published as JSON Schema (`lmx schema`). Validation is total: every number is bounded,
every string is free of control characters, and any exception inside a validator is
reported as a validation error on its field, never raised past it.
"""

from __future__ import annotations

import enum
import functools
import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from opta_lmx.state.quantities import MAX_SECONDS, parse_duration, parse_size
from opta_lmx.state.serve_flags import check_extra_args

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # used with fullmatch: no "ok\n"
MAX_INT = 2**31 - 1  # counts of tokens, sequences, megabytes: vllm-mlx reads them as ints
MAX_SOURCE_CHARS = 4096
MAX_ENGINE_STRING = 1024
MAX_EXTRA_ARGS = 256


def total(check):
    """A validator whose every failure is a ValueError, so pydantic reports it on the field."""

    @functools.wraps(check)
    def wrapper(value):
        try:
            return check(value)
        except ValueError:
            raise
        except Exception as error:  # OverflowError, TypeError, RecursionError...: still a field error
            raise ValueError(f"invalid value ({type(error).__name__}: {error})") from None

    return wrapper


def refuse_control_characters(text: str, what: str) -> str:
    """Control characters (NUL, newlines, escapes) have no business in names, paths or flags."""
    for char in text:
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"{what} must not contain control characters (found {char!r})")
    return text


@total
def _check_size(value: Any) -> int | str:
    """Before the int | str union: one error on the field, not one per branch of the union."""
    size = parse_size(value)
    return size if isinstance(value, float) else value


@total
def _check_duration(value: Any) -> int | float | str:
    parse_duration(value)
    return value


@total
def _check_budget(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().endswith("%"):
        text = value.strip()[:-1]
        if len(text) > 24:
            raise ValueError("a percentage budget must be between 0% and 100%")
        number = float(text)
        if not 0 < number <= 100:  # also refuses nan
            raise ValueError("a percentage budget must be between 0% and 100%")
        return value
    return _check_size(value)


@total
def _check_source(value: str) -> str:
    if len(value) > MAX_SOURCE_CHARS:
        raise ValueError(f"a source is at most {MAX_SOURCE_CHARS} characters")
    if not value.strip():
        raise ValueError("a source must name a local path or a model hub id")
    return refuse_control_characters(value, "a source")


@total
def _check_engine_string(value: str | None) -> str | None:
    if value is None:
        return value
    if len(value) > MAX_ENGINE_STRING:
        raise ValueError(f"at most {MAX_ENGINE_STRING} characters")
    return refuse_control_characters(value, "an engine option")


Size = Annotated[int | str, BeforeValidator(_check_size)]
Duration = Annotated[int | float | str, BeforeValidator(_check_duration)]
Count = Annotated[int, Field(gt=0, le=MAX_INT)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
EngineString = Annotated[str | None, AfterValidator(_check_engine_string)]


class DesiredModelState(str, enum.Enum):
    LOADED = "loaded"
    UNLOADED = "unloaded"
    ON_DEMAND = "on-demand"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EngineOptions(_Strict):
    """vllm-mlx `serve` options under their own names, in snake_case.

    Unset fields are left to vllm-mlx's own defaults; `extra_args` passes anything
    else through verbatim for options this schema does not name yet, once vllm-mlx's
    own parser accepts them. Flags the control plane owns (OWNED_FLAGS) are never options.
    """

    continuous_batching: bool | None = None
    max_num_seqs: Count | None = None
    prefill_batch_size: Count | None = None
    completion_batch_size: Count | None = None
    max_tokens: Count | None = None
    max_request_tokens: Count | None = None
    max_kv_size: Count | None = None
    stream_interval: Count | None = None
    chunked_prefill_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)
    enable_prefix_cache: bool | None = None
    cache_memory_mb: Count | None = None
    kv_cache_quantization: bool | None = None
    tool_call_parser: EngineString = None
    enable_auto_tool_choice: bool | None = None
    reasoning_parser: EngineString = None
    trust_remote_code: bool | None = None
    timeout: Seconds | None = None
    default_temperature: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    default_top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    extra_args: list[str] = Field(default_factory=list, max_length=MAX_EXTRA_ARGS)

    @field_validator("extra_args")
    @classmethod
    def _extra_args_are_serve_flags(cls, extra_args: list[str]) -> list[str]:
        for arg in extra_args:
            _check_engine_string(arg)
        total(check_extra_args)(extra_args)
        return extra_args

    def merged_over(self, base: "EngineOptions") -> "EngineOptions":
        """These options with every unset field taken from `base` (the defaults)."""
        mine = self.model_dump(exclude_unset=True, exclude_none=True)
        merged = base.model_dump(exclude_unset=True, exclude_none=True)
        merged.update(mine)
        return EngineOptions(**merged)


class MemorySpec(_Strict):
    budget: Annotated[int | str, BeforeValidator(_check_budget)] = "75%"
    reserve: Size = "4GiB"

    def budget_bytes(self, physical_bytes: int) -> int:
        """The budget in bytes on a machine with `physical_bytes` of memory."""
        if isinstance(self.budget, str) and self.budget.strip().endswith("%"):
            return int(physical_bytes * float(self.budget.strip()[:-1]) / 100)
        return parse_size(self.budget)

    def reserve_bytes(self) -> int:
        return parse_size(self.reserve)


def _bounded_duration(low: float, high: float):
    """A duration between `low` and `high` seconds (both inclusive)."""

    def check(value: int | float | str) -> int | float | str:
        seconds = parse_duration(value)
        if not low <= seconds <= high:
            raise ValueError(f"must be between {low:g}s and {high:g}s, got {seconds:g}s")
        return value

    return AfterValidator(check)


class DemandPolicy(_Strict):
    """How requests (demand) may swap on-demand models; unset fields come from `defaults.demand`.

    `may_evict`: a request for this model may evict resident on-demand models of no higher
    priority. `min_residency`: once Ready, this model is not evicted by demand for this long.
    `serve_queue`: while this model has requests in flight, it keeps serving them this long
    after another model asked for its memory (and after its min_residency) before it is swapped.
    """

    may_evict: bool | None = None
    min_residency: Annotated[int | float | str | None, _bounded_duration(0, 3600)] = None
    serve_queue: Annotated[int | float | str | None, _bounded_duration(0, 600)] = None

    def merged_over(self, base: "DemandPolicy") -> "DemandPolicy":
        merged = base.model_dump(exclude_none=True)
        merged.update(self.model_dump(exclude_none=True))
        return DemandPolicy(**merged)

    def may_evict_or_default(self) -> bool:
        return True if self.may_evict is None else self.may_evict

    def min_residency_seconds(self) -> float:
        return 10.0 if self.min_residency is None else parse_duration(self.min_residency)

    def serve_queue_seconds(self) -> float:
        return 5.0 if self.serve_queue is None else parse_duration(self.serve_queue)


class EngineStart(_Strict):
    """How new workers start (docs/models-yaml.md): `auto` forks from a pre-imported template on
    Linux and uses waiting spare processes elsewhere; `cold` starts a fresh process every time."""

    mode: Literal["auto", "template", "spare", "cold"] = "auto"
    spares: int = Field(default=1, ge=1, le=4, description="Spare processes kept waiting (mode spare)")


class PrefixCaches(_Strict):
    """Kept prefix caches (docs/reconciler.md, "Kept prefix caches"): a model's prefix cache outlives
    its worker, in the state directory, bounded on disk."""

    enabled: bool = True
    per_model: Size = Field(default="8GiB", description="Disk a model's kept cache may use")
    total: Size = Field(default="32GiB", description="Disk all kept caches may use together")
    save_timeout: Annotated[int | float | str, _bounded_duration(0, 120)] = Field(
        default="30s", description="How long an unloaded worker may take to save its cache")

    def per_model_bytes(self) -> int:
        return parse_size(self.per_model)

    def total_bytes(self) -> int:
        return parse_size(self.total)

    def save_timeout_seconds(self) -> float:
        return parse_duration(self.save_timeout)


class ModelPrefixCache(_Strict):
    """One model's kept prefix cache: whether it has one, and prompts to warm it with at start."""

    enabled: bool | None = Field(default=None, description="Unset: as `prefix_caches.enabled`")
    warm_prompts: Annotated[str, AfterValidator(_check_source)] | None = Field(
        default=None, description="A JSON file of prompts vllm-mlx runs at start (relative to models.yaml)")


@total
def _check_host_url(value: str) -> str:
    refuse_control_characters(value, "a host url")
    if len(value) > 2048:
        raise ValueError("a host url is at most 2048 characters")
    if not re.fullmatch(r"https?://[^\s/?#@]+(:\d{1,5})?/?", value):
        raise ValueError(f"a host url is http(s)://HOST[:PORT] (no path, no user), got {value!r}")
    return value.rstrip("/")


class FleetHost(_Strict):
    """One Mac of the fleet: its name (what `lmx serve --fleet-host` says), where its server
    answers, and optionally its own memory budget (instead of `memory.budget`)."""

    name: str = Field(pattern=NAME_PATTERN)
    url: Annotated[str, AfterValidator(_check_host_url)] = Field(description="http(s)://HOST:PORT of its lmx serve")
    budget: Annotated[int | str | None, BeforeValidator(lambda v: v if v is None else _check_budget(v))] = None
    ip: str | None = Field(default=None, description="The address MLX's ring backend uses (default: the url's, "
                                                       "if it is an IP address)")
    ssh: str | None = Field(default=None, description="How mlx.launch reaches it (default: the url's host name)")

    @field_validator("ip")
    @classmethod
    def _ip_is_an_address(cls, ip: str | None) -> str | None:
        import ipaddress
        if ip is not None:
            ipaddress.ip_address(ip)  # ValueError: reported on the field
        return ip

    @field_validator("ssh")
    @classmethod
    def _ssh_is_a_name(cls, ssh: str | None) -> str | None:
        if ssh is not None and not re.fullmatch(r"[A-Za-z0-9._@-]{1,253}", ssh):
            raise ValueError(f"ssh must be a host name (optionally user@host), got {ssh!r}")
        return ssh

    def hostname(self) -> str:
        return self.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")

    def ring_ip(self) -> str | None:
        """The address the ring backend connects to: `ip`, else the url's host if it is an address."""
        import ipaddress
        if self.ip:
            return self.ip
        try:
            return str(ipaddress.ip_address(self.hostname()))
        except ValueError:
            return None


class Distributed(_Strict):
    """One model across Macs (docs/fleet.md): MLX's own runtime (`mlx.launch`, ring backend)
    runs `mlx_lm.server` with one rank per host, rank 0 on the first, which serves requests."""

    hosts: list[str] = Field(min_length=2, max_length=16, description="Fleet hosts, one rank each, rank 0 first")
    split: Literal["tensor", "pipeline"] = Field(default="tensor", description="How the model is sharded")


class Fleet(_Strict):
    """The fleet's hosts (docs/fleet.md); absent: one host serves the whole file."""

    hosts: list[FleetHost] = Field(default_factory=list, max_length=64)
    grace: Annotated[int | float | str, _bounded_duration(1, 3600)] = Field(
        default="30s", description="How long a host may be unreachable before its models move")

    def host(self, name: str) -> FleetHost | None:
        return next((h for h in self.hosts if h.name == name), None)

    def grace_seconds(self) -> float:
        return parse_duration(self.grace)


class Defaults(_Strict):
    engine: EngineOptions = Field(default_factory=EngineOptions)
    demand: DemandPolicy = Field(default_factory=DemandPolicy)


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="The OpenAI `model` id")
    source: Annotated[str, AfterValidator(_check_source)] = Field(
        min_length=1, description="A local path or a model hub id")
    aliases: list[str] = Field(default_factory=list, max_length=64)
    state: DesiredModelState = DesiredModelState.LOADED
    priority: int = Field(default=0, ge=-MAX_INT, le=MAX_INT)
    pinned: bool = False
    idle_ttl: Duration | None = None
    engine: EngineOptions = Field(default_factory=EngineOptions)
    memory: Size | None = Field(default=None, description="Overrides the memory estimate")
    max_concurrency: Count | None = None
    demand: DemandPolicy = Field(default_factory=DemandPolicy, description="Demand swapping policy")
    prefix_cache: ModelPrefixCache = Field(default_factory=ModelPrefixCache, description="Its kept prefix cache")
    hosts: list[str] = Field(default_factory=list, max_length=64,
                             description="Fleet hosts it may run on, in order of preference (none: every host)")
    distributed: Distributed | None = Field(default=None, description="Run across several hosts (mlx.launch)")

    @field_validator("name")
    @classmethod
    def _name_is_whole(cls, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"name {name!r} must match {NAME_PATTERN}")
        return name

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if not _NAME_RE.fullmatch(alias):
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
    prefix_caches: PrefixCaches = Field(default_factory=PrefixCaches)
    fleet: Fleet = Field(default_factory=Fleet)
    models: list[ModelSpec] = Field(default_factory=list, max_length=512)

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

    def keeps_cache(self, model: ModelSpec) -> bool:
        """Whether `model`'s prefix cache outlives its workers: kept caches are on (file-wide and
        for the model), and its engine has a prefix cache vllm-mlx saves (continuous batching)."""
        engine = self.effective_engine(model)
        wanted = model.prefix_cache.enabled if model.prefix_cache.enabled is not None else self.prefix_caches.enabled
        return bool(wanted and engine.continuous_batching and engine.enable_prefix_cache is not False)

    def effective_demand(self, model: ModelSpec) -> DemandPolicy:
        """The model's demand policy with unset fields taken from `defaults.demand`."""
        return model.demand.merged_over(self.defaults.demand)


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of models.yaml."""
    return DesiredState.model_json_schema()
