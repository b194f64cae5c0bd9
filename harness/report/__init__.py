"""Results of a run and every report made from them.

* `results` — the results model (`CellResult`, `RunResults`) and results.json
  (schema documented in that module), plus `cell_result` / `error_result`
  for the runner to turn a cell and its verdict into a result.
* `render` — `render_all(results, DIR)`: results.json, junit.xml, report.md,
  report.html and plots/*.png; `rerender(DIR)` for `powercut report`.

results.json is read through `harness.jsonfile`, as every versioned file is:
a binary, broken or wrongly shaped file is one `ConfigError` naming it.
"""
