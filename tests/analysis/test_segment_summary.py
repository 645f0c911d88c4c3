"""Write-time segment summaries (issue 15: the first open reads what it needs, not every record).

A statistics segment carries its records merged per step in its footer (``runformat.SUMMARY_META_KEY``). A run
read through the summaries must give the same numbers (to rounding) as the same run whose files were rewritten
without them, whatever the restarts, duplicates, damaged or hostile summaries; the same bits from the first open
and from the run index, and the same numbers from a live reader folding the files one by one.
"""

from __future__ import annotations

import base64
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rldiag
from rldiag import runformat
from rldiag.analysis.scan import INDEX_DIR
from rldiag.metrics import aggregate
from rldiag.record.writer import write_parquet
from rldiag.stats.table import from_packed_ipc, to_packed_ipc
from tests.metrics.reference import make_record


def _record(path: Path, steps: range, *, rank: int = 0, world: int = 1, micros: int = 3, seed: int = 0, **cfg) -> None:
    rng = np.random.default_rng(seed)
    with rldiag.Recorder(path, rank=rank, world_size=world, handle_signals=False, live_seconds=None, **cfg) as rec:
        for step in steps:
            for _ in range(micros):
                rec.record(step=step, **make_record(rng, 6, 24))


def _rewrite(path: Path, footer: dict[bytes, bytes] | None = None, only: str | None = None) -> None:
    """Rewrite the run's statistics files without their summaries (or with ``footer`` in their place)."""
    for f in sorted((path / "stats").glob("*.parquet")):
        if only is None or f.name == only:
            write_parquet(pq.read_table(f), f, "zstd", footer)
    shutil.rmtree(path / INDEX_DIR, ignore_errors=True)


def _summarized(path: Path) -> list[str]:
    out = []
    for f in sorted((path / "stats").glob("*.parquet")):
        if runformat.SUMMARY_META_KEY in (pq.read_metadata(f).metadata or {}):
            out.append(f.name)
    return out


def _metrics(path: Path):
    shutil.rmtree(path / INDEX_DIR, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runformat.RunFormatWarning)
        return rldiag.open_run(path).step_metrics()


def _same_bits(a, b) -> None:
    assert a.columns == b.columns and a.height == b.height
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype != np.float64:
            assert np.array_equal(x, y), col
            continue
        nan = np.isnan(x)
        assert np.array_equal(nan, np.isnan(y)), col
        assert np.array_equal(x[~nan].view(np.int64), y[~nan].view(np.int64)), col  # bits: -0.0 is not 0.0


def _close(a, b) -> None:
    assert a.columns == b.columns and a.height == b.height
    for col in a.columns:
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col)


@pytest.fixture
def two_ranks(tmp_path: Path) -> Path:
    """Two ranks, three micro-batches a step, segments cut every 3-4 records (so segments share a step, some hold
    two or more records a step and carry a summary, some hold fewer and do not)."""
    run = tmp_path / "run"
    for rank in range(2):
        _record(run, range(14), rank=rank, world=2, seed=rank, roll_rows=200)
    return run


def test_summaries_give_the_same_bits_as_the_records(two_ranks: Path, tmp_path: Path) -> None:
    names = _summarized(two_ranks)
    all_files = sorted(p.name for p in (two_ranks / "stats").glob("*.parquet"))
    assert 0 < len(names) < len(all_files)  # both kinds, neighbours sharing a step
    with_summaries = _metrics(two_ranks)
    plain = tmp_path / "plain"
    shutil.copytree(two_ranks, plain)
    _rewrite(plain)
    assert _summarized(plain) == []
    _close(with_summaries, _metrics(plain))
    assert with_summaries.height == 14
    # the per-record views read the records: the same bits as the run without summaries
    run, plain_run = rldiag.open_run(two_ranks), rldiag.open_run(plain)
    _same_bits(run.step_metrics(by_rank=True), plain_run.step_metrics(by_rank=True))
    _same_bits(run.step_metrics(ranks=[1]), plain_run.step_metrics(ranks=[1]))
    assert run.step_stats().equals(plain_run.step_stats())
    # and merged, they give the same numbers as the summaries (to rounding)
    merged = aggregate.metrics_of(run.stats_table(), names=["ratio/mean", "entropy/mean"])
    assert np.allclose(merged["ratio/mean"].to_numpy(), with_summaries["ratio/mean"].to_numpy(), rtol=1e-12)


def test_the_first_open_reads_no_record_of_a_summarized_segment(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _record(run, range(12), micros=4, roll_steps=4)
    files = sorted(p.name for p in (run / "stats").glob("*.parquet"))
    assert _summarized(run) == files and len(files) > 2
    reads: list[int] = []
    orig = pq.ParquetFile.read
    monkeypatch.setattr(pq.ParquetFile, "read", lambda self, *a, **k: reads.append(1) or orig(self, *a, **k))
    r = rldiag.open_run(run)
    df = r.step_metrics()
    assert reads == [] and df.height == 12
    r.stats_table()  # per-record rows are read when asked for
    assert len(reads) == len(files)


def test_damaged_or_hostile_summaries_fall_back_to_the_records(two_ranks: Path, tmp_path: Path) -> None:
    first = _summarized(two_ranks)[0]
    plain = tmp_path / "plain"  # that one segment without its summary: read record by record
    shutil.copytree(two_ranks, plain)
    _rewrite(plain, only=first)
    want = _metrics(plain)
    data = (pq.read_metadata(two_ranks / "stats" / first).metadata or {})[runformat.SUMMARY_META_KEY]
    summary = from_packed_ipc(data)
    hostile = {
        "garbage": b"RLS1not arrow at all",
        "truncated": data[: len(data) // 2],
        "steps out of order": to_packed_ipc(summary.take(pa.array(np.arange(summary.num_rows)[::-1]))),
        "bin out of range": to_packed_ipc(
            summary.set_column(
                summary.schema.get_field_index("h_lr.idx"),
                "h_lr.idx",
                pa.array([[60000]] * summary.num_rows, pa.list_(pa.uint16())),
            ).set_column(
                summary.schema.get_field_index("h_lr.cnt"),
                "h_lr.cnt",
                pa.array([[1]] * summary.num_rows, pa.list_(pa.uint32())),
            )
        ),
        "keys cut": to_packed_ipc(summary.drop_columns(["rec_micro"])),
    }
    for what, bad in hostile.items():
        case = tmp_path / what.replace(" ", "-")
        shutil.copytree(two_ranks, case)
        _rewrite(case, {runformat.SUMMARY_META_KEY: bad}, only=first)
        _same_bits(want, _metrics(case))


def test_restarts_and_copies_count_each_record_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _record(run, range(10), micros=3, roll_steps=3, seed=1)
    _record(run, range(6, 12), micros=3, roll_steps=3, seed=2)  # a restart from step 6 supersedes 6..9
    names = _summarized(run)
    assert names
    shutil.copy(run / "stats" / names[0], run / "stats" / "copy-of-a-segment.parquet")
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    _rewrite(plain)
    got, want = _metrics(run), _metrics(plain)
    _close(got, want)
    assert got["step"].to_list() == list(range(12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runformat.RunFormatWarning)
        r, p = rldiag.open_run(run), rldiag.open_run(plain)
    copied = pq.read_metadata(run / "stats" / names[0]).num_rows
    assert r.files.duplicate_records() == p.files.duplicate_records() == copied  # the copy counts nowhere
    assert r.files.superseded_records() == p.files.superseded_records() == 4 * 3  # steps 6..9 of the first


def test_the_same_numbers_whichever_way_the_run_is_opened(two_ranks: Path, tmp_path: Path) -> None:
    first_open = _metrics(two_ranks)
    indexed = rldiag.open_run(two_ranks)  # _metrics left the index behind
    assert (two_ranks / INDEX_DIR).exists()
    _same_bits(first_open, indexed.step_metrics())
    live = tmp_path / "live"  # a reader that sees the segments appear one by one, in name order
    shutil.copytree(two_ranks, live, ignore=shutil.ignore_patterns("*.parquet", INDEX_DIR))
    files = sorted((two_ranks / "stats").glob("*.parquet"))
    run = None
    for f in files:
        shutil.copy(f, live / "stats" / f.name)
        if run is None:
            run = rldiag.open_run(live)
        else:
            run.refresh()
    assert run is not None
    # to rounding: a step split across two segments merges its log-sum-exps in two stages when they come apart
    _close(first_open, run.step_metrics())


def test_a_summary_is_left_out_where_it_would_not_help() -> None:
    from rldiag.record.writer import summary_metadata
    from rldiag.stats import kernel
    from rldiag.stats.table import to_table

    rng = np.random.default_rng(0)
    lp = -rng.exponential(1, 64)
    tb = kernel.TokenBatch(
        rec_off=np.arange(0, 9),
        seq_off=np.arange(0, 65, 8),
        steps=np.arange(8),
        logp=lp,
        old_logp=np.minimum(lp + rng.normal(0, 0.05, 64), 0),
        adv=np.repeat(rng.normal(size=8), 8),
        pos=np.tile(np.arange(8), 8),
    )
    st = kernel.compute(tb, rldiag.RecorderConfig())
    one_per_step = to_table(st, np.arange(8), np.zeros(8), np.zeros(8))
    assert summary_metadata(one_per_step) == {}
    two_per_step = to_table(st, np.arange(8) // 2, np.zeros(8), np.arange(8) % 2)
    summary = from_packed_ipc(summary_metadata(two_per_step)[runformat.SUMMARY_META_KEY])
    assert summary.num_rows == 4 and summary.column("rec_micro").to_pylist() == [[0, 1]] * 4


def _repack(data: bytes, change) -> bytes:
    """Packed text whose binary body (size, lz4 frame) went through ``change``."""
    return data[:4] + base64.b64encode(change(base64.b64decode(data[4:])))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: d[:20],  # cut inside the text
        lambda d: d[:4] + b"not base64 at all!",
        lambda d: b"RLS2" + d[4:],  # another format
        lambda d: _repack(d, lambda b: b[:20]),  # cut inside the frame
        lambda d: _repack(d, lambda b: b[:8] + b"x" * 50),  # not lz4
        lambda d: _repack(d, lambda b: (2**62).to_bytes(8, "little") + b[8:]),  # claims far more than the bound
        lambda d: _repack(d, lambda b: (10).to_bytes(8, "little") + b[8:]),  # claims less than it holds
        lambda d: _repack(d, lambda b: (len(b) * 50).to_bytes(8, "little") + b[8:]),  # claims more than it holds
    ],
)
def test_packed_tables_refuse_bad_bytes_with_a_value_error(spoil) -> None:
    data = to_packed_ipc(pa.table({"a": np.arange(1000)}))
    assert data.isascii() and from_packed_ipc(data).column("a").to_pylist() == list(range(1000))
    with pytest.raises(ValueError):
        from_packed_ipc(spoil(data))


def test_statistics_files_with_summaries_read_in_polars(tmp_path: Path) -> None:
    """Parquet key-value metadata is UTF-8 text: polars refuses a file with binary bytes there."""
    import polars as pl

    run = tmp_path / "run"
    _record(run, range(4), micros=4, roll_steps=4)
    for name in _summarized(run):
        assert pl.read_parquet(run / "stats" / name).height == pq.read_metadata(run / "stats" / name).num_rows
