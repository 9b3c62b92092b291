"""The library's layering, read from the source: imports point one way, and the orchestrator stays out.

Every import that runs counts, top-level and inside functions alike: a lazy import still ties two modules
together. Imports under `if TYPE_CHECKING:` never run and serve annotations only, so they are left out.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaptflow"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree`, except the bodies of `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING"):
            for child in node.orelse:
                yield child
                yield from _runtime_nodes(child)
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in `module`, relative ones resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from adaptflow import storage` imports the module adaptflow.store.storage, not a name
                found.append(
                    (submodule, None, node.lineno) if submodule in MODULES else (base, alias.name, node.lineno)
                )
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in _imports(m) if target in MODULES and target != m} for m in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a closed path [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    assert {"adaptflow.config", "adaptflow.extract.backbones", "adaptflow.adapt.algorithms"} <= MODULES.keys()
    assert "adaptflow.errors" in _graph()["adaptflow.config"]  # a top-level import
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    assert [n.names[0].name for n in _runtime_nodes(tree) if isinstance(n, ast.Import)] == ["b"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    assert [n.names[0].name for n in _runtime_nodes(tree) if isinstance(n, ast.Import)] == ["b"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert [_stage(m) for m in ("adaptflow.adapt.inference", "adaptflow.adapt", "adaptflow.config")] == [
        "adapt",
        "adapt",
        None,
    ]


def test_the_import_graph_has_no_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_library_never_imports_prefect(module):
    hits = [f"line {line}: {target}" for target, _, line in _imports(module) if target.split(".")[0] == "prefect"]
    assert not hits, f"{module} imports prefect ({', '.join(hits)}); orchestration belongs in tasks/ and flows/"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_a_module(module):
    hits = [
        f"line {line}: {name} from {target}"
        for target, name, line in _imports(module)
        if name and name.startswith("_") and target in MODULES and target != module
    ]
    assert not hits, f"{module} imports private names ({', '.join(hits)}); make them public where they live"


# One room per stage: the package's top level is its edge, everything else lives in a stage's folder.
EDGE = {
    "adaptflow",
    "adaptflow.config",
    "adaptflow.errors",
    "adaptflow.manifests",
    "adaptflow.names",
    "adaptflow.progress",
    "adaptflow.seeding",
    "adaptflow.state",
}
# The stage folders, lowest first: a stage imports only stages before it (and the edge).
STAGE_ORDER = ["store", "data", "models", "extract", "adapt", "evaluate", "serve", "monitor", "report", "label"]
STAGES = set(STAGE_ORDER)


def test_every_module_lives_at_the_edge_or_in_a_stage():
    stray = [m for m in MODULES if m not in EDGE and m.split(".")[1] not in STAGES]
    assert not stray, f"modules outside the edge and the stage folders: {stray}"


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_stage_folders_import_downwards_only():
    """models/ stores and loads, adapt/ builds and runs: one direction between the folders, so that a
    stage can be read with only the ones below it in mind."""
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    up = [
        f"{m} (line {line}) imports {t}"
        for m in MODULES
        for t, _, line in _imports(m)
        if t in MODULES and (a := _stage(m)) and (b := _stage(t)) and rank[b] > rank[a]
    ]
    assert not up, "stage folders import upwards: " + "; ".join(up)


def test_config_imports_no_stage():
    """The config holds types and ranges; the stages resolve names (`adaptflow.names` checks them), so
    every stage may read the config without it reading them back."""
    staged = [f"line {line}: {t}" for t, _, line in _imports("adaptflow.config") if _stage(t)]
    assert not staged, f"adaptflow.config imports stage modules ({', '.join(staged)})"


def test_no_source_file_is_over_500_lines():
    roots = [PACKAGE.parent / d for d in ("adaptflow", "tasks", "flows", "cli")]
    long = {str(p): n for r in roots for p in r.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"over 500 lines, split them along their seams: {long}"


def _returned_names(annotation: ast.expr | None) -> set[str]:
    """The class names a task's return annotation mentions (`list[X]`, `X | None`)."""
    if annotation is None:
        return set()
    return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name) and n.id[:1].isupper()}


def test_every_record_a_task_returns_is_a_manifest():
    import adaptflow.manifests as manifests
    import adaptflow.report.records as records

    for path in sorted((PACKAGE.parent / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_task = isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and ast.unparse(d.func) == "task" for d in node.decorator_list
            )
            for name in _returned_names(node.returns) - {"None"} if is_task else ():
                record = getattr(manifests, name, None) or getattr(records, name, None)
                assert isinstance(record, type) and issubclass(record, manifests.Manifest), (
                    f"{path.name}: {node.name} returns {name}, not a manifest of adaptflow.manifests or "
                    "adaptflow.report.records"
                )
