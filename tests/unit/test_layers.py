"""Imports point one way (docs/architecture.md, "Layers"): read from the source, never executed.

Every module of `harness/` belongs to a top-level package (or is a top-level
module) with a rank; a module may import its own package or anything of a
lower rank, never a peer or anything above. Imports inside functions count
too. A new package must be given its place here (and in the docs).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HARNESS = ROOT / "harness"

# Top to bottom; one rank may hold several peers that must not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("commands", "pytest_plugin"),
    ("pytest_scenarios",),  # scenario cells as pytest items; the plugin's, above the run
    ("storage_daemon",),  # an entry point of its own; `powercut serve` reuses its exports
    ("crash", "testing"),
    ("scenario", "report"),
    ("workloads",),
    ("vhost", "nbd", "vm"),
    ("guest",),
    ("explore",),  # the exploration engine: the block stack and durability only, no VM
    ("block",),
    ("durability",),
    ("control",),
    ("proc", "sockets", "hygiene", "jsonfile"),
    ("errors", "__init__"),
)
RANK = {name: len(LAYERS) - i for i, layer in enumerate(LAYERS) for name in layer}


def unit_of(path: Path) -> str:
    """The top-level package or module a file belongs to (`__init__` for harness itself)."""
    parts = path.relative_to(HARNESS).with_suffix("").parts
    return parts[0]


def imported_units(tree: ast.AST, module: str) -> list[tuple[int, str, str]]:
    """(line, dotted name, unit) for every harness import in a module's tree."""
    found: list[tuple[int, str, str]] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # `from harness import x` names the unit x when x is a submodule.
            names = [f"harness.{a.name}" for a in node.names] if base == "harness" else [base]
        for name in names:
            parts = name.split(".")
            if parts[0] != "harness":
                continue
            unit = parts[1] if len(parts) > 1 else "__init__"
            # `from harness import __version__`: an attribute of the package itself.
            is_module = (HARNESS / unit).exists() or (HARNESS / f"{unit}.py").exists()
            if unit not in RANK and not is_module:
                unit = "__init__"
            found.append((node.lineno, name, unit))
    return found


def sources() -> list[Path]:
    return sorted(p for p in HARNESS.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_place_in_the_layers() -> None:
    units = {unit_of(p) for p in sources()}
    missing = sorted(units - set(RANK))
    assert not missing, f"give these a layer in tests/unit/test_layers.py and the docs: {missing}"


def test_imports_point_down_the_layers() -> None:
    wrong: list[str] = []
    for path in sources():
        unit = unit_of(path)
        module = ".".join(("harness", *path.relative_to(HARNESS).with_suffix("").parts))
        tree = ast.parse(path.read_text(), str(path))
        for line, name, target in imported_units(tree, module):
            if target == unit or target not in RANK or unit not in RANK:
                continue
            if RANK[target] >= RANK[unit]:
                how = "a peer of" if RANK[target] == RANK[unit] else "above"
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: imports {name}, but {target} is {how} "
                    f"{unit} (docs/architecture.md, Layers)"
                )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_packages_form_no_cycle() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for path in sources():
        unit = unit_of(path)
        module = ".".join(("harness", *path.relative_to(HARNESS).with_suffix("").parts))
        for line, name, target in imported_units(ast.parse(path.read_text()), module):
            if target != unit:
                edges[unit].add(target)
                where.setdefault((unit, target), f"{path.relative_to(ROOT)}:{line} ({name})")
    cycle = _find_cycle(edges)
    assert cycle is None, "packages import each other in a circle: " + " -> ".join(
        f"{a} [{where[(a, b)]}]" for a, b in zip(cycle or [], (cycle or [])[1:], strict=False)
    )


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


# -- the checker itself must be able to fail ------------------------------------------


def test_a_backwards_import_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    tree = ast.parse("import os\nfrom harness.crash.session import CrashSession\n")
    found = imported_units(tree, "harness.block.node")
    assert found == [(2, "harness.crash.session", "crash")]
    assert RANK["crash"] > RANK["block"]


def test_relative_and_package_imports_resolve_to_their_unit() -> None:
    tree = ast.parse(
        "from . import node\nfrom ..durability import oracle\nfrom harness import errors\n"
    )
    units = [u for _line, _name, u in imported_units(tree, "harness.block.backend")]
    assert units == ["block", "durability", "errors"]


@pytest.mark.parametrize(
    ("edges", "cyclic"),
    [
        ({"a": {"b"}, "b": {"c"}}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ],
)
def test_cycle_finder(edges: dict[str, set[str]], cyclic: bool) -> None:
    assert (_find_cycle(edges) is not None) is cyclic
