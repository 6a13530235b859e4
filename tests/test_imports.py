"""Import arrows between llmctl's modules run one way (issue #25): no circles; the config's
rooms import only the schema; the data modules and prepare import nothing above them; only the
export stage imports the exporters; loading a model (modeling, quantize) reaches no stage,
exporter or server module."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llmctl"
# Circles known elsewhere, left to their owners (remove one here once it is gone).
KNOWN: list[set[str]] = []


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


def _reach(graph: dict[str, set[str]], m: str) -> set[str]:
    """Every llmctl module that importing `m` can import, directly or through others."""
    out: set[str] = set()
    todo = list(graph[m])
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(graph.get(n, ()))
    return out


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one module."""
    reach = {m: _reach(graph, m) for m in graph}
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
    # tokenizer (one BOS rule: wants_bos, with_bos) sits below the data modules: it imports only errors
    assert graph["llmctl.tokenizer"] <= {"llmctl.errors"}
    for name in [m for m in graph if m.startswith("llmctl.data")]:
        assert graph[name] <= {"llmctl.errors", "llmctl.detectors", "llmctl.tokenizer"} | {m for m in graph if m.startswith("llmctl.data")}, name
    assert not {m for m in graph["llmctl.stages.prepare"] if m.startswith(("llmctl.stages.", "llmctl.server", "llmctl.exporters"))}


def _is_in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_only_the_export_stage_imports_the_exporters():
    graph = _graph()
    for name, deps in graph.items():
        if name == "llmctl.stages.export" or _is_in(name, "llmctl.exporters"):
            continue
        assert not {d for d in deps if _is_in(d, "llmctl.exporters")}, name


def test_loading_a_model_reaches_no_stage_exporter_or_server():
    graph = _graph()
    for name in ("llmctl.modeling", "llmctl.quantize"):
        above = {d for d in _reach(graph, name) if _is_in(d, "llmctl.stages", "llmctl.exporters", "llmctl.server")}
        assert not above, f"{name} reaches {sorted(above)}"
