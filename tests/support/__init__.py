"""Shared by tests/ and benchmarks/ (``tests/`` is on ``sys.path``: pytest puts it there, benchmarks/_common.py too)."""
