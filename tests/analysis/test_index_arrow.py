"""The run index as an Arrow IPC file (index version 5): read instead of the files, rebuilt when it is stale,
damaged, of an older rldiag, a link or a FIFO; the same step metrics, bit for bit, whichever way a run opens."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rldiag
from rldiag.analysis import scan
from tests.analysis.test_io import _write


@pytest.fixture
def indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(scan, "INDEX_MIN_FILES", 3)
    run = tmp_path / "run"
    _write(run, 10)  # roll_steps=2: 5 segments
    return run


def _index(run: Path) -> Path:
    return run / scan.INDEX_DIR / scan.INDEX_FILE


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    orig = scan.RunFiles._read_stats_file
    monkeypatch.setattr(
        scan.RunFiles, "_read_stats_file", lambda self, p, **kw: reads.append(p.name) or orig(self, p, **kw)
    )
    return reads


def test_index_is_an_arrow_file_read_instead_of_the_files(indexed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = rldiag.open_run(indexed).step_metrics()
    path = _index(indexed)
    with pa.OSFile(str(path)) as f:
        table = pa.ipc.open_file(f).read_all()
    assert table.num_rows == 10
    reads = _reads(monkeypatch)
    again = rldiag.open_run(indexed)
    assert reads == []
    assert again.step_metrics().equals(want)  # bit for bit: equals() compares the floats exactly


def test_an_index_of_an_older_rldiag_is_ignored_and_replaced(indexed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = rldiag.open_run(indexed).step_metrics()
    path = _index(indexed)
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    old = path.with_name("steps.parquet")
    pq.write_table(table, old)  # a version-3 index, as older rldiag wrote it
    path.unlink()
    reads = _reads(monkeypatch)
    run = rldiag.open_run(indexed)
    assert len(reads) == 5 and run.step_metrics().equals(want)
    assert path.exists() and not old.exists()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink(path: Path) -> None:
    target = path.with_name("elsewhere.arrow")
    os.replace(path, target)
    path.symlink_to(target)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garbage(path: Path) -> None:
    path.write_bytes(b"ARROW1" + os.urandom(2000))


def _bad_offsets(path: Path) -> None:
    """An IPC file whose list offsets point past the values (Arrow's full validation refuses it): the offsets
    buffer is patched in the bytes of an uncompressed file, since pyarrow refuses to build such an array."""
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all().combine_chunks()
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    offsets = np.asarray(table.column("h_lr.idx").chunk(0).offsets)
    good = offsets.astype(np.int32).tobytes()
    bad = offsets.copy()
    bad[-1] += 1000
    data = path.read_bytes()
    assert data.count(good) >= 1  # h_lr.cnt has the same offsets: the first (h_lr.idx) is patched
    path.write_bytes(data.replace(good, bad.astype(np.int32).tobytes(), 1))


def _bin_out_of_range(path: Path) -> None:
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    idx = table.column("h_ent.idx").to_pylist()
    cnt = table.column("h_ent.cnt").to_pylist()
    idx[0] = list(idx[0]) + [60000]
    cnt[0] = list(cnt[0]) + [1]
    for name, values in (("h_ent.idx", idx), ("h_ent.cnt", cnt)):
        table = table.set_column(table.column_names.index(name), name, pa.array(values, table.schema.field(name).type))
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


@pytest.mark.parametrize("damage", [_fifo, _symlink, _truncate, _garbage, _bad_offsets, _bin_out_of_range])
def test_a_damaged_index_is_rebuilt_from_the_files(indexed: Path, monkeypatch: pytest.MonkeyPatch, damage) -> None:
    want = rldiag.open_run(indexed).step_metrics()
    path = _index(indexed)
    if damage is _fifo:
        path.unlink()
    damage(path)
    reads = _reads(monkeypatch)
    run = rldiag.open_run(indexed)  # must neither block (FIFO) nor follow the link nor crash
    assert len(reads) == 5
    assert run.step_metrics().equals(want)
    assert path.is_file() and not path.is_symlink()
    reads.clear()
    assert rldiag.open_run(indexed).step_metrics().equals(want) and reads == []
