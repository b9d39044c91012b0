"""Engine options in models.yaml -> the vllm-mlx `serve` command line."""

from __future__ import annotations

from opta_lmx.state.serve_flags import OWNED_FLAGS
from opta_lmx.state.spec import EngineOptions

# Options whose vllm-mlx flag is not simply `--name-with-dashes VALUE`.
_SPECIAL = {"enable_prefix_cache", "tool_call_parser", "enable_auto_tool_choice", "extra_args"}


def serve_args(options: EngineOptions) -> list[str]:
    """The flags for `vllm-mlx serve` that express these options (unset ones omitted)."""
    args: list[str] = []
    values = options.model_dump(exclude_none=True)
    for name, value in values.items():
        if name in _SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        elif isinstance(value, list):
            continue
        else:
            args += [flag, str(value)]
    if options.enable_prefix_cache is True:
        args.append("--enable-prefix-cache")
    elif options.enable_prefix_cache is False:
        args.append("--disable-prefix-cache")
    if options.tool_call_parser:
        args += ["--tool-call-parser", options.tool_call_parser]
        if options.enable_auto_tool_choice is not False:
            args.append("--enable-auto-tool-choice")
    for arg in options.extra_args:  # validation refuses these; a record from elsewhere may not have been
        if arg.split("=", 1)[0] in OWNED_FLAGS:
            raise ValueError(f"{arg.split('=', 1)[0]} is set by the control plane, not by engine options")
    args += list(options.extra_args)
    return args
