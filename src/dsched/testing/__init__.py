"""Helpers for running dsched (or stock Dask) in real subprocesses: tests, demo, benchmarks.

Not one of the pure layers: this package starts processes, reads clocks and uses a Client.
"""
