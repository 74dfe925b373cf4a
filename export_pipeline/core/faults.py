"""Named points in a sync where the crash harness can kill the process for real.

``EXPORT_PIPELINE_KILL_AT=<point>`` makes the process SIGKILL itself when it reaches that point
(no cleanup, no ``finally``: exactly what an OOM kill or a lost node does). Unset, which is
always the case outside the reliability tests, a fault point is one dictionary lookup. The
points, in the order a sync meets them: ``request`` (export requested and recorded), ``poll``
(first status answer), ``download`` (first bytes of a file on disk), ``parquet`` (Parquet
written, nothing published), ``merge`` (inside the load transaction, before COMMIT),
``commit`` (right after COMMIT). With ``EXPORT_PIPELINE_KILL_ONCE=<file>`` too, only the
first process to reach the point dies (it creates the file): a resumed or retried run worker,
which inherits the same environment, carries on.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "EXPORT_PIPELINE_KILL_AT"
ONCE_VAR = "EXPORT_PIPELINE_KILL_ONCE"
POINTS = ("request", "poll", "download", "parquet", "merge", "commit")


def fault_point(name: str) -> None:
    if os.environ.get(ENV_VAR) == name:
        once = os.environ.get(ONCE_VAR)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
