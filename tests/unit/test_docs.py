"""The documents say what the code does: the contract table, the packages, no dead references."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from harness.durability.contract import contract_table

ROOT = Path(__file__).parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@pytest.mark.parametrize("doc", ["docs/architecture.md", "scenarios/README.md"])
def test_docs_carry_the_contract_table_of_the_code(doc: str) -> None:
    assert contract_table() in (ROOT / doc).read_text(), (
        f"{doc}'s contract table differs from harness/durability/contract.py's contract_table()"
    )


def _layers() -> tuple[tuple[str, ...], ...]:
    spec = importlib.util.spec_from_file_location(
        "layers", Path(__file__).with_name("test_layers.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LAYERS  # type: ignore[no-any-return]


def test_architecture_names_every_package_of_the_layers() -> None:
    text = ARCHITECTURE.read_text()
    missing = [
        name
        for layer in _layers()
        for name in layer
        if name != "__init__" and not re.search(rf"\b{re.escape(name)}\b", text)
    ]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


def test_no_docstring_cites_a_file_that_is_not_in_the_repository() -> None:
    # The project's own documents (not outputs such as report.md, nor external specs).
    cited = re.compile(
        r"(?<![\w/])((?:docs/|scenarios/|images/)?(?:design|architecture|README)\.md)"
    )
    missing: list[str] = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for name in cited.findall(line):
                if not any((base / name).exists() for base in (ROOT, ROOT / "docs")):
                    missing.append(f"{path.relative_to(ROOT)}:{line_no}: {name}")
    assert not missing, "references to documents that do not exist:\n" + "\n".join(missing)
