"""Imports run one way (docs/architecture.md): the engine is pure torch, models build on the engine and
never the reverse, no two server packages import each other, and the server needs nothing from the SDK.

Read from the source (every import statement, also those inside functions), not from sys.modules, so
an import that only runs on some path is caught too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server" / "convlens" / "server"


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = ["convlens", "server", *path.relative_to(SERVER).parent.parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def part_of(name: str) -> str | None:
    """The top-level piece of convlens.server a module belongs to ("engine", "models", ...)."""
    parts = name.split(".")
    return parts[2] if parts[:2] == ["convlens", "server"] and len(parts) > 2 else None


def imports_by_part() -> dict[str, dict[str, set[Path]]]:
    """{part: {imported part or foreign package: files}}, within convlens.server."""
    graph: dict[str, dict[str, set[Path]]] = defaultdict(lambda: defaultdict(set))
    for path in SERVER.rglob("*.py"):
        rel = path.relative_to(SERVER)
        me = rel.parts[0].removesuffix(".py")
        for name in imports_of(path):
            other = part_of(name)
            if other is None and name.startswith("convlens."):
                other = ".".join(name.split(".")[:2])  # convlens.client, convlens.v1, convlens.wire
            elif other is None:
                other = name.split(".")[0]  # torch, grpc, ...
            if other != me:
                graph[me][other].add(rel)
    return graph


def test_the_parser_sees_imports() -> None:
    """Guard against a vacuous pass: known imports are found."""
    graph = imports_by_part()
    assert "engine" in graph["models"], "models/catalog.py builds on the engine's tracer"
    assert "torch" in graph["engine"]


def test_the_engine_is_pure_torch() -> None:
    graph = imports_by_part()
    forbidden = {"models", "scheduler", "service", "transport", "compute", "app", "config", "grpc",
                 "convlens.v1", "convlens.client", "google"}
    bad = {part: sorted(map(str, graph["engine"][part])) for part in forbidden if part in graph["engine"]}
    assert not bad, f"engine/ imports layers above it: {bad}"


def test_no_two_server_packages_import_each_other() -> None:
    graph = imports_by_part()
    parts = set(graph)
    cycles = sorted({tuple(sorted((a, b))) for a in parts for b in graph[a] if b in parts and a in graph[b]})
    detail = {f"{a} <-> {b}": (sorted(map(str, graph[a][b])), sorted(map(str, graph[b][a]))) for a, b in cycles}
    assert not cycles, f"import cycles between server packages: {detail}"


def test_no_longer_import_cycles() -> None:
    graph = imports_by_part()
    parts = set(graph)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in parts:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(parts):
        if start not in state:
            cycle = visit(start)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_server_needs_nothing_from_the_sdk_or_the_tools() -> None:
    """The SDK is a client of the server, and the developer tools (tools/) are clients of both: none of
    the server's packages or modules imports them (no exemption: the benches and the demo live in tools/)."""
    graph = imports_by_part()
    assert "models" in graph and "transport" in graph, "the walk reached the server's packages"
    server_wide = {part: sorted(map(str, files[foreign])) for part, files in graph.items()
                   for foreign in ("convlens.client", "tools") if foreign in files}
    assert not server_wide, f"server code imports the SDK or the developer tools: {server_wide}"


def test_the_server_package_holds_no_developer_tools() -> None:
    """convlens.server's top level holds the server's own modules and packages only."""
    tooling = sorted(p.name for p in SERVER.glob("*.py") if p.stem.startswith(("bench", "demo")))
    assert not tooling, f"developer tools belong in tools/, not the served package: {tooling}"
