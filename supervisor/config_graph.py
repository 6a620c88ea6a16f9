"""The rules of ``units/*.toml`` that span units (contract section 4): one unit per
``port``, ``depends_on`` names that exist, and no dependency cycle. Each problem is
reported once, on the unit that declares it (:mod:`supervisor.config` collects them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from supervisor.config_values import IssueSink
from supervisor.spec import ServiceSpec

__all__ = ["check_dependencies", "check_ports"]


def check_ports(services: Mapping[str, ServiceSpec], sinks: Mapping[str, IssueSink]) -> None:
    """Two units with one ``port``: an issue on each, naming all of them (issue 9, item 11)."""
    users: dict[int, list[str]] = {}
    for name, spec in services.items():
        if spec.port is not None:
            users.setdefault(spec.port.number, []).append(name)
    for number, names in users.items():
        if len(names) > 1:
            listed = ", ".join(sorted(names))
            for name in names:
                sinks[name].add(("port",), f"port {number} is set by {len(names)} units "
                                f"({listed}); give each unit its own port")  # fmt: skip


def check_dependencies(graph: Mapping[str, tuple[IssueSink, Mapping[str, object]]]) -> None:
    """Unknown names and cycles, each reported once against the unit that declares it."""
    for sink, deps in graph.values():
        for dep in deps:
            if dep not in graph:
                import difflib  # only for a mistake's message

                close = difflib.get_close_matches(dep, list(graph), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                sink.add(("depends_on",), f'unknown service "{dep}"{hint}')
    seen: set[frozenset[str]] = set()
    for cycle in _cycles({n: [d for d in deps if d in graph] for n, (_, deps) in graph.items()}):
        if frozenset(cycle) in seen:
            continue
        seen.add(frozenset(cycle))
        start = cycle.index(min(cycle))
        ordered = cycle[start:] + cycle[:start]
        graph[ordered[0]][0].add(
            ("depends_on",), "dependency cycle: " + " -> ".join([*ordered, ordered[0]])
        )


def _cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search, in sorted order (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in state:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        path, state[root] = [root], 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                found.append(path[path.index(child) :])
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges[child]))))
    return found
