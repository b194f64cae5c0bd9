"""pytest fixtures for powercut: guest images, machines and guests.

Registered through the `pytest11` entry point, so any project that installs
powercut gets these fixtures. (First stub: fixtures follow.)
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("powercut")
    group.addoption("--soak", action="store_true", default=False,
                    help="also run tests marked soak (long runs)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: pass --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
