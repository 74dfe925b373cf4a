"""Benchmarks: not timed tests, but runnable measurements (``python -m benchmarks.<name>``).

Each benchmark prints human-readable progress and, as its last line, one JSON object with the
figures, so a script (or the README) can pick them up.
"""
