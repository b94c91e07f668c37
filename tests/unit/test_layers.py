"""The import graph of the project's packages: layers only point down, and nothing forms a cycle.

Every ``import`` statement counts, those inside functions included, so a cycle cannot hide behind
a late import. Layers, lowest first: ``datamodules`` ← ``lightning_modules`` ← ``callbacks`` ←
``cir``; inside ``lightning_modules``: ``retrieval`` ← ``components`` ← ``backbones`` ← ``generation``
(calling chat models) ← ``construction`` (the dataset pipeline) ← ``core`` ← ``families`` ← the
package's re-exporting ``__init__``; a family never imports another family.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("datamodules", "lightning_modules", "callbacks", "cir")
INSIDE_MODEL_CODE = ("retrieval", "components", "backbones", "generation", "construction", "core", "families")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of a module."""
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, node.lineno, id(node) in nested))
    return out


def rank(name: str) -> tuple[int, int]:
    parts = name.split(".")
    top = PACKAGES.index(parts[0])
    if parts[0] != "lightning_modules":
        return top, 0
    if len(parts) == 1:
        return top, len(INSIDE_MODEL_CODE)  # the re-exporting package root sits above its families
    return top, INSIDE_MODEL_CODE.index(parts[1])


def family(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if parts[:2] == ["lightning_modules", "families"] and len(parts) > 2 else None


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    mods = modules()
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", set(mods))
            for name, path in mods.items()}


def find_cycles(edges: dict[str, list[str]]) -> list[str]:
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in edges.get(node, []):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            visit(start, [start])
    return cycles


def test_every_edge_points_down_and_no_project_import_hides_in_a_function() -> None:
    problems = []
    for source, edges in graph().items():
        for target, line, in_function in edges:
            where = f"{source}:{line} imports {target}"
            if rank(target) > rank(source):
                problems.append(f"{where}: upward, against the layers")
            if family(source) and family(target) and family(source) != family(target):
                problems.append(f"{where}: one family importing another")
            if in_function:
                problems.append(f"{where} inside a function: import it at the top of the module")
    assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycle() -> None:
    cycles = find_cycles({m: sorted({t for t, _, _ in out}) for m, out in graph().items()})
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_what_they_forbid() -> None:
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []
    assert rank("lightning_modules.core") > rank("datamodules.shards")
    assert rank("callbacks.stage_switch") > rank("lightning_modules.core.module")
    assert rank("lightning_modules.families.procir.dialogue") > rank("lightning_modules.backbones.qwen")
    assert rank("lightning_modules") > rank("lightning_modules.families.procir.model")
    assert family("lightning_modules.families.clip4cir.model") == "clip4cir"
    assert family("lightning_modules.core.module") is None


def test_relative_and_function_level_imports_are_resolved() -> None:
    code = "from .. import core\nfrom ..core.module import X\n\ndef f():\n    from datamodules import schema\n"
    known = {"lightning_modules", "lightning_modules.core", "lightning_modules.core.module", "datamodules",
             "datamodules.schema", "lightning_modules.families"}
    found = imports_of("lightning_modules.families.fake", code, False, known)
    assert found == [("lightning_modules.core", 1, False), ("lightning_modules.core.module", 2, False),
                     ("datamodules.schema", 5, True)]
