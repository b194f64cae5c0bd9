"""Repository-wide test setup; the fixtures themselves come from harness.pytest_plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import Phase, settings

_VM_DIR = Path(__file__).parent / "vm"

# Mutation testing (docs/mutation.md) runs the tests once per mutant with
# `--hypothesis-profile=mutation`: a property that fails has killed its mutant, and
# shrinking the example would only cost time; no example database is kept between mutants.
settings.register_profile(
    "mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/vm boots guests: mark it even if a module forgot,
    # so `-m "not vm"` never starts a VM by surprise.
    for item in items:
        if _VM_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)
