"""The run format module: manifest creation under concurrency, writer files, the closed/stalled rules,
file metadata, alerts.jsonl, and the committed sample runs (written before the module existed)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import rldiag
from rldiag import runformat as rf
from rldiag.config import RecorderConfig

SAMPLES = Path(rldiag.__file__).parent / "sample_logs"
REPO_SAMPLES = Path(__file__).resolve().parents[1] / "sample_logs"


# --- manifest ------------------------------------------------------------------------------------------
def _create(path: str, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:  # type: ignore[name-defined]
    barrier.wait()
    try:
        manifest = rf.create_run_dir(Path(path), RecorderConfig(), 8, None)
        out.put(("ok", manifest["created"]))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(("error", repr(exc)))


@pytest.mark.slow
def test_eight_ranks_creating_one_run_at_once_all_succeed_with_one_manifest() -> None:
    """Eight processes released together into a fresh directory, many times: each gets the same manifest.

    Before the run-format module, one rank failed with "not an rldiag run (found manifest.json)" in about
    one round in twenty of this test (the rank saw the winner's manifest while looking for foreign files).
    """
    ctx = mp.get_context("fork")
    root = Path(tempfile.mkdtemp())
    try:
        for i in range(60):
            barrier, out = ctx.Barrier(8), ctx.Queue()
            procs = [ctx.Process(target=_create, args=(str(root / f"run{i}"), barrier, out)) for _ in range(8)]
            for p in procs:
                p.start()
            results = [out.get(timeout=60) for _ in procs]
            for p in procs:
                p.join()
            assert [r for r in results if r[0] == "error"] == []
            assert len({r[1] for r in results}) == 1  # every rank reads the one winner's manifest
            assert sorted(os.listdir(root / f"run{i}")) == [
                rf.MANIFEST_NAME,
                rf.STATS_DIR,
                rf.TOKENS_DIR,
                rf.WRITERS_DIR,
            ]  # no temporary file left
    finally:
        shutil.rmtree(root)


def test_create_is_idempotent_and_refuses_foreign_directories(tmp_path: Path) -> None:
    first = rf.create_run_dir(tmp_path / "run", RecorderConfig(), 2, "exp")
    again = rf.create_run_dir(tmp_path / "run", RecorderConfig(eps_high=0.28), 4, "other")
    assert again == first and first["name"] == "exp" and first["world_size"] == 2
    assert rf.read_manifest(tmp_path / "run") == first and rf.is_run_dir(tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(rf.RunFormatError, match=r"not an rldiag run \(found notes.txt\)"):
        rf.create_run_dir(tmp_path / "mine", RecorderConfig(), 1, None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        rf.create_run_dir(tmp_path / "file", RecorderConfig(), 1, None)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "corrupt"),
        ("[1, 2]", "not an object"),
        ('{"schema_version": "1"}', "no integer schema_version"),
        ('{"schema_version": 99, "rldiag_version": "9.0"}', "newer than this rldiag"),
        ('{"schema_version": 1, "config": [1]}', "'config' is a list"),
        (" " * (rf.MAX_MANIFEST_BYTES + 1), "larger than"),
    ],
)
def test_bad_manifests_are_refused_with_the_file_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / rf.MANIFEST_NAME).write_text(content)
    with pytest.raises(rf.RunFormatError, match=message) as err:
        rf.read_manifest(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_manifest_says_how_to_make_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="rldiag.Recorder"):
        rf.read_manifest(tmp_path)


# --- writer files and the closed / stalled rules --------------------------------------------------------
def _writer(run: Path, wid: str, **info: object) -> Path:
    (run / rf.WRITERS_DIR).mkdir(parents=True, exist_ok=True)
    rf.write_writer_file(run, wid, {"writer": wid, **info})
    return run / rf.WRITERS_DIR / f"{wid}.json"


def test_writer_files_are_parsed_with_bounds(tmp_path: Path) -> None:
    good = _writer(tmp_path, "a", rank=1, started=5.0, closed=None, host="h", pid=7, first_step=3)
    info = rf.read_writer_file(good)
    assert (info.writer, info.rank, info.started, info.closed, info.pid, info.first_step) == ("a", 1, 5.0, None, 7, 3)
    bad = {
        "rank": _writer(tmp_path, "b", rank=-1),
        "rank_str": _writer(tmp_path, "c", rank="0"),
        "closed": _writer(tmp_path, "d", rank=0, closed="yes"),
        "config": _writer(tmp_path, "e", rank=0, config=[1]),
    }
    (tmp_path / rf.WRITERS_DIR / "f.json").write_text("[]")
    (tmp_path / rf.WRITERS_DIR / "g.json").write_text("{" * 10)
    (tmp_path / rf.WRITERS_DIR / "h.json").write_text(" " * (rf.MAX_MANIFEST_BYTES + 1))
    for p in bad.values():
        with pytest.raises(rf.RunFormatError, match=p.name):
            rf.read_writer_file(p)
    infos, problems = rf.read_writers(tmp_path)
    assert [i.writer for i in infos] == ["a"]
    assert sorted(p.path.name for p in problems if p.path) == [
        "b.json",
        "c.json",
        "d.json",
        "e.json",
        "f.json",
        "g.json",
        "h.json",
    ]
    assert any("larger than" in str(p) for p in problems)


@pytest.mark.parametrize(
    ("counters", "expected"),
    [
        ({"records_lost": 2, "unpublished_at_signal": 5}, (2, 5)),
        ({"records_lost": "2", "unpublished_at_signal": True}, (0, 0)),  # not counts: nothing claimed lost
        ({"records_lost": -3, "unpublished_at_signal": 1.5}, (0, 0)),
        ([1, 2], (0, 0)),
        (None, (0, 0)),
    ],
)
def test_a_writer_files_lost_records_are_read_only_from_counts(tmp_path: Path, counters, expected) -> None:
    """A hand-edited or damaged ``counters`` is read as nothing lost, and the writer file stays readable."""
    info = rf.read_writer_file(_writer(tmp_path, "a", rank=0, counters=counters))
    assert info.records_not_published() == expected


def test_closed_rule_uses_each_ranks_latest_writer(tmp_path: Path) -> None:
    assert not rf.run_closed(tmp_path)  # no writer: open
    _writer(tmp_path, "r0-old", rank=0, started=1.0, closed=2.0)
    _writer(tmp_path, "r1", rank=1, started=1.0, closed=3.0)
    assert rf.run_closed(tmp_path)
    restart = _writer(tmp_path, "r0-new", rank=0, started=10.0, closed=None, host=os.uname().nodename, pid=2**22 + 1)
    assert not rf.run_closed(tmp_path)  # the restarted rank 0 is open again
    assert rf.run_closed(tmp_path, count_gone=True)  # ... but its process is gone from this machine
    info = json.loads(restart.read_text())
    rf.write_writer_file(tmp_path, "r0-new", {**info, "host": "another-machine"})
    assert not rf.run_closed(tmp_path, count_gone=True)  # other hosts cannot be checked: open
    rf.write_writer_file(tmp_path, "r0-new", {**info, "pid": os.getpid()})
    assert not rf.run_closed(tmp_path, count_gone=True)  # this very process is alive


def test_newest_data_time_reads_published_statistics_only(tmp_path: Path) -> None:
    assert rf.newest_data_time(tmp_path) is None
    (tmp_path / rf.STATS_DIR).mkdir()
    seg = tmp_path / rf.STATS_DIR / rf.segment_name("w", 0)
    seg.write_bytes(b"x")
    os.utime(seg, (100.0, 100.0))
    tmp = rf.tmp_path(tmp_path / rf.STATS_DIR / rf.segment_name("w", 1))
    tmp.write_bytes(b"x")  # being written: not data yet
    assert rf.newest_data_time(tmp_path) == 100.0
    assert rf.published_files(tmp_path / rf.STATS_DIR) == [seg]
    assert rf.run_status(closed=False, last_data_time=100.0, now=700.0) == "live"
    assert rf.run_status(closed=False, last_data_time=100.0, now=701.0) == "stalled"
    assert rf.run_status(closed=True, last_data_time=100.0, now=10_000.0) == "finished"
    assert rf.run_status(closed=False, last_data_time=None, now=10_000.0) == "live"


# --- Parquet metadata ------------------------------------------------------------------------------------
def test_file_metadata_round_trips_and_bad_blobs_are_refused() -> None:
    meta = rf.file_metadata("w", 3, RecorderConfig(eps_high=0.28))
    got = rf.read_file_metadata(meta)
    assert got["writer"] == "w" and got["rank"] == 3 and got["config"]["eps_high"] == 0.28
    assert rf.read_file_metadata(None) == {} and rf.read_file_metadata({b"other": b"1"}) == {}
    for blob, message in [
        (b"{", "not JSON"),
        (b"[]", "not an object"),
        (b'{"schema_version": 2}', "newer"),
        (b'{"config": 3}', "not an object"),
        (b'{"config": {"eps_low": -1}}', "RecorderConfig"),
        (b'{"schema_version": true}', "non-integer"),
    ]:
        with pytest.raises(rf.RunFormatError, match=message):
            rf.read_file_metadata({rf.PARQUET_META_KEY: blob})


# --- alerts.jsonl -----------------------------------------------------------------------------------------
def test_alerts_jsonl_one_parser_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / rf.ALERTS_FILE
    assert rf.read_alerts(path) == []
    good = {"event": "firing", "rule": "kl", "fingerprint": "f", "step": 3}
    lines = [
        json.dumps(good),
        "[1]",
        json.dumps({"event": "firing", "rule": "x", "step": 1}),  # no fingerprint
        "x" * (rf.MAX_ALERT_LINE_BYTES + 1),
        json.dumps({**good, "step": 4}),
        '{"event": "fir',
    ]
    path.write_text("\n".join(lines))
    assert [e["step"] for e in rf.read_alerts(path)] == [3, 4]


def test_alert_history_objects_are_whole_per_source_and_read_with_alerts_jsonl(tmp_path: Path) -> None:
    """Where files cannot be appended to, each evaluator keeps alerts/<source>-<n>.jsonl, rewritten whole; the
    reader merges those objects with an old run's alerts.jsonl by time, each source's order kept."""

    def ev(step: int, t: float, rule: str = "kl") -> dict[str, object]:
        return {"event": "firing", "rule": rule, "fingerprint": rule, "step": step, "time": t}

    (tmp_path / rf.ALERTS_FILE).write_text(json.dumps(ev(1, 10.0, "old")) + "\n")
    first = rf.AlertHistoryObjects(tmp_path, "alerts-h-1-a", roll_bytes=150)
    for step, t in ((2, 20.0), (3, 30.0), (4, 40.0)):
        first.append(ev(step, t))
    names = sorted(p.name for p in (tmp_path / rf.ALERTS_DIR).iterdir())
    assert names == ["alerts-h-1-a-0000.jsonl", "alerts-h-1-a-0001.jsonl"]  # rolled: each object stays small
    assert all(p.stat().st_size <= 150 for p in (tmp_path / rf.ALERTS_DIR).iterdir())
    restarted = rf.AlertHistoryObjects(tmp_path, rf.alert_source_id())  # a restart: its own objects
    restarted.append(ev(5, 35.0, "other"))
    (tmp_path / rf.ALERTS_DIR / "alerts-h-9-z-0000.jsonl").write_bytes(b'{"event": "fir')  # torn/foreign
    (tmp_path / rf.ALERTS_DIR / ".hidden.jsonl.tmp").write_bytes(json.dumps(ev(9, 1.0)).encode())
    events = rf.read_alerts(tmp_path / rf.ALERTS_FILE)
    assert [(e["step"], e["rule"]) for e in events] == [(1, "old"), (2, "kl"), (3, "kl"), (5, "other"), (4, "kl")]
    assert rf.alerts_signature(tmp_path)[0][0] == rf.ALERTS_FILE and len(rf.alerts_signature(tmp_path)) == 5
    assert rf.read_alerts(tmp_path / "elsewhere.jsonl") == []  # another file is read alone
    with pytest.raises(ValueError, match="letters"):
        rf.AlertHistoryObjects(tmp_path, "../escape")


def test_alert_history_is_read_by_the_run_format_parser() -> None:
    from rldiag.alerts.engine import read_history

    path = SAMPLES / "healthy" / rf.ALERTS_FILE
    assert read_history(path) == rf.read_alerts(path) and rf.read_alerts(path)


# --- runs written before this module ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [SAMPLES / "healthy", SAMPLES / "collapse", REPO_SAMPLES / "healthy", REPO_SAMPLES / "collapse"],
    ids=lambda p: f"{p.parent.parent.name}-{p.name}",
)
def test_committed_sample_runs_still_open(path: Path) -> None:
    run = rldiag.open_run(path)
    assert run.problems == [] and len(run.steps()) > 10
    assert run.is_closed() and run.newest_data_time() is not None
    info = run.info()
    assert info["resume_points"] and info["problems"] == []
    writers, problems = rf.read_writers(run.path)
    assert writers and problems == []
    assert run.step_metrics()["ratio/mean"].drop_nans().len() == len(run.steps())


def test_restarts_and_gaps_are_described_grouped_and_capped() -> None:
    """A job preempted again and again on many ranks: the ranks that restarted at a step, or lost the same steps,
    are named together, and a long history is cut to ``limit`` lines plus a count."""
    resume = rf.Resume(
        restarts=[{"rank": r, "step": s, "writer": f"w{r}-{s}"} for s in (10, 20, 30) for r in range(8)]
        + [{"rank": 2, "step": 25, "writer": "w2-25"}],
        gaps=[{"rank": r, "from_step": 18, "to_step": 19, "writer": f"w{r}-20"} for r in (5, 1)]
        + [{"rank": 2, "from_step": 24, "to_step": 24, "writer": "w2-25"}],
    )
    assert resume.describe() == [
        "step 10 (8 ranks)",
        "step 20 (8 ranks)",
        "step 25 (rank 2)",
        "step 30 (8 ranks)",
        "steps 18..19 hold no data (rank 1, 5)",
        "steps 24..24 hold no data (rank 2)",
    ]
    assert resume.describe(limit=4)[-1] == "and 2 more (rldiag info lists them)" and len(resume.describe(limit=4)) == 5
    assert resume.describe(limit=6) == resume.describe()


def test_an_alert_computed_from_replaced_records_is_superseded() -> None:
    resume = rf.Resume(restarts=[{"rank": 0, "step": 10, "writer": "w", "started": 1000.0}])
    spike = {"rule": "kl_spike", "metric": "kl/k3", "event": "firing", "step": 12, "time": 900.0}
    assert resume.superseded_alert(spike)  # step 12, notified before the attempt that resumed at 10 began
    assert not resume.superseded_alert({**spike, "time": 1001.0})  # the resumed attempt's own
    assert not resume.superseded_alert({**spike, "step": 9})  # before the restart's step: its records stand
    assert not resume.superseded_alert({**spike, "metric": None, "rule": "stalled_run"})  # the process stalled
    assert not rf.Resume().superseded_alert(spike) and not resume.superseded_alert({"step": "x"})
