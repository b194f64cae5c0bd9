"""Repository-wide test setup; the fixtures themselves come from harness.pytest_plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

_VM_DIR = Path(__file__).parent / "vm"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/vm boots guests: mark it even if a module forgot,
    # so `-m "not vm"` never starts a VM by surprise.
    for item in items:
        if _VM_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)
