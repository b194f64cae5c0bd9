"""The scenarios powercut ships, by name: `powercut run matrix` as well as `powercut run FILE`.

They are package data (`harness/data/scenarios/`, in the repository a link
to `scenarios/`), so an installed powercut has them too. A name is looked up
only when no file of that name exists, so a file always wins.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import ScenarioError

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "scenarios"


def shipped_dir() -> Path:
    return SHIPPED


def shipped_names() -> list[str]:
    """The names of the shipped scenarios (file stems), sorted."""
    return sorted(p.stem for p in shipped_dir().glob("*.toml"))


def resolve_scenario(scenario: str | Path) -> Path:
    """The file for `scenario`: a path, or a shipped scenario's name (`matrix`, `matrix.toml`)."""
    path = Path(scenario)
    if path.exists() or len(path.parts) != 1:
        return path  # a path: load_scenario says what is wrong with it, if anything
    name = path.name.removesuffix(".toml")
    candidate = shipped_dir() / f"{name}.toml"
    if candidate.is_file():
        return candidate
    raise ScenarioError(
        f"{scenario}: no such scenario file, and no shipped scenario of that name; "
        f"shipped: {', '.join(shipped_names())}"
    )
