"""Benchmarks of the MPO engine and server against the baselines (docs/benchmarks.md)."""
