"""Benchmarks: each script measures on the machine at hand and ends with one JSON line
(README "Tests and benchmarks")."""
