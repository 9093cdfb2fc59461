"""The shape of the house: imports point one way, commands stay in the command layer, every module is
in ARCHITECTURE.md and none grows past 600 lines.

Read from the source with ``ast`` (nothing is imported), so a circle hidden behind a function-level
import is found even though Python would tolerate it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ctrltok"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_command_layer(name: str) -> bool:
    return name == "ctrltok.__main__" or name == "ctrltok.cli" or name.startswith("ctrltok.cli.")


def _targets(node: ast.AST, module: str) -> list[str]:
    """The ctrltok modules an import statement loads (``from ctrltok.a import b`` loads ``ctrltok.a.b``
    when ``b`` is a module)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = module.split(".")[: len(module.split(".")) - node.level + (1 if MODULES[module].name == "__init__.py" else 0)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({n for n in names if n == "ctrltok" or n.startswith("ctrltok.")})


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(ctrltok modules imported at module level, [(line, module)] imported inside functions)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module):
                    (nested.append((child.lineno, target)) if in_function else top.add(target))
            visit(child, inside)

    visit(tree, False)
    return top, nested


# Every import, the command layer's function-level ones included: a circle through a lazy import is
# still a circle (each side needs the other loaded first), only deferred to the first call.
GRAPH = {m: (top | {t for _, t in nested}) - {m} for m in MODULES for top, nested in [_imports(m)]}


def test_no_function_level_imports_of_ctrltok_outside_the_command_layer():
    found = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
             for m in MODULES if not _is_command_layer(m) for line, target in _imports(m)[1]]
    assert not found, "import these at the top of the module (or move the code to ctrltok.cli):\n" + "\n".join(found)


def test_nothing_in_the_library_imports_the_command_layer():
    found = [f"{m} imports {t}" for m, ts in GRAPH.items() if not _is_command_layer(m)
             for t in ts if _is_command_layer(t)]
    assert not found, "\n".join(found)


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in MODULES:
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := dfs(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_imports_have_no_circle():
    circle = _cycle()
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_structure_check_sees_a_circle(monkeypatch):
    """The circle finder is not vacuous: a planted reverse edge is reported."""
    monkeypatch.setitem(GRAPH, "ctrltok.core.example", GRAPH["ctrltok.core.example"] | {"ctrltok.training.train"})
    assert _cycle() is not None


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_module_is_at_most_600_lines(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {n} lines; split it by concept"


def test_architecture_names_every_module():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(PACKAGE)) for m, p in MODULES.items()
               if p.name != "__init__.py" and str(p.relative_to(PACKAGE)) not in text]
    assert not missing, f"ARCHITECTURE.md does not name {missing}"
