"""The shape of the code: imports go one way (no cycle among src's modules, counting the
imports made inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that ``path`` imports anywhere (type-checking blocks included:
    a cycle there is one too, for the reader)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != "flexmoe"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_in_src() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# Modules that define a file format: they read, check and write it, and build no model.
FORMAT_MODULES = ("flexmoe.expert.manifest", "flexmoe.expert.package", "flexmoe.merge.slots")
MODEL_BUILDERS = {"flexmoe.model.checkpoint", "flexmoe.model.moe", "flexmoe.expert.specialist"}


def test_a_file_format_module_builds_no_model() -> None:
    modules = _modules()
    for name in FORMAT_MODULES:
        tree = ast.parse(modules[name].read_text(encoding="utf-8"))
        imported = _imports(modules[name], modules)
        assert not imported & MODEL_BUILDERS, f"{name} imports {imported & MODEL_BUILDERS}"
        classes = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "transformers"
            for alias in node.names
        }
        assert not {c for c in classes if c.endswith("ForCausalLM")}, name


def test_no_function_in_the_library_is_longer_than_60_lines() -> None:
    """Counted from the first line of the body (the docstring) to the last."""
    long = [
        f"{path.relative_to(SRC)}:{node.name} ({node.end_lineno - node.body[0].lineno + 1})"
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if (node.end_lineno or 0) - node.body[0].lineno + 1 > 60
    ]
    assert long == []


def test_no_public_signature_in_the_library_takes_or_returns_dict_str_any() -> None:
    """A public function's or method's parameters and return say their types (a model, a
    TypedDict, ``Mapping[str, object]`` for JSON read in), never ``dict[str, Any]``."""
    found = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name}"
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if not node.name.startswith("_")
        for annotation in [
            *(a.annotation for a in [*node.args.args, *node.args.kwonlyargs]),
            node.returns,
        ]
        if annotation is not None and "dict[str, Any]" in ast.unparse(annotation)
    ]
    assert found == []
