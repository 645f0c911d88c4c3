"""The reader: damaged files, newer formats, reading while a run is written, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag import runformat
from rldiag.analysis.io import RunFormatWarning
from tests.metrics.reference import make_record


def _write(run_dir: Path, steps: int, seed: int = 0, **kw) -> None:
    rng = np.random.default_rng(seed)
    with rldiag.Recorder(run_dir, roll_steps=2, **kw) as rec:
        for s in range(steps):
            rec.record(step=s, **make_record(rng, 4, 8))


def test_corrupt_and_truncated_files_are_skipped_and_named(run_dir) -> None:
    _write(run_dir, 6)
    files = sorted((run_dir / "stats").glob("*.parquet"))
    assert len(files) == 3
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # truncated
    tok = sorted((run_dir / "tokens").glob("*.parquet"))[0]
    tok.write_bytes(b"garbage")
    with pytest.warns(RunFormatWarning, match=files[1].name):
        run = rldiag.open_run(run_dir)
    assert run.steps() == [0, 1, 4, 5]
    assert any(files[1].name in p for p in run.info()["problems"])
    assert any(tok.name in p.path for p in run.problems)
    assert run.tokens().collect().height > 0


def test_newer_format_is_refused_with_a_clear_message(run_dir) -> None:
    _write(run_dir, 1)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["schema_version"] = 99
    (run_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer than this rldiag"):
        rldiag.open_run(run_dir)


def test_missing_or_wrong_paths(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rldiag.open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an rldiag run"):
        rldiag.open_run(tmp_path / "empty")


def test_read_while_writing_sees_only_whole_files(run_dir) -> None:
    rng = np.random.default_rng(1)
    rec = rldiag.Recorder(run_dir, roll_steps=1)
    run = rldiag.open_run(run_dir)
    seen = []
    for s in range(5):
        rec.record(step=s, **make_record(rng, 4, 8))
        rec.flush()
        run.refresh()
        seen.append(run.steps()[-1])
        # a temporary file in the folders never breaks a reader
        (run_dir / "stats" / f".partial{s}.parquet.tmp").write_bytes(b"PAR1")
    rec.close()
    assert seen == [0, 1, 2, 3, 4]
    assert rldiag.open_run(run_dir).step_metrics().height == 5


CHILD = textwrap.dedent("""
    import sys, numpy as np, rldiag
    rng = np.random.default_rng(0)
    rec = rldiag.Recorder(sys.argv[1], roll_steps=1000, roll_seconds=3600)
    step = 0
    while True:
        B, T = 8, 64
        lp = -rng.exponential(1, (B, T)).astype(np.float32)
        rec.record(step=step, logprobs=lp, old_logprobs=lp - 0.01, advantages=rng.normal(size=B).astype(np.float32))
        if step % 3 == 2:
            rec.flush()
            print(step, flush=True)
        step += 1
""")


@pytest.mark.slow
def test_sigkill_mid_run_leaves_readable_files_and_every_flushed_step(run_dir, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    flushed = -1
    deadline = time.monotonic() + 120
    while flushed < 20 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            flushed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flushed >= 20
    run = rldiag.open_run(run_dir)
    assert not run.problems  # every visible file is whole
    steps = run.steps()
    assert set(range(flushed + 1)) <= set(steps)
    df = run.step_metrics()
    full = df.filter(df["step"] <= flushed)
    assert (full["tokens/count"] == 8 * 64).all()  # exact statistics of each flushed step
    expected_k1 = 0.01
    assert np.allclose(full["kl/k1"].to_numpy(), -expected_k1, atol=1e-6)


def test_run_index_is_used_extended_and_rebuilt(run_dir, monkeypatch) -> None:
    from rldiag.analysis import io, scan

    monkeypatch.setattr(scan, "INDEX_MIN_FILES", 3)
    _write(run_dir, 8)  # roll_steps=2: 4 segments
    first = rldiag.open_run(run_dir)
    want = first.step_metrics()
    index = run_dir / io.INDEX_DIR / scan.INDEX_FILE
    assert index.exists()
    reads = []
    orig = scan.RunFiles._read_stats_file
    monkeypatch.setattr(
        scan.RunFiles, "_read_stats_file", lambda self, p, **kw: reads.append(p.name) or orig(self, p, **kw)
    )
    again = rldiag.open_run(run_dir)
    assert reads == [] and again.step_metrics().equals(want)
    assert again.info()["records"] == 8 and again.info()["stats_files"] == 4
    # a new segment merges into the indexed steps (step 7 gets a second record, from another rank: on the
    # same rank a new writer would be a restart that supersedes step 7)
    rng = np.random.default_rng(9)
    with rldiag.Recorder(run_dir, rank=1, world_size=2) as rec:
        rec.record(step=7, **make_record(rng, 4, 8))
    n_new = again.refresh()
    assert len(n_new) == 1 and reads == n_new
    assert again.step_metrics()["tokens/count"][-1] > want["tokens/count"][-1]
    assert again.step_metrics(ranks=[0])["tokens/count"].to_list() == want["tokens/count"].to_list()
    # an indexed file that changed invalidates the index: everything is read again
    victim = sorted((run_dir / "stats").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    reads.clear()
    with pytest.warns(RunFormatWarning):
        rebuilt = rldiag.open_run(run_dir)
    assert len(reads) == 5 and rebuilt.steps() == [2, 3, 4, 5, 6, 7]


# ---- restarts (resume semantics) ------------------------------------------------------------------------


def _step_record(step: int, attempt: int = 0, rank: int = 0) -> dict:
    """8 x 8 tokens, all masked in: 64 tokens per record; the data depend on (attempt, rank, step)."""
    rec = make_record(np.random.default_rng([attempt, rank, step]), 8, 8, extras=False)
    rec["mask"] = np.ones((8, 8), dtype=bool)
    return rec


def _attempt(run_dir: Path, steps, attempt: int, rank: int = 0, world: int = 1) -> None:
    with rldiag.Recorder(run_dir, rank=rank, world_size=world, roll_steps=2) as rec:
        for s in steps:
            rec.record(step=s, **_step_record(s, attempt, rank))


def _reference(path: Path, survivors, world: int = 1) -> rldiag.analysis.io.Run:
    """A run that records only the surviving records, each once: (step, attempt, rank)."""
    for rank in range(world):
        with rldiag.Recorder(path, rank=rank, world_size=world, roll_steps=1000) as rec:
            for s, a, r in sorted(survivors):
                if r == rank:
                    rec.record(step=s, **_step_record(s, a, r))
    return rldiag.open_run(path)


def _same_metrics(got, want, rtol: float = 1e-9) -> None:
    assert got["step"].to_list() == want["step"].to_list()
    for c in want.columns:
        np.testing.assert_allclose(
            got[c].to_numpy().astype(float),
            want[c].to_numpy().astype(float),
            rtol=rtol,
            atol=1e-12,
            equal_nan=True,
            err_msg=c,
        )


def test_restart_supersedes_the_earlier_records_from_its_first_step(run_dir, tmp_path) -> None:
    _attempt(run_dir, range(4), attempt=0)
    live = rldiag.open_run(run_dir)  # opened before the restart, refreshed after it
    assert live.step_metrics()["tokens/count"].to_list() == [64.0] * 4
    _attempt(run_dir, range(2, 6), attempt=1)
    live.refresh()
    run = rldiag.open_run(run_dir)
    for r in (live, run):
        assert r.step_metrics()["tokens/count"].to_list() == [64.0] * 6
        assert r.stats_table().num_rows == 6
        assert r.tokens().group_by("step").len().sort("step").collect()["len"].to_list() == [64] * 6
        assert (
            r.bucket_metrics(by="pos", buckets=2).group_by("step").agg(pl.col("n").sum()).sort("step")["n"].to_list()
            == [64.0] * 6
        )
        assert r.lens(steps=[2, 3]).height > 0
    want = _reference(tmp_path / "ref", [(s, 0, 0) for s in (0, 1)] + [(s, 1, 0) for s in range(2, 6)])
    _same_metrics(run.step_metrics(), want.step_metrics())
    _same_metrics(run.step_metrics(from_tokens=True), want.step_metrics(from_tokens=True))
    _same_metrics(
        run.step_metrics(config=run.config.replace(eps_high=0.4)),
        want.step_metrics(config=run.config.replace(eps_high=0.4)),
    )
    _same_metrics(run.bucket_metrics(by="pos", buckets=3), want.bucket_metrics(by="pos", buckets=3))
    info = run.info()
    assert [(x["rank"], x["from_step"], x["to_step"]) for x in info["superseded"]] == [(0, 2, 3)]
    assert info["records"] == 6 and info["records_superseded"] == 2 and info["gaps"] == []
    assert not run.problems
    # the files stay on disk: nothing is deleted or rewritten
    assert len(list((run_dir / "stats").glob("*.parquet"))) == 4


def test_run_index_respects_a_restart(run_dir, tmp_path, monkeypatch) -> None:
    from rldiag.analysis import io, scan

    monkeypatch.setattr(scan, "INDEX_MIN_FILES", 1)
    _attempt(run_dir, range(6), attempt=0)
    rldiag.open_run(run_dir)  # writes the index with all six records of attempt 0
    assert (run_dir / io.INDEX_DIR / scan.INDEX_FILE).exists()
    _attempt(run_dir, range(3, 5), attempt=1)
    for _ in range(2):  # the stale index is corrected, then the corrected one is read
        run = rldiag.open_run(run_dir)
        assert run.step_metrics()["tokens/count"].to_list() == [64.0] * 5
    want = _reference(tmp_path / "ref", [(s, 0, 0) for s in range(3)] + [(s, 1, 0) for s in range(3, 5)])
    _same_metrics(run.step_metrics(), want.step_metrics())


def test_restart_after_where_the_rank_stopped_leaves_a_gap(run_dir) -> None:
    _attempt(run_dir, range(4), attempt=0)
    _attempt(run_dir, range(6, 8), attempt=1)
    run = rldiag.open_run(run_dir)
    assert run.steps() == [0, 1, 2, 3, 6, 7]
    assert run.info()["gaps"] == [{"rank": 0, "from_step": 4, "to_step": 5, "writer": run.info()["gaps"][0]["writer"]}]
    assert run.info()["superseded"] == []
    assert [(r["rank"], r["step"]) for r in run.resume.restarts] == [(0, 6)]
    assert run.info()["restarts"] == run.resume.restarts
    import argparse
    import contextlib
    import io as sio

    from rldiag.commands.info import run as info_cmd

    out = sio.StringIO()
    with contextlib.redirect_stdout(out):
        info_cmd(argparse.Namespace(run=str(run_dir), json=False))
    assert "gap" in out.getvalue() and "4 .. 5" in out.getvalue()
    from rldiag.cli import main

    out = sio.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["summarize", str(run_dir), "--metrics", "tokens/count"]) == 0
    assert "restarted: step 6 (rank 0); steps 4..5 hold no data (rank 0)" in out.getvalue()


KILLED_BEFORE_PUBLISHING = textwrap.dedent("""
    import os, sys
    import rldiag
    from tests.analysis.test_io import _step_record
    rec = rldiag.Recorder(sys.argv[1], roll_steps=1000, roll_seconds=600)
    for s in range(3):
        rec.record(step=s, **_step_record(s))
    os.kill(os.getpid(), 9)
""")


@pytest.mark.parametrize(("restart", "gap"), [(2, [0, 1]), (0, None)])
def test_an_attempt_killed_before_its_first_publish_leaves_its_steps_missing(run_dir, tmp_path, restart, gap) -> None:
    """A trainer killed before the recorder published anything: its steps hold no data. A restart later than its
    first step leaves them out (a gap from that first step, not after it); a restart at that step fills them."""
    script = tmp_path / "child.py"
    script.write_text(KILLED_BEFORE_PUBLISHING)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert rldiag.open_run(run_dir).steps() == []
    _attempt(run_dir, range(restart, 5), attempt=1)
    info = rldiag.open_run(run_dir).info()
    assert rldiag.open_run(run_dir).steps() == list(range(restart, 5))
    if gap is None:
        assert info["gaps"] == []
    else:
        assert [(g["from_step"], g["to_step"]) for g in info["gaps"]] == [tuple(gap)]


def test_several_ranks_restart_at_different_steps(run_dir, tmp_path) -> None:
    world = 3
    _attempt(run_dir, range(6), attempt=0, rank=0, world=world)
    _attempt(run_dir, range(6), attempt=0, rank=1, world=world)
    _attempt(run_dir, range(6), attempt=0, rank=2, world=world)
    _attempt(run_dir, range(2, 6), attempt=1, rank=0, world=world)
    _attempt(run_dir, range(4, 6), attempt=1, rank=1, world=world)
    _attempt(run_dir, range(1, 6), attempt=2, rank=0, world=world)  # rank 0 restarts twice
    run = rldiag.open_run(run_dir)
    survivors = [(s, 0, 0) for s in range(1)] + [(s, 2, 0) for s in range(1, 6)]
    survivors += [(s, 0, 1) for s in range(4)] + [(s, 1, 1) for s in range(4, 6)]
    survivors += [(s, 0, 2) for s in range(6)]
    want = _reference(tmp_path / "ref", survivors, world=world)
    _same_metrics(run.step_metrics(), want.step_metrics())
    _same_metrics(run.step_metrics(by_rank=True), want.step_metrics(by_rank=True))
    assert run.step_metrics()["tokens/count"].to_list() == [64.0 * world] * 6
    got = {(x["rank"], x["from_step"], x["to_step"]) for x in run.info()["superseded"]}
    assert got == {(0, 1, 5), (0, 2, 5), (1, 4, 5)}
    assert [(r["rank"], r["step"]) for r in run.resume.restarts] == [(0, 2), (0, 1), (1, 4)]  # by rank, then time


def test_newest_step_per_rank_counts_only_records_that_survive_and_reads_no_record(run_dir) -> None:
    """What a follower takes a rank's progress from (a step is complete once every rank is past it): rank 1
    recorded steps 0-7, was killed, and its resumed attempt reached only step 4, so its newest step is 4 (the
    earlier attempt's 5-7 count no more). Taken from the files' keys: no further statistics record is read."""

    def attempt(steps: range, attempt: int, rank: int) -> None:  # four micro-batches a step: segments get summaries
        with rldiag.Recorder(run_dir, rank=rank, world_size=2, roll_steps=2) as rec:
            for s in steps:
                for _ in range(4):
                    rec.record(step=s, **_step_record(s, attempt, rank))

    attempt(range(8), 0, 0)
    attempt(range(8), 0, 1)
    attempt(range(3, 5), 1, 1)
    run = rldiag.open_run(run_dir)
    read = set(run.files.stats_tables)  # the files whose records the open read (those a restart cuts)
    assert read != set(run.files.stats_files)
    assert run.last_step_per_rank() == {0: 7, 1: 4}
    assert set(run.files.stats_tables) == read  # answered from the files' keys: no other file's records read
    grouped = run.stats_table().group_by("rank").aggregate([("step", "max")])  # the same from every record
    assert dict(zip(grouped.column("rank").to_pylist(), grouped.column("step_max").to_pylist())) == {0: 7, 1: 4}
    assert runformat.complete_steps(run, after=None, closed=False) == [0, 1, 2, 3]


def test_two_live_writers_on_one_rank_are_reported(run_dir) -> None:
    a = rldiag.Recorder(run_dir, rank=0, roll_steps=1)
    a.record(step=0, **_step_record(0))
    a.flush()
    b = rldiag.Recorder(run_dir, rank=0, roll_steps=1)
    b.record(step=1, **_step_record(1, 1))
    b.flush()
    time.sleep(0.01)
    a.record(step=1, **_step_record(1))  # the first writer goes on after the second started
    a.flush()
    a.close()
    b.close()
    with pytest.warns(RunFormatWarning, match="two writers were live at once"):
        run = rldiag.open_run(run_dir)
    assert any("two writers were live at once" in p for p in run.info()["problems"])


RESTART_CHILD = textwrap.dedent("""
    import sys, numpy as np, rldiag
    sys.path.insert(0, sys.argv[3])
    from tests.analysis.test_io import _step_record
    start, attempt = int(sys.argv[2]), int(sys.argv[4])
    rec = rldiag.Recorder(sys.argv[1], roll_steps=1, roll_seconds=3600)
    for step in range(start, 10 if attempt else 10**6):
        rec.record(step=step, **_step_record(step, attempt))
        rec.flush()  # half of the step is on disk: a kill from here on comes mid-step
        rec.record(step=step, **_step_record(step, attempt + 100))
        rec.flush()
        print(step, flush=True)
    rec.close()
""")


@pytest.mark.slow
def test_sigkill_mid_step_then_restart_from_a_checkpoint(run_dir, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(RESTART_CHILD)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), "0", root, "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    flushed = -1
    deadline = time.monotonic() + 120
    while flushed < 6 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            flushed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flushed >= 6
    # the job restarts from its checkpoint at step 4: steps 4.. of the killed attempt are superseded
    subprocess.run(
        [sys.executable, str(script), str(run_dir), "4", root, "1"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )
    run = rldiag.open_run(run_dir)
    survivors = [(s, a, 0) for s in range(4) for a in (0, 100)] + [(s, a, 0) for s in range(4, 10) for a in (1, 101)]
    want = _reference(tmp_path / "ref", survivors)
    _same_metrics(run.step_metrics(), want.step_metrics())
    assert run.step_metrics()["tokens/count"].to_list() == [128.0] * 10
    sup = run.info()["superseded"]
    assert len(sup) == 1 and sup[0]["from_step"] == 4 and sup[0]["to_step"] >= 6
    assert not run.problems


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4)), min_size=1, max_size=4))
def test_any_sequence_of_restarts_gives_the_metrics_of_the_surviving_records(tmp_path_factory, attempts) -> None:
    """Attempt i records steps start_i .. start_i + n_i - 1; a record of attempt j at step s survives when no
    later attempt started at or before s."""
    base = tmp_path_factory.mktemp("restarts")
    run_dir = base / "run"
    for i, (start, n) in enumerate(attempts):
        _attempt(run_dir, range(start, start + n), attempt=i)
    survivors = []
    for j, (start, n) in enumerate(attempts):
        later = [s for s, _ in attempts[j + 1 :]]
        for s in range(start, start + n):
            if all(s < f for f in later):
                survivors.append((s, j, 0))
    run = rldiag.open_run(run_dir)
    want = _reference(base / "ref", survivors)
    _same_metrics(run.step_metrics(), want.step_metrics())
    assert run.tokens().select(pl.len()).collect().item() == want.tokens().select(pl.len()).collect().item()


def test_links_and_fifos_in_a_run_are_never_followed_or_waited_on(run_dir, tmp_path) -> None:
    """A run folder is data from elsewhere: a symbolic link never leads out of it and a FIFO never blocks."""
    _attempt(run_dir, range(2), attempt=0)
    outside = tmp_path / "outside"
    _attempt(outside, range(5, 7), attempt=1)
    foreign = sorted((outside / "stats").glob("*.parquet"))[0]
    (run_dir / "stats" / "r00000-evil-1-1-000000.parquet").symlink_to(foreign)  # a linked segment
    os.mkfifo(run_dir / "stats" / "r00000-fifo-1-2-000000.parquet")  # a FIFO named like a segment
    os.mkfifo(run_dir / "writers" / "r00000-fifo-1-2.json")
    run = rldiag.open_run(run_dir)  # returns: nothing waits on the FIFOs
    assert run.steps() == [0, 1] and run.info()["stats_files"] == 1
    # a writers/ folder that is a link is not listed; a manifest that is a link is not read
    shutil_target = tmp_path / "w"
    (run_dir / "writers").rename(shutil_target)
    (run_dir / "writers").symlink_to(outside / "writers")
    assert rldiag.open_run(run_dir).info()["resume_points"] == []
    (run_dir / "manifest.json").rename(tmp_path / "m.json")
    (run_dir / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(OSError, match="symbolic link"):
        rldiag.open_run(run_dir)
