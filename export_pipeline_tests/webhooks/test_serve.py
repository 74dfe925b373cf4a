"""``serve``: the documented entry point starts a real uvicorn process, or refuses clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import export_pipeline
from export_pipeline.core.errors import ConfigurationError
from export_pipeline.sandbox.server import free_port
from export_pipeline.webhooks.receiver import SECRET_ENV, TOKEN_ENV
from export_pipeline.webhooks.serve import serve
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.conftest import guarded_pythonpath
from export_pipeline_tests.webhooks.conftest import COMPLETED, LOCATIONS_PATH, SECRET, encode, sign

REPO_ROOT = Path(export_pipeline.__file__).resolve().parent.parent


def test_serve_refuses_to_start_without_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)

    with pytest.raises(ConfigurationError, match="no credentials"):
        serve(port=free_port(), store_path=tmp_path / "events.sqlite3")


def test_serve_runs_the_receiver_in_its_own_process(tmp_path: Path) -> None:
    port = free_port()
    store_path = tmp_path / "nested" / "events.sqlite3"
    env = {**os.environ, SECRET_ENV: SECRET, "PYTHONPATH": guarded_pythonpath(REPO_ROOT)}
    env.pop(TOKEN_ENV, None)
    code = (
        "import sys; from pathlib import Path; from export_pipeline.webhooks.serve import serve;"
        "serve(port=int(sys.argv[1]), store_path=Path(sys.argv[2]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port), str(store_path)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "receiver did not come up"
            time.sleep(0.1)
        body = encode(COMPLETED)

        response = httpx.post(base + LOCATIONS_PATH, content=body, headers=sign(body, msg_id="p1"))

        assert response.status_code == 202, response.text
        assert [e.event_id for e in EventStore(store_path).pending()] == ["p1"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0].decode()
    assert SECRET not in output
