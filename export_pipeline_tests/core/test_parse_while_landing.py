"""The parts of an export parsed as they land (``to_parquet(..., arriving=...)``), while the
later ones are still on their way: the table is the one the parts give once all are there.

Landing is played for real, on disk: a part is moved into place (what the download does) only
when the test lets it, and the test lets part k+1 land only once part k's Parquet is written.
A parse that waited for every part would never see the next one land; the lander then gives
up waiting after a deadline, lands the rest, and the test fails on what it recorded.
"""

from __future__ import annotations

import gzip
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from export_pipeline.core.normalise import to_parquet
from export_pipeline_tests.core.test_normalise import (
    _CHECKED,
    AUTO_KIND,
    LOADED_AT,
    _no_second_pass,
    _typed_over_every_record,
    _write_parts,
    table,
)

PARTS = 4
# How long the lander waits for a part's Parquet before it lands the next part anyway.
DEADLINE_SECONDS = 15.0


class _DownloadBroke(Exception):
    """What a failed download raises to a parse waiting for its part."""


class Lander:
    """Moves prepared parts into ``raw`` one by one: part k+1 only once the Parquet of part k
    was told to ``on_file`` (or after the deadline, recorded in ``late``)."""

    def __init__(
        self,
        prepared: list[Path],
        raw: Path,
        *,
        fail_at: int | None = None,
        deadline: float = DEADLINE_SECONDS,
    ) -> None:
        self.prepared = prepared
        self.deadline = deadline
        self.paths = [raw / p.name for p in prepared]
        self.fail_at = fail_at
        self.told: list[Path] = []
        self.late: list[int] = []
        self.waited: list[str] = []
        self._landed = [threading.Event() for _ in prepared]
        self._parsed = [threading.Event() for _ in prepared]
        self._failed = threading.Event()
        self._thread = threading.Thread(target=self._land, daemon=True)

    def on_file(self, path: Path) -> None:
        self.told.append(path)
        for n, src in enumerate(self.prepared):
            if path.name.startswith(src.name.split(".")[0] + "."):
                self._parsed[n].set()

    def arriving(self, path: Path, timeout: float) -> bool:
        n = self.paths.index(path)
        self.waited.append(path.name)
        if self._landed[n].wait(timeout):
            return True
        if self._failed.is_set():
            raise _DownloadBroke(f"{path.name} did not land")
        return False

    def _land(self) -> None:
        for n, (src, dst) in enumerate(zip(self.prepared, self.paths, strict=True)):
            if n and not self._parsed[n - 1].wait(self.deadline):
                self.late.append(n)
            if n == self.fail_at:
                self._failed.set()
                return
            os.replace(src, dst)
            self._landed[n].set()

    def __enter__(self) -> Lander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()


def _parts(tmp_path: Path, fmt: str = "jsonl") -> list[Path]:
    chunks = [[dict(r, id=f"{n}-{r['id']}") for r in _CHECKED] for n in range(PARTS)]
    return _write_parts(tmp_path, fmt, chunks)


@pytest.fixture
def landing_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    prepared, raw = tmp_path / "prepared", tmp_path / "raw"
    prepared.mkdir()
    raw.mkdir()
    yield prepared, raw


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json"])
def test_each_part_is_parsed_as_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, landing_dirs: tuple[Path, Path], fmt: str
) -> None:
    """Part k+1 lands only after part k's Parquet is written, and the export still gives the
    table of the scan over every record: one parse per part, its check inside it."""
    prepared, raw = landing_dirs
    parts = _parts(prepared, fmt)
    full = _typed_over_every_record(monkeypatch, parts, tmp_path / "full", AUTO_KIND)
    out = tmp_path / "out"
    with monkeypatch.context() as patch, Lander(parts, raw) as lander:
        _no_second_pass(patch)
        result = to_parquet(
            lander.paths,
            out,
            kind=AUTO_KIND,
            export_id="e",
            loaded_at=LOADED_AT,
            on_file=lander.on_file,
            arriving=lander.arriving,
        )
    assert lander.late == []  # every part was parsed before the next one landed
    assert table(result.parquet_paths) == full
    assert sorted(p.name for p in out.iterdir()) == [f"part-{n}.parquet" for n in range(PARTS)]
    assert len(lander.told) == PARTS
    assert set(lander.waited) == {p.name for p in lander.paths}


def test_a_parse_that_waits_for_every_part_is_caught(
    tmp_path: Path, landing_dirs: tuple[Path, Path]
) -> None:
    """The lander sees a parse that begins only once every part is there (what to_parquet
    does when the caller waited for the whole download): the check above can fail."""
    prepared, raw = landing_dirs
    parts = _parts(prepared)
    with Lander(parts, raw, deadline=0.2) as lander:
        for path in lander.paths:
            while not lander.arriving(path, 0.05):
                pass
        result = to_parquet(
            lander.paths,
            tmp_path / "out",
            kind=AUTO_KIND,
            export_id="e",
            loaded_at=LOADED_AT,
            on_file=lander.on_file,
        )
    assert lander.late == [1, 2, 3]
    assert result.rows == PARTS * len(_CHECKED)


@pytest.mark.parametrize("unlike", ["gzip", "empty", "bom", "array", "utf16"])
def test_a_part_that_lands_unlike_the_first_is_read_the_usual_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, landing_dirs: tuple[Path, Path], unlike: str
) -> None:
    """A later part in another format, compression or text encoding, empty, or with a
    byte-order mark: the parts are read once all are there, as if they had been downloaded
    first. Same table."""
    prepared, raw = landing_dirs
    parts = _parts(prepared)
    last = parts[-1]
    body = last.read_bytes()
    if unlike == "gzip":
        last.write_bytes(gzip.compress(body))
    elif unlike == "empty":
        last.write_bytes(b"")
    elif unlike == "bom":
        last.write_bytes(b"\xef\xbb\xbf" + body)
    elif unlike == "utf16":
        last.write_bytes(body.decode().encode("utf-16"))
    else:
        rows = [line for line in body.decode().splitlines() if line]
        last.write_text("[" + ",\n".join(rows) + "]")
    usual = tmp_path / "usual"
    usual.mkdir()
    copies = [Path(shutil.copy(p, usual / p.name)) for p in parts]
    expected = to_parquet(
        copies, tmp_path / "expected", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT
    )
    # No on_file here, so each part lands after the deadline: a short one (the default kept
    # each case waiting 3 x 15 s).
    with Lander(parts, raw, deadline=0.5) as lander:
        result = to_parquet(
            lander.paths,
            tmp_path / "out",
            kind=AUTO_KIND,
            export_id="e",
            loaded_at=LOADED_AT,
            arriving=lander.arriving,
        )
    assert table(result.parquet_paths) == table(expected.parquet_paths)
    assert result.rows == (PARTS - (unlike == "empty")) * len(_CHECKED)


def test_a_download_that_fails_midway_fails_the_parse_with_its_error(
    tmp_path: Path, landing_dirs: tuple[Path, Path]
) -> None:
    """Part 2 never lands: the parse stops with the download's error, and leaves no Parquet
    (nor any half-written one) of the parts it had read."""
    prepared, raw = landing_dirs
    parts = _parts(prepared)
    out = tmp_path / "out"
    told: list[Any] = []
    lander = Lander(parts, raw, fail_at=2)
    with lander, pytest.raises(_DownloadBroke, match=r"part-2\.jsonl did not land"):
        to_parquet(
            lander.paths,
            out,
            kind=AUTO_KIND,
            export_id="e",
            loaded_at=LOADED_AT,
            on_file=lambda p: (told.append(p), lander.on_file(p)),
            arriving=lander.arriving,
        )
    assert len(told) == 2  # parts 0 and 1 were parsed while part 2 was awaited
    assert [p.name for p in out.rglob("*") if p.is_file()] == []
