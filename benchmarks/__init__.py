"""Benchmark harness for tmtguard (see benchmarks/README.md).

Run everything with ``python3 benchmarks/run.py`` (or ``python -m benchmarks.run``).
"""
