"""Named points in a sync where the crash harness can kill the process for real.

``EXPORT_PIPELINE_KILL_AT=<point>`` makes the process SIGKILL itself when it reaches that point
(no cleanup, no ``finally``: exactly what an OOM kill or a lost node does). Unset, which is
always the case outside the reliability tests, a fault point is one dictionary lookup. The
points, in the order a sync meets them: ``request`` (export requested and recorded), ``poll``
(first status answer), ``download`` (first bytes of a file on disk), ``parquet`` (Parquet
written, nothing published), ``merge`` (inside the load transaction, before COMMIT),
``commit`` (right after COMMIT).
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "EXPORT_PIPELINE_KILL_AT"
POINTS = ("request", "poll", "download", "parquet", "merge", "commit")


def fault_point(name: str) -> None:
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
