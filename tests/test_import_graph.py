"""The package's import graph, read from the source with ``ast``: no cycle, kernels tied visibly to the model,
the command line on top of the library layer. ``python tests/test_import_graph.py`` prints the graph."""
import ast
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"clarity_fast": ROOT / "clarity_fast", "clarity_fast.kernels": ROOT / "kernels"}


def _modules() -> Dict[str, Path]:
    return {(pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"): f
            for pkg, folder in FOLDERS.items() for f in sorted(folder.glob("*.py"))}


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package modules it imports (at any depth in the file: lazy imports count too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                for alias in node.names:  # `from . import kernels` names a module
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: Dict[str, Set[str]]):
    state, found = {}, []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle():
    graph = {k: v - {"clarity_fast"} for k, v in import_graph().items()}  # the package __init__ re-exports
    assert _cycles(graph) == []


def test_kernels_are_imported_visibly_by_the_model_layers():
    graph = import_graph()
    for model_module in ("clarity_fast.layers", "clarity_fast.clarity"):
        assert any(d.startswith("clarity_fast.kernels") for d in graph[model_module]), model_module
    kernel_deps = {d for k, deps in graph.items() if k.startswith("clarity_fast.kernels") for d in deps}
    assert {d for d in kernel_deps if not d.startswith("clarity_fast.kernels")} == {"clarity_fast.errors"}


def test_cli_sits_on_the_library_layer():
    graph = import_graph()
    assert graph["clarity_fast.cli"] <= {"clarity_fast.experiment", "clarity_fast.ablation", "clarity_fast.errors",
                                         "clarity_fast.training", "clarity_fast.predict", "clarity_fast.nih",
                                         "clarity_fast.phantom", "clarity_fast.viz"}
    assert "clarity_fast.cli" not in set().union(*(v for k, v in graph.items() if k != "clarity_fast.__main__"))
    assert "clarity_fast.phantom" not in graph["clarity_fast.nih"]  # real data never imports the phantom


if __name__ == "__main__":
    for module, deps in sorted(import_graph().items()):
        print(f"{module:36} -> {', '.join(sorted(d.replace('clarity_fast.', '') for d in deps)) or '-'}")
