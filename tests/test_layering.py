"""Imports run one way (docs/architecture.md): the engine is pure torch, models build on the engine and
never the reverse, no two server packages import each other, and the server needs nothing from the SDK.

Read from the source (every import statement, also those inside functions), not from sys.modules, so
an import that only runs on some path is caught too.
"""

from __future__ import annotations

import ast
import re
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
                module = ".".join([*base, node.module] if node.module else base)
            elif node.module:
                module = node.module
            else:
                continue
            if module == "convlens.server":  # `from convlens.server import errors`: the module named
                found.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                found.add(module)
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


# convlens.server's top level: the server's own modules and packages, nothing else (docs/architecture.md).
TOP_MODULES = {"__init__", "app", "config", "errors", "kserve_explainer", "launcher", "metrics"}
PACKAGES = {"compute", "datasets", "engine", "indexing", "models", "scheduler", "service", "transport"}


def test_the_server_package_holds_no_developer_tools() -> None:
    """convlens.server's top level holds the server's own modules and packages only: an allow-list, so a
    bench, a demo or any other tool added there fails here (developer tools belong in tools/)."""
    modules = {p.stem for p in SERVER.glob("*.py")}
    packages = {p.name for p in SERVER.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert "app" in modules and "engine" in packages, "the listing reached the package"
    assert modules == TOP_MODULES, (f"top-level modules not of the server (tools belong in tools/): "
                                    f"{sorted(modules - TOP_MODULES)}; missing: {sorted(TOP_MODULES - modules)}")
    assert packages == PACKAGES, (f"top-level packages not of the server: {sorted(packages - PACKAGES)}; "
                                  f"missing: {sorted(PACKAGES - packages)}")


# Registering a module hook anywhere but engine/hooks.py (whose forward_hooks undoes every hook on exit and
# refuses layers inside TorchScript code) would let a hook outlive its call on a shared replica.
HOOK_REGISTRATIONS = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                      "register_full_backward_pre_hook", "register_backward_hook", "register_module_forward_hook",
                      "register_module_forward_pre_hook", "register_module_full_backward_hook"}
HOOKS_HOME = SERVER / "engine" / "hooks.py"
TOOLS = SERVER.parents[2] / "tools"


def hook_registrations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.name}:{node.lineno} {node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in HOOK_REGISTRATIONS]


def test_every_module_hook_is_registered_in_engine_hooks() -> None:
    assert hook_registrations(HOOKS_HOME), "the walk sees engine/hooks.py's own registrations"
    elsewhere = [hit for path in [*SERVER.rglob("*.py"), *TOOLS.rglob("*.py")] if path != HOOKS_HOME
                 for hit in hook_registrations(path)]
    assert not elsewhere, f"hooks registered outside engine/hooks.py (use forward_hooks): {elsewhere}"


# ---------------------------------------------------------------- the documented table

ARCHITECTURE = SERVER.parents[2] / "docs" / "architecture.md"


def documented_imports() -> dict[str, set[str]]:
    """{part: the server parts its row's "may import" column names}, read off docs/architecture.md's table
    (rows whose first cell is `package/` or `module.py`; backticked names in the last cell)."""
    parts = PACKAGES | TOP_MODULES
    table: dict[str, set[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"`[a-z_]+(/|\.py)`", cells[0]):
            continue
        name = cells[0].strip("`").removesuffix("/").removesuffix(".py")
        named = {n.removesuffix("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", cells[-1])}
        table[name] = named & parts
    return table


def test_the_documented_table_covers_every_part() -> None:
    table = documented_imports()
    assert table["engine"] == {"errors"}, "the parser reads the engine's row"
    assert set(table) == (PACKAGES | TOP_MODULES) - {"__init__"}, \
        f"docs/architecture.md's table rows differ from the server's parts: {sorted(table)}"


def test_every_import_is_one_the_table_allows() -> None:
    """Each server part imports only the parts its row in docs/architecture.md says it may (a new edge is
    documented there first, or it fails here)."""
    table = documented_imports()
    graph = imports_by_part()
    assert "compute" in graph["scheduler"], "the walk sees scheduler/steps.py's compute import"
    bad = {f"{part} -> {other}": sorted(map(str, files)) for part, imported in graph.items() if part in table
           for other, files in imported.items() if other in table and other not in table[part]}
    assert not bad, f"imports docs/architecture.md does not allow: {bad}"
