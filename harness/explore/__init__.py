"""Crash-state exploration: one recorded run defines every crash state the contract allows.

    recording.py   what a recording is on disk (base image, write log with data, acks)
    states.py      persistence points and the states at each, by cut policy, within a budget
    spec.py        how far to explore (a scenario's `[explore]` table as `ExploreSpec`) and
                   the states that selects of a recording (`bounds_for`, `explored_states`)
    overlay.py     a state as base + differing sectors: read, materialize into a scratch
                   image and restore it, content hash, replay as an image
    hostcheck.py   host-side checks of a state: the oracle on the log as of the cut, and
                   the filesystem checker on a throwaway view (journal recovery: ext4 only)
    minimize.py    delta debugging over the lost and torn writes of a failing state
    attribute.py   what a write's blocks hold on ext4 (debugfs icheck/ncheck)
    doc.py         explore.json as typed records (a state, a cell, the document), reading
                   it back, and `replay` of a state it names

Real ext4 traffic to explore without a VM (benchmarks, tests) is test support:
`harness/testing/ext4traffic.py`.

The checker guest's disk is the `crash-state` block driver
(`harness/block/drivers/crash_state.py`), switched by the serve control
socket's `state-switch` command to each state's delta (`StateBuilder.delta`).

Imports go one way: this package reads `harness.durability` and drives
`harness.block`; it knows nothing of scenarios, workloads, machines or reports
(docs/architecture.md, "Layers": it sits below them, so a scenario's
`[explore]` table and the report use its types). `harness.crash.explorer`
drives it with real guests.
"""
