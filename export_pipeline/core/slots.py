"""CPU slots shared by the threads of one ingest: no more busy DuckDB threads than cores.

Normalise converts the parts of an export side by side, one DuckDB thread per part and as many
parts at once as there are cores, while the staged load (core/stage.py) inserts the finished
Parquet files into the warehouse on a thread of its own. Left to the OS, that is one busy
thread more than cores, and on a two-core machine the three threads cost far more CPU than
the same work done two at a time (1,000,000 Mews reservations in 4 parts, docs/benchmarks.md:
the COPYs 12.0 CPU-s instead of 8.8, the INSERTs 6.2 instead of 4.1). So each step takes a
slot for as long as it runs, and a waiting insert goes before a waiting normalise step: the
staging keeps up with the parse instead of piling up for the end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class CpuSlots:
    """At most ``capacity`` holders at once (``None``: no limit, until :meth:`limit`).

    ``urgent`` holders go before the others that wait. A slot is held only around work that
    keeps a core busy, never while waiting for something another holder must do first.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = capacity
        self._busy = 0
        self._waiting = 0
        self._urgent_waiting = 0
        self._changed = threading.Condition()

    @property
    def capacity(self) -> int | None:
        return self._capacity

    def limit(self, capacity: int | None) -> None:
        """Set the number of slots (normalise does, once it knows how many steps run at once)."""
        with self._changed:
            self._capacity = None if capacity is None else max(1, capacity)
            self._changed.notify_all()

    @contextlib.contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            self._urgent_waiting += urgent
            try:
                while not self._free(urgent):
                    self._changed.wait()
            finally:
                self._waiting -= 1
                self._urgent_waiting -= urgent
            self._busy += 1
        try:
            yield
        finally:
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()

    def _free(self, urgent: bool) -> bool:
        if self._capacity is None:
            return True
        if self._busy >= self._capacity:
            return False
        return urgent or not self._urgent_waiting
