"""Benchmarks of the MPO engine and server against the baselines (DESIGN.md §5)."""
