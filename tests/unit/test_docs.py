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


def test_the_readme_says_what_each_filesystem_gets_host_side(tmp_path: Path) -> None:
    """Journal recovery host-side is ext4's alone; the others' tools see the state before it."""
    from harness.explore.hostcheck import Ext4Checker, ReadOnlyChecker, checker_for

    text = (ROOT / "README.md").read_text()
    section = text.split("## Crash-state exploration", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(section.split())
    assert isinstance(checker_for("ext4", tmp_path), Ext4Checker)
    assert "`e2fsck -p -f`, which replays the journal" in flat
    for fstype in ("xfs", "btrfs", "f2fs"):
        checker = checker_for(fstype, tmp_path)
        assert isinstance(checker, ReadOnlyChecker), fstype  # never writes, never replays
        command = " ".join(checker.argv[:2])
        assert f"`{command}" in flat, f"the README does not say what {fstype} gets ({command})"
    assert "xfs, btrfs and f2fs have no host tool that replays their log" in flat
