"""The run index of a run on object storage (moto on 127.0.0.1): one whole object, read instead of the files."""

from __future__ import annotations

from pathlib import Path

import pytest

import rldiag
from rldiag import storage
from rldiag.analysis import scan
from tests.analysis.test_index_arrow import _reads
from tests.analysis.test_io import _write


def test_an_index_on_s3_is_written_and_read(s3_run: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(scan, "INDEX_MIN_FILES", 3)
    _write(s3_run, 10)  # type: ignore[arg-type]
    _write(tmp_path / "local", 10)
    want = rldiag.open_run(tmp_path / "local").step_metrics()
    assert rldiag.open_run(s3_run).step_metrics().equals(want)
    assert storage.location(f"{s3_run}/{scan.INDEX_DIR}/{scan.INDEX_FILE}").exists()
    reads = _reads(monkeypatch)
    assert rldiag.open_run(s3_run).step_metrics().equals(want) and reads == []
