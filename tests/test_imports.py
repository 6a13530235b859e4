"""Import arrows between llmctl's modules run one way (issue #25): no circles through the
config, the data modules or prepare, and the config's rooms import only the schema."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llmctl"
# Circles known elsewhere, left to their owners (remove one here once it is gone).
KNOWN = [{"llmctl.hints", "llmctl.rundir"}]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the llmctl modules it imports, at the top or inside a function."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        out = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] or [node.module]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t.startswith("llmctl") and t != name:
                    out.add(t)
        graph[name] = out
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one module."""
    reach = {m: set() for m in graph}
    for m in graph:
        todo = list(graph[m])
        while todo:
            n = todo.pop()
            if n not in reach[m]:
                reach[m].add(n)
                todo.extend(graph.get(n, ()))
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return [set(g) for g in groups]


def test_no_new_import_circles():
    new = [sorted(c) for c in _circles(_graph()) if c not in KNOWN]
    assert not new, f"import circles: {new}"


def test_config_rooms_import_only_the_schema():
    graph = _graph()
    for room in ("loading", "staleness", "reference", "schema"):
        assert graph[f"llmctl.config.{room}"] <= {"llmctl.config.schema", "llmctl.errors"}, room
    assert graph["llmctl.config"] == {f"llmctl.config.{r}" for r in ("loading", "staleness", "reference", "schema")}


def test_data_and_prepare_import_nothing_above_them():
    graph = _graph()
    for name in [m for m in graph if m.startswith("llmctl.data")]:
        assert graph[name] <= {"llmctl.errors", "llmctl.detectors"} | {m for m in graph if m.startswith("llmctl.data")}, name
    assert not {m for m in graph["llmctl.stages.prepare"] if m.startswith(("llmctl.stages.", "llmctl.server", "llmctl.exporters"))}
