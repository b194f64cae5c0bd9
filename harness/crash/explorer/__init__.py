"""`powercut explore` with real guests: the exploration engine (`harness.explore`) driven.

    record.py    records a cell's workload once in a guest, through the runner's session
                 graph with the log's data kept and acknowledgements time-stamped
    checker.py   the checker guest: one guest on a `crash-state` disk that mounts state
                 after state and runs the workload's own check
    cell.py      one cell's exploration (`CellExplorer`): record, enumerate, host-side
                 checks while the checker guest boots, the guest's checks, minimization,
                 the verdicts; its `CellRecord` for explore.json
    run.py       a whole run: the cells a scenario folds into, and explore.json as it goes
    progress.py  what a cell reports while it works (phase, counts, time left)

The engine knows nothing of guests, scenarios or reports; this package is where
they meet it (so `crash` imports `explore`, never the reverse), and explore.json's
records, the state rules and `replay` are the engine's (`harness.explore.doc`,
`harness.explore.spec`).
"""
