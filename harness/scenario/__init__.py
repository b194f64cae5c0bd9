"""Scenarios: TOML files turned into cells, with no VM (docs/architecture.md).

`load_scenario` / `parse_scenario` validate a file into a `Scenario`;
`expand` / `expand_all` / `select` turn scenarios into `Cell`s.
"""
