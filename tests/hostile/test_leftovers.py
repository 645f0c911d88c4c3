"""What a killed writer leaves behind is listed by ``rldiag info`` and removed by ``--repair`` only where it is
safe (issue 16, docs/run-format.md "Leftovers and repair"): temporary files, orphan token files (published
without their statistics file), orphan live tails, incomplete last steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import rldiag
from rldiag import runformat
from rldiag.analysis import inventory
from tests.analysis.test_io import _same_metrics
from tests.metrics.reference import make_record


def _record(path: Path, *, steps: int = 4, micro: int = 2, last_micro: int | None = None, rank: int = 0) -> str:
    """A closed run; returns the writer id. ``last_micro``: micro-batches of the last step."""
    rng = np.random.default_rng(rank)
    with rldiag.Recorder(path, rank=rank, world_size=2, roll_steps=1, handle_signals=False) as rec:
        for step in range(steps):
            for _ in range(micro if step < steps - 1 or last_micro is None else last_micro):
                rec.record(step=step, **make_record(rng, 4, 8))
        return rec.writer_id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _crashed(path: Path, wid: str) -> None:
    """Make the writer look killed: no ``closed`` mark, its process gone."""
    f = path / "writers" / f"{wid}.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps(d | {"closed": None, "pid": _dead_pid()}))


def _live(path: Path, wid: str) -> None:
    """Make the writer look alive: open, and its process is this one (on this machine)."""
    f = path / "writers" / f"{wid}.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps(d | {"closed": None, "pid": os.getpid()}))


def _orphan_tokens(path: Path, wid: str, seg: int) -> Path:
    """A token file published for segment ``seg`` whose statistics file never was (a kill between the two)."""
    src = sorted((path / "tokens").glob("*.parquet"))[-1]
    dst = path / "tokens" / runformat.segment_name(wid, seg)
    shutil.copyfile(src, dst)
    return dst


def _old(p: Path, age: float = 2 * runformat.TMP_GRACE_SECONDS) -> None:
    t = time.time() - age
    os.utime(p, (t, t))


def _problems(path) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rldiag.open_run(path).info()["problems"]


def test_orphan_token_files_count_nowhere_and_are_listed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    wid = _record(run)
    want = rldiag.open_run(run)
    rows = want.tokens().collect().height
    buckets = want.bucket_metrics(by="pos", buckets=4)
    orphan = _orphan_tokens(run, wid, 99)
    got = rldiag.open_run(run)
    assert got.tokens().collect().height == rows  # was 2 x the last segment's rows more: lens and buckets read it
    _same_metrics(got.bucket_metrics(by="pos", buckets=4), buckets, rtol=0)
    _same_metrics(got.lens(), want.lens(), rtol=0)
    assert any("orphan token file" in p and orphan.name in p for p in got.info()["problems"])
    assert got.info()["token_files"] == want.info()["token_files"] + 1
    foreign = run / "tokens" / "x (copy).parquet"  # a token file copied alone, under a name no writer gives
    shutil.copyfile(orphan, foreign)
    got = rldiag.open_run(run)
    assert got.tokens().collect().height == rows
    assert any(str(foreign) in p for p in got.info()["problems"])
    assert [x.path for x in inventory.repair(got, dry_run=True)] == [orphan]  # listed, never removed


def test_info_lists_leftovers_and_repair_removes_only_what_is_safe(tmp_path: Path, capsys) -> None:
    from rldiag.cli import main

    run = tmp_path / "run"
    wid = _record(run, last_micro=1)
    other = _record(run, rank=1)  # a second rank, alive: its files are never touched
    _crashed(run, wid)
    _live(run, other)
    orphan = _orphan_tokens(run, wid, 99)
    live_orphan = _orphan_tokens(run, other, 99)  # the live writer is between its two publishes
    old_tmp = run / "stats" / f".{runformat.segment_name(wid, 7)}.tmp"
    old_tmp.write_bytes(b"half a file")
    _old(old_tmp)
    young_tmp = run / "tokens" / f".{runformat.segment_name(other, 7)}.123.tmp"
    young_tmp.write_bytes(b"being written")
    (run / "live").mkdir(exist_ok=True)
    stale = run / "live" / f"{wid}.parquet"  # the crashed writer's tail, whose rows are in segment 0 already
    table = pq.read_table(sorted((run / "stats").glob(f"{wid}-*.parquet"))[0])
    meta = {runformat.LIVE_META_KEY: json.dumps({"writer": wid, "segment": 0}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), stale)
    before = _problems(run)
    text = "\n".join(before)
    assert f"temporary file {old_tmp}" in text and str(young_tmp) not in text
    assert f"orphan token file {orphan}" in text and str(live_orphan) not in text
    assert f"orphan live tail {stale}" in text
    assert f"step 3 of writer {wid} holds 1 of 2 micro-batches" in text
    assert main(["info", str(run), "--repair", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {old_tmp}" in out and f"would remove {orphan}" in out and f"would remove {stale}" in out
    assert "would remove 3 file(s)" in out
    assert old_tmp.exists() and orphan.exists() and stale.exists()  # a dry run removes nothing
    assert main(["info", str(run), "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"removed {old_tmp}" in out and f"removed {orphan}" in out and "removed 3 file(s)" in out
    assert not old_tmp.exists() and not orphan.exists() and not stale.exists()
    assert young_tmp.exists() and live_orphan.exists()  # a live writer's files are never touched
    after = _problems(run)
    assert [p for p in after if "incomplete last step" in p] == [p for p in before if "incomplete last step" in p]
    assert not [p for p in after if "temporary file" in p or "orphan" in p]
    assert main(["info", str(run)]) == 0 and "incomplete last step" in capsys.readouterr().out


def test_a_crashed_writers_tail_that_readers_use_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    wid = _record(run, steps=3)
    _crashed(run, wid)
    segs = sorted((run / "stats").glob(f"{wid}-*.parquet"))
    last = segs[-1]
    n = int(last.stem.rsplit("-", 1)[1])
    (run / "live").mkdir(exist_ok=True)
    table = pq.read_table(last)
    meta = {runformat.LIVE_META_KEY: json.dumps({"writer": wid, "segment": n}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), run / "live" / f"{wid}.parquet")
    last.unlink()  # the writer died before publishing its last segment: the tail holds those records
    r = rldiag.open_run(run)
    assert r.steps()[-1] == 2  # counted from the tail
    assert any("only in its live tail" in p for p in r.info()["problems"])
    assert inventory.repair(r) == [] and (run / "live" / f"{wid}.parquet").exists()
