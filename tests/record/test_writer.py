"""The background writer on a full disk: token rows are dropped with bounded memory, statistics are kept as
long as anything can be written, and every loss is counted.

The main tests fill a real filesystem (a small tmpfs mounted for the test; skipped where mounting is not
permitted); one more injects ENOSPC at the rename, so the policy is checked on every machine.
"""

from __future__ import annotations

import errno
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.record import writer as writer_mod
from tests.metrics.reference import make_record


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """An 8 MiB tmpfs: a real filesystem that fills up (root with mount rights only)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the injected-ENOSPC test covers the policy")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Fill the filesystem of ``path`` to the last byte."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def _record_many(rec: rldiag.Recorder, n: int, B: int = 32, T: int = 512, seed: int = 0) -> tuple[int, int]:
    """Record ``n`` steps; returns (masked-in tokens, the largest unpublished buffer seen)."""
    rng = np.random.default_rng(seed)
    masked, peak = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one "recording continues" warning
        for step in range(n):
            r = make_record(rng, B, T, extras=False)
            masked += int(r["mask"].sum())
            rec.record(step=step, **r)
            rec._writer.barrier(publish=False)
            peak = max(peak, rec.stats["buffered_bytes"])
    return masked, peak


@pytest.mark.slow
def test_full_disk_lenient_drops_token_rows_keeps_statistics_bounded(tiny_fs: Path) -> None:
    run_dir = tiny_fs / "run"
    # a segment per record while token rows can be written (roll_rows), else the default roll policy
    rec = rldiag.Recorder(run_dir, errors="lenient", roll_rows=50_000, handle_signals=False)
    masked, peak = _record_many(rec, 150, B=64, T=1024)  # ~0.7 MB of token rows each: the disk fills
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec.close()
    s = rec.stats
    assert s["rows_dropped"] > 0 and s["publish_failures"] > 0
    assert s["publish_failures"] < 60  # retried with a doubling wait, not once per record (1,133 before)
    assert peak < 4 * 2**20  # bounded: one record's token rows, not everything since the disk filled
    assert s["records_lost"] == 0
    run = rldiag.open_run(run_dir)
    assert run.steps() == list(range(150))  # statistics of every step kept
    info = run.info()
    assert info["tokens_masked_in"] == masked
    assert info["token_rows_written"] + info["token_rows_dropped"] == masked
    assert info["token_rows_dropped"] == s["rows_dropped"]
    assert run.tokens().collect().height == info["token_rows_written"]


@pytest.mark.slow
def test_nothing_writable_keeps_statistics_in_bounded_memory_until_space_returns(tiny_fs: Path) -> None:
    run_dir = tiny_fs / "run"
    rec = rldiag.Recorder(run_dir, errors="lenient", roll_steps=1, handle_signals=False)
    _record_many(rec, 2, seed=1)
    rec.flush()
    filler = tiny_fs / "filler"
    _fill(filler)
    masked, peak = _record_many(rec, 60, seed=2)
    assert rec.stats["publish_failures"] > 0
    assert peak < 2 * 2**20  # only statistics rows (~3 KB a record) are held
    filler.unlink()  # space comes back: everything held is published
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec.flush()
        rec.close()
    assert rec.stats["records_lost"] == 0
    assert rldiag.open_run(run_dir).steps() == list(range(60))


def test_injected_enospc_drops_tokens_not_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same policy where no filesystem can be mounted: the rename of every token file fails with ENOSPC."""
    real_replace = os.replace

    def replace(src, dst):
        if f"{os.sep}tokens{os.sep}" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", replace)  # the os module: every rename of the process
    rec = rldiag.Recorder(tmp_path / "run", errors="lenient", roll_steps=1, handle_signals=False)
    masked, peak = _record_many(rec, 40, B=8, T=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec.close()
    assert rec.stats["rows_written"] == 0 and rec.stats["rows_dropped"] == masked
    assert rec.stats["publish_failures"] < 20
    run = rldiag.open_run(tmp_path / "run")
    assert run.steps() == list(range(40))
    assert run.info()["token_rows_dropped"] == masked
    assert not list((tmp_path / "run" / "tokens").glob("*"))  # no half file, no temporary left behind


def test_strict_full_disk_raises_at_next_call_and_keeps_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    full = [True]

    def replace(src, dst):
        if full[0] and os.sep + "writers" + os.sep not in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", replace)  # the os module: every rename of the process
    rec = rldiag.Recorder(tmp_path / "run", roll_steps=1, handle_signals=False)
    rng = np.random.default_rng(0)
    rec.record(step=0, **make_record(rng, 4, 8, extras=False))
    with pytest.raises(rldiag.record.writer.WriterError, match="No space left"):
        rec.flush()
    full[0] = False
    rec.record(step=1, **make_record(rng, 4, 8, extras=False))
    rec.close()
    assert rldiag.open_run(tmp_path / "run").steps() == [0, 1]


# ---- live tail (issue 17 "Live means seconds") ----------------------------------------------------------------
def _wait_for(fn, limit: float = 20.0):
    """Poll ``fn`` until it returns something true (the limit only stops a broken test from hanging)."""
    import time

    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    return fn()


def test_a_step_reaches_readers_before_any_segment_is_published(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    run_dir = tmp_path / "run"
    recs = [make_record(rng, 8, 16) for _ in range(3)]
    rec = rldiag.Recorder(run_dir, handle_signals=False)  # default roll policy: 200 steps or 30 s
    rec.record(step=0, **recs[0])
    reader = rldiag.open_run(run_dir)
    assert _wait_for(lambda: reader.refresh() == [] and reader.steps() == [0])
    assert not list((run_dir / "stats").glob("*.parquet"))  # seen through the live tail alone
    rec.record(step=0, **recs[1])  # the step grows, and a new one arrives
    rec.record(step=1, **recs[2])
    n0 = int(recs[0]["mask"].sum() + recs[1]["mask"].sum())
    assert _wait_for(
        lambda: (
            reader.refresh() == []
            and reader.steps() == [0, 1]
            and reader.step_metrics(steps=[0])["tokens/count"][0] == n0
        )
    )
    live = reader.step_metrics()
    rec.close()  # the segment replaces the tail: the reader that saw both counts each record once
    assert len(reader.refresh()) == 1
    final = reader.step_metrics()
    assert final.equals(live)
    assert final.equals(rldiag.open_run(run_dir).step_metrics())
    assert not list((run_dir / "live").iterdir())


def test_live_tail_can_be_turned_off(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    rec = rldiag.Recorder(tmp_path / "run", live_seconds=None, handle_signals=False)
    rec.record(step=0, **make_record(rng, 4, 8))
    rec._writer.barrier(publish=False)
    assert rldiag.open_run(tmp_path / "run").steps() == []
    rec.close()
    assert rldiag.open_run(tmp_path / "run").steps() == [0]


def test_a_stale_or_crafted_live_tail_is_never_counted_twice(tmp_path: Path) -> None:
    """A tail left by a killed writer whose rows are also in a segment (or a copy of it) is not added."""
    import shutil

    rng = np.random.default_rng(22)
    run_dir = tmp_path / "run"
    rec = rldiag.Recorder(run_dir, handle_signals=False)
    rec.record(step=0, **make_record(rng, 4, 8))
    live = _wait_for(lambda: list((run_dir / "live").glob("*.parquet")))
    saved = tmp_path / "tail.parquet"
    shutil.copy(live[0], saved)
    rec.close()
    expected = rldiag.open_run(run_dir).step_metrics()
    shutil.copy(saved, live[0])  # the tail of segment 0, which is published
    (run_dir / "live" / "junk.parquet").write_bytes(b"not parquet")
    os.mkfifo(run_dir / "live" / "fifo.parquet")
    assert rldiag.open_run(run_dir).step_metrics().equals(expected)


def _held(w: writer_mod.Writer) -> int:
    return sum(t.get_total_buffer_size() for t in w._stats_parts)


def test_buffered_statistics_bytes_are_counted_as_parts_come_and_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer keeps the size of its unpublished statistics as a running count (summing it over the parts
    on every record was quadratic in a segment's records): it matches the parts after records, a publication,
    dropped token rows and the bound that gives up the oldest records while nothing can be written."""
    rng = np.random.default_rng(3)
    rec = rldiag.Recorder(tmp_path / "run", errors="lenient", roll_steps=1000, live_seconds=None, handle_signals=False)
    w = rec._writer
    for step in range(6):
        rec.record(step=step, **make_record(rng, 4, 8))
    assert w.barrier(publish=False, timeout=60)
    assert len(w._stats_parts) == 6 and w._stats_bytes == _held(w) > 0
    rec.flush()
    assert w._stats_parts == [] and w._stats_bytes == 0
    for step in range(6, 10):
        rec.record(step=step, **make_record(rng, 4, 8))
    assert w.barrier(publish=False, timeout=60)
    w._drop_buffered_tokens()
    assert w._stats_bytes == _held(w) > 0
    monkeypatch.setattr(writer_mod, "STATS_BUFFER_MAX_BYTES", 2 * w._stats_parts[0].get_total_buffer_size())
    w._bound_stats()
    assert len(w._stats_parts) == 2 and w._stats_bytes == _held(w) and w.records_lost == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec.close()


def test_statistics_that_do_not_fit_after_their_token_file_take_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk can have room for a segment's token file and none left for its statistics. The writer then
    removes that token file (no reader uses it without its statistics), counts its rows as dropped and writes
    the statistics: no step is lost (before, the statistics of every later record were held, then lost)."""
    real_replace = os.replace

    def replace(src, dst):
        dst = Path(dst)
        if dst.parent.name == "stats" and (dst.parent.parent / "tokens" / dst.name).exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))  # the token file took the space
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", replace)
    run_dir = tmp_path / "run"
    rec = rldiag.Recorder(run_dir, errors="lenient", roll_steps=2, live_seconds=None, handle_signals=False)
    masked, _ = _record_many(rec, 12, B=8, T=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec.close()
    s = rec.stats
    assert s["records_lost"] == 0 and s["publish_failures"] > 0
    run = rldiag.open_run(run_dir)
    assert run.steps() == list(range(12))
    assert not run.problems
    info = run.info()
    assert info["tokens_masked_in"] == masked
    assert info["token_rows_dropped"] == s["rows_dropped"] > 0
    assert info["token_rows_written"] + info["token_rows_dropped"] == masked
    assert run.tokens().collect().height == info["token_rows_written"]
    assert not list((run_dir / "tokens").glob(".*"))  # no temporary file left behind
