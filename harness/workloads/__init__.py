"""Workloads: what runs on the disk under test, and the checkers that judge it.

`base.Workload` is the interface; `registry` knows every kind. See
docs/architecture.md, "Adding a workload".
"""
