"""Benchmark definitions; `python -m benchmarks [NAME...]` runs them (see __main__)."""
