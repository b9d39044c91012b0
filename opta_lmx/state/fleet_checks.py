"""What the fleet part of models.yaml cannot mean (docs/fleet.md), each with its field path so the
file's line and column can be named: a host listed twice, a model naming a host the fleet does not
have, a distributed model whose host has no address for MLX's ring backend."""

from __future__ import annotations

from opta_lmx.state.spec import DesiredState

Problem = tuple[tuple[str | int, ...], str]


def fleet_problems(state: DesiredState) -> list[Problem]:
    """What the fleet part cannot mean, each with its field path: a host listed twice, a model
    naming a host the fleet does not have (or naming one twice)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for index, host in enumerate(state.fleet.hosts):
        if host.name in seen:
            problems.append((("fleet", "hosts", index, "name"), f"host {host.name!r} is listed twice"))
        seen.add(host.name)
    for index, model in enumerate(state.models):
        named: set[str] = set()
        lists: list[tuple[tuple[str | int, ...], str]] = [
            (("models", index, "hosts", p), h) for p, h in enumerate(model.hosts)]
        if model.distributed is not None:
            named_ranks: set[str] = set()
            if model.hosts:
                problems.append((("models", index, "hosts"), f"{model.name}: a distributed model runs on its "
                                 "ranks' hosts (distributed.hosts); remove `hosts`"))
            for position, host_name in enumerate(model.distributed.hosts):
                where: tuple[str | int, ...] = ("models", index, "distributed", "hosts", position)
                rank_host = state.fleet.host(host_name)
                if host_name in named_ranks:
                    problems.append((where, f"{model.name}: host {host_name!r} is listed twice"))
                elif rank_host is None:
                    problems.append((where, f"{model.name}: unknown host {host_name!r}"))
                elif rank_host.ring_ip() is None:
                    problems.append((where, f"{model.name}: host {host_name!r} needs `ip` (its url names no "
                                     "address), which MLX's ring backend connects to"))
                named_ranks.add(host_name)
        for where, host_name in lists:
            if host_name in named:
                problems.append((where, f"{model.name}: host {host_name!r} is listed twice"))
            elif host_name not in seen:
                known = ", ".join(sorted(seen)) or "none: add `fleet.hosts`"
                problems.append((where, f"{model.name}: unknown host {host_name!r} (the fleet's hosts: {known})"))
            named.add(host_name)
    return problems
