"""Benchmarks, run by hand from the repository root as ``python -m benchmarks.NAME`` (results: RESULTS.md)."""
