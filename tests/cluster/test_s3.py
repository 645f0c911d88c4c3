"""Runs on object storage: a real S3-protocol server (moto) on 127.0.0.1, the same promises as on local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import numpy as np
import pytest

import rldiag
from rldiag import runformat, storage
from rldiag.analysis.io import RunFormatWarning
from rldiag.runformat import RunFormatError, alert_history_where, read_alerts, segment_name
from tests.analysis.test_io import _attempt, _same_metrics, _step_record

ROOT = str(Path(__file__).resolve().parents[2])


def _keys(uri: str) -> list[str]:
    bucket, prefix = uri[len("s3://") :].split("/", 1)
    out = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) + 1 :] for o in out.get("Contents", []))


def _put(uri: str, rel: str, data: bytes) -> None:
    bucket, prefix = uri[len("s3://") :].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def test_a_run_on_s3_reads_as_the_same_run_on_disk(s3_run, tmp_path) -> None:
    for where in (s3_run, tmp_path / "local"):
        _attempt(where, range(5), attempt=0)
    remote, local = rldiag.open_run(s3_run), rldiag.open_run(tmp_path / "local")
    assert str(remote.path) == s3_run and remote.steps() == [0, 1, 2, 3, 4]
    assert remote.step_metrics().equals(local.step_metrics())
    assert remote.step_metrics(from_tokens=True).equals(local.step_metrics(from_tokens=True))
    assert remote.bucket_metrics(by="pos", buckets=4).equals(local.bucket_metrics(by="pos", buckets=4))
    order = ("step", "seq", "pos")
    assert remote.tokens().collect().sort(*order).equals(local.tokens().collect().sort(*order))
    assert remote.is_closed() and remote.newest_data_time() is not None
    keys = _keys(s3_run)
    assert "manifest.json" in keys and not any(k.endswith(".tmp") or "/." in k for k in keys)
    assert {k.split("/")[0] for k in keys} <= {"manifest.json", "stats", "tokens", "writers"}


def test_restart_on_s3_supersedes_like_on_disk(s3_run) -> None:
    _attempt(s3_run, range(4), attempt=0)
    live = rldiag.open_run(s3_run)
    _attempt(s3_run, range(2, 6), attempt=1)
    live.refresh()
    for run in (live, rldiag.open_run(s3_run)):
        assert run.step_metrics()["tokens/count"].to_list() == [64.0] * 6
        assert [(x["from_step"], x["to_step"]) for x in run.info()["superseded"]] == [(2, 3)]


def test_bad_objects_on_s3_are_named_and_skipped(s3_run, bucket) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist|not an rldiag run"):
        rldiag.open_run(f"s3://{bucket}/nothing/here")
    _attempt(s3_run, range(4), attempt=0)
    stats = [k for k in _keys(s3_run) if k.startswith("stats/")]
    _put(s3_run, stats[0], b"PAR1 not really parquet")
    _put(s3_run, "writers/r00009-x-1-1.json", b"[1, 2")
    with pytest.warns(RunFormatWarning, match=stats[0].split("/")[1]):
        run = rldiag.open_run(s3_run)
    assert run.steps() == [2, 3]
    assert any("r00009-x-1-1.json" in p for p in run.info()["problems"])
    manifest = json.loads(storage.location(s3_run + "/manifest.json").read_bytes())
    _put(s3_run, "manifest.json", json.dumps(manifest | {"schema_version": 99}).encode())
    with pytest.raises(ValueError, match="newer than this rldiag"):
        rldiag.open_run(s3_run)
    _put(s3_run, "manifest.json", b"{" + b" " * (2 << 20))
    with pytest.raises(RunFormatError, match="larger than"):
        rldiag.open_run(s3_run)


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import rldiag
    from tests.analysis.test_io import _step_record
    rank, world = int(sys.argv[3]), int(sys.argv[4])
    rec = rldiag.Recorder(sys.argv[1], rank=rank, world_size=world, roll_steps=1, roll_seconds=3600)
    for step in range(int(sys.argv[5])):
        rec.record(step=step, **_step_record(step, 0, rank))
        rec.flush()
        print(step, flush=True)
    rec.close()
""")


@pytest.mark.slow
def test_sigkill_mid_run_on_s3_leaves_only_whole_objects(s3_run, s3_server, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, **s3_server.env)
    proc = subprocess.Popen(
        [sys.executable, str(script), s3_run, ROOT, "0", "1", "100000"], stdout=subprocess.PIPE, text=True, env=env
    )
    flushed = -1
    deadline = time.monotonic() + 120
    while flushed < 5 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            flushed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flushed >= 5
    run = rldiag.open_run(s3_run)
    assert not run.problems and not run.is_closed()
    assert set(range(flushed + 1)) <= set(run.steps())
    assert (run.step_metrics()["tokens/count"] == 64).all()


@pytest.mark.slow
def test_two_ranks_record_one_s3_run_at_once(s3_run, s3_server, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, **s3_server.env)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), s3_run, ROOT, str(r), "2", "6"], env=env, stdout=subprocess.DEVNULL
        )
        for r in range(2)
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    run = rldiag.open_run(s3_run)
    assert run.ranks == [0, 1] and run.is_closed() and not run.problems
    ref = tmp_path / "ref"
    for r in range(2):
        with rldiag.Recorder(ref, rank=r, world_size=2) as rec:
            for s in range(6):
                rec.record(step=s, **_step_record(s, 0, r))
    _same_metrics(run.step_metrics(), rldiag.open_run(ref).step_metrics())
    assert run.manifest["world_size"] == 2


def test_cli_commands_read_s3_runs(s3_run, capsys) -> None:
    from rldiag.cli import main

    _attempt(s3_run, range(3), attempt=0)
    assert main(["info", s3_run]) == 0
    assert "steps        3" in capsys.readouterr().out
    assert main(["summarize", s3_run, "--metrics", "tokens/count", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("step") and out.count("64.0") == 3
    assert main(["summarize", s3_run, "--metrics", "clip/*", "--eps-high", "0.4", "--format", "json"]) == 0
    assert main(["lens", s3_run, "--format", "csv"]) == 0


def test_dashboard_loads_a_live_s3_run_with_bounded_requests_per_tick(s3_run, s3_server) -> None:
    from app.data import RunState

    rec = rldiag.Recorder(s3_run, roll_steps=1)
    rec.record(step=0, **_step_record(0))
    rec.flush()
    state = RunState("exp1", storage.location(s3_run))
    assert state.metrics()["step"].to_list() == [0]

    def tick() -> tuple[int, list[str]]:
        before = len(s3_server.requests())
        new = state.update()
        state.status()
        state.alerts()
        reqs = s3_server.requests()[before:]
        return new.height, reqs

    costs = {}
    for step in range(1, 13):
        rec.record(step=step, **_step_record(step))
        rec.flush()
        n, reqs = tick()
        assert n == 1
        costs[step] = len(reqs)
    idle = [len(tick()[1]) for _ in range(3)]
    rec.close()
    assert state.metrics()["step"].to_list() == list(range(13))
    assert state.tokens_at(5).height == 64
    # the cost of a tick does not grow with the files already read: listings plus the new segment only
    assert costs[12] == costs[2] and idle[0] == idle[1] == idle[2] < costs[12]
    print(
        f"\nS3 requests per dashboard tick: {costs[12]} with one new segment, {idle[0]} with none "
        f"(after {len(list(state.run.token_files()))} segments)"
    )


def test_watch_once_on_an_s3_run(s3_run, capsys) -> None:
    from rldiag.cli import main

    with rldiag.Recorder(s3_run, roll_steps=2) as rec:
        for step in range(6):
            rec.record(step=step, **_step_record(step))
    code = main(["watch", s3_run, "--once", "--quiet"])
    out = capsys.readouterr()
    assert code in (0, 1), out.err
    assert "error" not in out.err.lower()
    assert "rule" in out.out.lower() or out.out.strip()
    assert "alerts.jsonl" not in _keys(s3_run)  # object stores cannot append: whole objects in alerts/ instead
    history = [k for k in _keys(s3_run) if k.startswith("alerts/")]
    assert history and all(k.startswith("alerts/watch-") and k.endswith("-0000.jsonl") for k in history)
    assert rldiag.open_run(s3_run).alerts() == read_alerts(storage.location(s3_run) / "alerts.jsonl")
    # what `rldiag watch` names as the history it resumes from: the objects, not an alerts.jsonl it never wrote
    assert alert_history_where(s3_run) == f"{s3_run}/alerts/"


@pytest.mark.slow
def test_watch_following_an_s3_run_names_its_history_objects(s3_run, s3_server) -> None:
    """`rldiag watch s3://...` in follow mode, as a person runs it: its first line names the history it resumes
    from (the run's alerts/ objects, the only history an object store holds), then SIGTERM ends it cleanly."""
    with rldiag.Recorder(s3_run, roll_steps=2, alerts=True) as rec:  # online alerts leave a history in alerts/
        for step in range(6):
            rec.record(step=step, **_step_record(step))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rldiag", "watch", s3_run, "--interval", "0.5"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("rldiag watch: following"):
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    following = lines[-1]
    assert following.startswith("rldiag watch: following exp1 (step 5 evaluated"), lines
    assert f"events already in {s3_run}/alerts/ are not sent again" in following, following
    assert "alerts.jsonl" not in following
    assert proc.returncode in (0, 1), proc.returncode  # ended by the signal as by Ctrl-C (1: an alert is firing)


def test_dashboard_command_and_catalog_accept_an_s3_uri(s3_run, bucket) -> None:
    import argparse

    from app.data import Catalog
    from rldiag.commands.dashboard import build

    _attempt(s3_run, range(3), attempt=0)
    cat = Catalog(f"s3://{bucket}/runs")
    assert cat.run_ids() == ["exp1"]
    assert cat.state("exp1").metrics()["step"].to_list() == [0, 1, 2]
    args = argparse.Namespace(
        path=s3_run, tokenizer=None, port=8050, poll=2.0, auth=None, host="127.0.0.1", debug=False
    )
    assert build(args) is not None


def test_a_recorder_with_online_alerts_records_to_s3(s3_run) -> None:
    with rldiag.Recorder(s3_run, alerts=True, roll_steps=2) as rec:
        for step in range(4):
            rec.record(step=step, **_step_record(step))
    run = rldiag.open_run(s3_run)
    assert run.steps() == [0, 1, 2, 3] and not run.problems
    assert "alerts.jsonl" not in _keys(s3_run)  # object stores cannot append: whole objects in alerts/ instead


def test_online_alerts_on_s3_do_not_renotify_after_a_restart(s3_run) -> None:
    """Steps 0-14 recorded on S3 (a KL spike at 12), then a restart from the checkpoint of step 10 records 10-19
    with the same spike: the alert that fired before the restart is not notified again (its history is the
    first process's alerts/ object, which the second process reads and never overwrites)."""
    from rldiag.alerts import AlertConfig, load_rules
    from tests.alerts.test_alert_online import record_steps

    rules = load_rules().without("stalled_run")
    seen: list[tuple[str, str, int]] = []
    cfg = AlertConfig(rules=rules, console=False, callbacks=(lambda n: seen.append((n.rule, n.event, n.step)),))
    with rldiag.Recorder(s3_run, alerts=cfg) as rec:
        record_steps(rec, range(15), spike={12})
    assert ("kl_spike", "firing", 12) in seen
    first_objects = [k for k in _keys(s3_run) if k.startswith("alerts/")]
    assert len(first_objects) == 1 and "alerts.jsonl" not in _keys(s3_run)
    first = runformat.read_alerts(storage.location(s3_run) / runformat.ALERTS_FILE)
    assert ("kl_spike", "firing", 12) in [(e["rule"], e["event"], e["step"]) for e in first]
    seen.clear()
    with rldiag.Recorder(s3_run, alerts=cfg) as rec:
        record_steps(rec, range(10, 20), spike={12})
        rec.flush()
        assert rec.alerts is not None and rec.alerts.flush(30.0)
    assert not [e for e in seen if e[0] == "kl_spike" and e[1] == "firing"], seen
    events = runformat.read_alerts(storage.location(s3_run) / runformat.ALERTS_FILE)
    assert events[: len(first)] == first  # the first process's object is untouched
    later = events[len(first) :]
    again = [e for e in later if e["rule"] == "kl_spike" and e["event"] == "firing"]
    assert [(e["step"], e["record_only"]) for e in again] == [(12, True)], later  # for the history only
    assert set(first_objects) < {k for k in _keys(s3_run) if k.startswith("alerts/")}
    shown = [e for e in rldiag.open_run(s3_run).alerts() if e["rule"] == "kl_spike" and e["event"] == "firing"]
    assert [e["step"] for e in shown] == [12]  # once: the replaced attempt's line counts no more
    # the report says where its alerts came from: the run's alerts/ objects, not an alerts.jsonl it never had
    from rldiag.report import summarize_run

    summary = summarize_run(rldiag.open_run(s3_run))
    assert summary.history.startswith("the run's alerts/ (") and "alerts.jsonl" not in summary.history


def test_repair_on_s3_removes_orphans_and_old_temporary_objects(s3_run, capsys) -> None:
    from rldiag.cli import main
    from tests.hostile.test_leftovers import _problems
    from tests.metrics.reference import make_record

    with rldiag.Recorder(s3_run, roll_steps=1, handle_signals=False) as rec:
        rng = np.random.default_rng(0)
        for step in range(3):
            rec.record(step=step, **make_record(rng, 4, 8))
    keys = _keys(s3_run)
    wid = next(k for k in keys if k.startswith("writers/"))[len("writers/") : -len(".json")]
    token = next(k for k in keys if k.startswith("tokens/"))
    bucket, prefix = s3_run[len("s3://") :].split("/", 1)
    body = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{token}")["Body"].read()
    orphan = f"tokens/{segment_name(wid, 99)}"
    _put(s3_run, orphan, body)
    _put(s3_run, "stats/.half.parquet.1.tmp", b"x")
    assert any("orphan token file" in p for p in _problems(s3_run))
    assert main(["info", s3_run, "--repair", "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 file(s)" in out, out
    assert orphan not in _keys(s3_run) and "stats/.half.parquet.1.tmp" not in _keys(s3_run)
    assert set(_keys(s3_run)) == set(keys)  # nothing else touched
    assert rldiag.open_run(s3_run).steps() == [0, 1, 2]


def test_segment_summaries_on_s3_read_as_on_disk(s3_run, tmp_path) -> None:
    """Segments of several records a step carry their write-time summary on S3 too; the first open reads it
    from the footer (fsspec file objects) and gives the bits of the same run on disk."""
    from tests.analysis.test_segment_summary import _record

    for where in (s3_run, tmp_path / "local"):
        _record(where, range(12), micros=4, roll_steps=4)
    remote, local = rldiag.open_run(s3_run), rldiag.open_run(tmp_path / "local")
    assert remote.step_metrics().equals(local.step_metrics())
    assert remote.files.stats_tables == {} and len(remote.files.key_tables) >= 3  # summaries only, no records
    assert remote.stats_table().num_rows == local.stats_table().num_rows == 48


@pytest.mark.parametrize("case", ["no credentials", "no endpoint"])
def test_an_unreachable_store_is_one_line_that_says_what_to_do(tmp_path, case) -> None:
    """No credentials, or an endpoint nothing listens on: one line naming the cause and the setting to fix, exit
    status 2, no traceback (the S3 client's own errors are not OSError, which the commands catch)."""
    pytest.importorskip("s3fs")
    from tests.cluster.conftest import _free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PYTHONPATH=ROOT,
        HOME=str(tmp_path),  # no ~/.aws
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookup
        AWS_MAX_ATTEMPTS="1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}",  # nothing listens there
    )
    if case == "no endpoint":
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    proc = subprocess.run(
        [sys.executable, "-m", "rldiag", "info", "s3://bucket/run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("rldiag info: error: object storage: ")
    if case == "no credentials":
        assert "(NoCredentialsError); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    else:
        assert "(EndpointConnectionError); check AWS_ENDPOINT_URL" in line
