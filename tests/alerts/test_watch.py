"""`rldiag watch`: once and following, on runs written by a real recorder, posting to a real HTTP server."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.alerts import RuleSet, load_rules, read_history
from rldiag.alerts.sinks import WebhookSink
from rldiag.cli import main
from rldiag.commands.watch import Watcher
from tests.alerts.conftest import Alertmanager, Receiver  # noqa: F401 (fixture type)

ROOT = Path(__file__).resolve().parents[2]


def write_run(
    path: Path, steps: int = 30, *, spike: int | None = 10, collapse_from: int | None = 18, **rec_kw: object
) -> None:
    """A run recorded by rldiag.Recorder: a KL spike at ``spike`` and entropy collapsing from ``collapse_from``."""
    rng = np.random.default_rng(0)
    with rldiag.Recorder(path, **rec_kw) as rec:  # type: ignore[arg-type]
        for s in range(steps):
            old = np.log(rng.uniform(0.05, 0.95, (16, 24))).astype(np.float32)
            lp = np.minimum(old + rng.normal(0, 0.6 if s == spike else 0.01, old.shape), 0).astype(np.float32)
            ent = 0.2 if collapse_from is not None and s >= collapse_from else 1.5
            rec.record(
                step=s,
                logprobs=lp,
                old_logprobs=old,
                advantages=rng.normal(0, 1, 16).astype(np.float32),
                entropy=np.full(old.shape, ent, np.float32),
            )


def test_once_exit_codes_payloads_and_history(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "exp1"
    write_run(run)
    code = main(["watch", str(run), "--once", "--webhook", receiver.url])
    out, err = capsys.readouterr()
    assert code == 1
    assert "run exp1: 30 steps evaluated, last step 29 (closed)" in out  # the recorder closed: every step is complete
    firing_line = next(line for line in out.splitlines() if line.startswith("entropy_collapse "))
    assert "critical" in firing_line and "firing" in firing_line and " 20 " in firing_line
    assert "FIRING critical entropy_collapse run=exp1 step=20" in err
    # history: every episode, the finished kl one marked as replayed
    hist = read_history(run / "alerts.jsonl")
    kl = [(e["event"], e["step"], e["replay"]) for e in hist if e["rule"] == "kl_spike_critical"]
    assert kl == [("firing", 10, True), ("resolved", 11, True)]
    # the webhook got what is firing now, not the finished episodes of the past
    assert receiver.wait_received(1)
    names = sorted(a["labels"]["alertname"] for r in receiver.received for a in r["json"]["alerts"])
    assert names == sorted(e["rule"] for e in hist if e["event"] == "firing" and not e["replay"])
    assert "entropy_collapse" in names and "kl_spike_critical" not in names
    body = next(
        r["json"] for r in receiver.received if r["json"]["alerts"][0]["labels"]["alertname"] == "entropy_collapse"
    )
    a = body["alerts"][0]
    assert body["status"] == a["status"] == "firing" and a["labels"]["run"] == "exp1"
    assert a["labels"]["severity"] == "critical" and a["annotations"]["step"] == "20"
    assert a["annotations"]["metric"] == "entropy/mean" and float(a["annotations"]["value"]) == pytest.approx(0.2)
    # running it again resumes from the history: nothing is sent twice, the state is the same
    n_before = len(receiver.received)
    assert main(["watch", str(run), "--once", "--webhook", receiver.url]) == 1
    assert len(receiver.received) == n_before and len(read_history(run / "alerts.jsonl")) == len(hist)


def test_once_healthy_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "ok"
    write_run(run, spike=None, collapse_from=None)
    assert main(["watch", str(run), "--once", "--no-history", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "firing" not in out and not (run / "alerts.jsonl").exists()


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[rules.kl_spike]\nthreshold = "x"\n')
    run = tmp_path / "r"
    write_run(run, steps=3)
    assert main(["watch", str(run), "--once", "--rules", str(bad)]) == 2
    assert "rule 'kl_spike', field 'threshold'" in capsys.readouterr().err
    assert main(["watch", str(tmp_path / "nope"), "--once"]) == 2
    assert "cannot read run" in capsys.readouterr().err
    assert main(["watch", str(run), "--once", "--webhook", "ftp://x"]) == 2
    assert main(["watch", str(run), "--interval", "0"]) == 2


def test_follow_a_growing_run(tmp_path: Path, receiver: Receiver) -> None:
    run = tmp_path / "live"
    rng = np.random.default_rng(1)
    rules = RuleSet(tuple(r for r in load_rules() if r.name.startswith("kl_spike")))
    rec = rldiag.Recorder(run, roll_steps=1)
    watcher = None
    stop = threading.Event()
    try:

        def record(s: int, drift: float) -> None:
            old = np.log(rng.uniform(0.05, 0.95, (8, 16))).astype(np.float32)
            lp = np.minimum(old + rng.normal(0, drift, old.shape), 0).astype(np.float32)
            rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=rng.normal(0, 1, 8).astype(np.float32))

        record(0, 0.01)
        rec.flush()
        watcher = Watcher(run, rules, [WebhookSink(receiver.url)])
        thread = threading.Thread(target=watcher.follow, args=(0.05, stop), daemon=True)
        thread.start()
        for s in range(1, 8):
            record(s, 0.8 if s == 4 else 0.01)
            rec.flush()
        # step 4 is complete once step 5 is published; the watcher sees it on a later poll
        assert receiver.wait_received(2)
        got = [
            (
                r["json"]["status"],
                r["json"]["alerts"][0]["labels"]["alertname"],
                r["json"]["alerts"][0]["annotations"]["step"],
            )
            for r in receiver.received
        ]
        assert ("firing", "kl_spike_critical", "4") in got
        assert receiver.wait_received(4)
        got = [(r["json"]["status"], r["json"]["alerts"][0]["labels"]["alertname"]) for r in receiver.received]
        assert ("resolved", "kl_spike_critical") in got and ("resolved", "kl_spike") in got
    finally:
        stop.set()
        rec.close()
        if watcher is not None:
            watcher.close(5.0)


class _Flaky:
    """A real run whose ``refresh`` raises ``fail`` while it is set: a store or a mount that goes away."""

    def __init__(self, run: object) -> None:
        self._run = run
        self.fail: BaseException | None = None

    def refresh(self) -> object:
        if self.fail is not None:
            raise self.fail
        return self._run.refresh()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._run, name)


@pytest.mark.parametrize("error", ["OSError", "EndpointConnectionError"])
def test_a_watcher_outlives_a_read_failure_and_catches_up(tmp_path: Path, error: str) -> None:
    """Once it has read the run, a watcher that cannot read it again (network, mount) keeps the reason, evaluates
    nothing from the failed read and tries again at the next poll; then it evaluates what landed meanwhile."""
    if error == "OSError":
        fail: BaseException = OSError(116, "Stale file handle")
    else:
        exceptions = pytest.importorskip("botocore.exceptions")
        fail = exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/run")
    run = tmp_path / "live"
    rng = np.random.default_rng(3)
    rules = RuleSet(tuple(r for r in load_rules() if r.name.startswith("kl_spike")))
    flaky: list[_Flaky] = []

    def open_flaky(where: object) -> _Flaky:
        flaky.append(_Flaky(rldiag.open_run(where)))  # type: ignore[arg-type]
        return flaky[-1]

    with rldiag.Recorder(run, roll_steps=1) as rec:

        def record(s: int, drift: float) -> None:
            old = np.log(rng.uniform(0.05, 0.95, (8, 16))).astype(np.float32)
            lp = np.minimum(old + rng.normal(0, drift, old.shape), 0).astype(np.float32)
            rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=rng.normal(0, 1, 8).astype(np.float32))

        for s in range(4):
            record(s, 0.01)
        rec.flush()
        watcher = Watcher(run, rules, [], open_run=open_flaky, history=False)
        try:
            watcher.poll()
            assert watcher.read_error is None and watcher.engine.last_step == 2  # step 3 waits for a later one
            flaky[0].fail = fail
            for s in range(4, 8):
                record(s, 0.8 if s == 5 else 0.01)
            rec.flush()
            assert watcher.poll() == [] and watcher.engine.last_step == 2
            assert watcher.read_error is not None
            assert ("Stale file handle" if error == "OSError" else "127.0.0.1:9") in watcher.read_error
            flaky[0].fail = None
            events = watcher.poll()
            assert watcher.read_error is None and watcher.engine.last_step == 6
            assert any(e.rule == "kl_spike_critical" and e.step == 5 for e in events)
        finally:
            watcher.close(5.0)
    # before the run was ever read, the same failure is the caller's to report (a setup error, not a blip)

    def broken(where: object) -> object:
        raise fail

    with pytest.raises(type(fail)):
        Watcher(run, rules, [], open_run=broken, history=False).poll()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_subprocess_follows_and_stops_on_sigint_or_sigterm(
    tmp_path: Path, receiver: Receiver, sig: signal.Signals
) -> None:
    # SIGTERM is how a scheduler or a pod's shutdown stops a watcher: it ends like Ctrl-C (sinks flushed, every
    # rule's state printed, the exit status of what is firing), not killed mid-delivery
    run = tmp_path / "sub"
    write_run(run)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rldiag", "watch", str(run), "--interval", "0.2", "--webhook", receiver.url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.wait_received(1, timeout=120)
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "entropy_collapse" in out and "FIRING critical entropy_collapse" in err
    assert "rldiag watch: following sub (step 29 evaluated; firing: " in err and "Ctrl-C stops" in err
    assert f"events already in {run / 'alerts.jsonl'} are not sent again" in err


@pytest.mark.slow
def test_end_to_end_real_training_collapse(tmp_path: Path, receiver: Receiver) -> None:
    """A real tiny PPO training collapses; the watcher posts to a live, a hanging and a failing endpoint."""
    from tests.alerts.alerts_pg_toy import COLLAPSING, train

    run = tmp_path / "collapse"
    log = train(run, dataclasses.replace(COLLAPSING, steps=60))
    assert log[-1]["entropy"] < 0.35 * log[0]["entropy"]  # the training really collapsed
    hanging, failing = Receiver(), Receiver()
    hanging.mode, failing.mode = "hang", "500"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "rldiag",
                "watch",
                str(run),
                "--once",
                "--webhook",
                receiver.url,
                "--webhook",
                hanging.url,
                "--slack-webhook",
                failing.url,
                "--send-timeout",
                "5",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hanging.close()
        failing.close()
    assert proc.returncode == 5, proc.stderr  # a critical alert fires (1) and deliveries failed (4)
    assert "entropy_collapse" in proc.stdout
    assert "sink webhook#2" in proc.stderr or "sink webhook" in proc.stderr  # the hung endpoint is reported
    assert "sink slack" in proc.stderr and "failed" in proc.stderr
    assert receiver.wait_received(1)
    bodies = [r["json"] for r in receiver.received]
    collapse = [b for b in bodies if b["alerts"][0]["labels"]["alertname"] == "entropy_collapse"]
    assert collapse and collapse[0]["status"] == "firing" and collapse[0]["version"] == "4"
    a = collapse[0]["alerts"][0]
    metrics = rldiag.open_run(run).step_metrics()
    step = int(a["annotations"]["step"])
    assert float(a["annotations"]["value"]) == pytest.approx(
        metrics.filter(metrics["step"] == step)["entropy/mean"].item()
    )
    base = float(np.median(metrics["entropy/mean"].to_numpy()[:10]))
    ent = metrics["entropy/mean"].to_numpy()
    assert all(ent[step - i] < 0.3 * base for i in range(3))  # fired after 3 steps below 30% of the baseline
    hist = read_history(run / "alerts.jsonl")
    assert any(e["rule"] == "entropy_collapse" and e["event"] == "firing" for e in hist)
    assert json.dumps(hist)  # the history is plain JSON


def mark_closed(run: Path) -> None:
    """What a recorder's close() leaves in its writer file (``"closed"``: the time it closed)."""
    for w in (run / "writers").glob("*.json"):
        info = json.loads(w.read_text())
        info["closed"] = 1.0
        w.write_text(json.dumps(info))


def test_closed_run_is_fully_evaluated_never_stalls_and_exit_on_close(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "done"
    write_run(run, spike=None, collapse_from=None)
    for w in (run / "writers").glob("*.json"):  # as if the process had died without closing the recorder
        info = json.loads(w.read_text())
        assert info["closed"] is not None  # Recorder.close() marks its writer file
        info["closed"] = None
        w.write_text(json.dumps(info))
    old = 1_000_000.0  # the files are ancient: an open run would be stalled
    for p in (run / "stats").glob("*"):
        os.utime(p, (old, old))
    assert main(["watch", str(run), "--once", "--no-history", "-q"]) == 0  # a warn alert: not a failure by default
    assert "stalled_run                  warn      firing" in capsys.readouterr().out
    assert main(["watch", str(run), "--once", "--no-history", "-q", "--fail-on", "warn"]) == 1
    mark_closed(run)
    assert main(["watch", str(run), "--no-history", "-q", "--exit-on-close", "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "30 steps evaluated, last step 29 (closed)" in out  # once closed, the last step counts too
    assert "stalled_run                  warn      inactive" in out


def test_fail_on_and_delivery_failures_in_the_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit status: 1 when an alert at or above --fail-on fires (default critical), 4 when a delivery
    failed, 5 both; warn-level alerts alone do not fail by default."""
    from tests.alerts.conftest import free_port

    run = tmp_path / "exp1"
    write_run(run)  # entropy_collapse (critical) fires at the end
    base = ["watch", str(run), "--once", "--no-history", "-q"]
    assert main(base) == 1
    assert main([*base, "--fail-on", "never"]) == 0
    warn_rules = tmp_path / "warn.toml"
    warn_rules.write_text('[rules.entropy_collapse]\nseverity = "warn"\n')
    assert main([*base, "--rules", str(warn_rules)]) == 0  # a warn-level alert does not fail a CI job
    assert main([*base, "--rules", str(warn_rules), "--fail-on", "warn"]) == 1
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    capsys.readouterr()
    assert main([*base, "--alertmanager", dead, "--send-timeout", "1"]) == 5
    assert main([*base, "--rules", str(warn_rules), "--alertmanager", dead, "--send-timeout", "1"]) == 4
    err = capsys.readouterr().err
    assert "rldiag watch: sink alertmanager: 0 sent" in err and "Connection refused" in err


def test_watch_is_idempotent_on_a_renamed_copy(tmp_path: Path) -> None:
    """A copy of a run keeps the history written under its old name; watching it appends nothing."""
    import shutil

    run = tmp_path / "exp1"
    write_run(run)
    assert main(["watch", str(run), "--once", "-q"]) == 1
    before = (run / "alerts.jsonl").read_bytes()
    assert before
    copy = tmp_path / "exp1-copy"
    shutil.copytree(run, copy)
    assert main(["watch", str(copy), "--once", "-q"]) == 1
    assert main(["watch", str(copy), "--once", "-q"]) == 1
    assert (copy / "alerts.jsonl").read_bytes() == before


@pytest.mark.slow
def test_watch_once_feeds_a_real_alertmanager(tmp_path: Path, alertmanager: object) -> None:
    """`rldiag watch RUN --once --alertmanager URL`: what fires now is in Alertmanager with its labels;
    finished episodes of the past are not sent."""
    run = tmp_path / "exp1"
    write_run(run)
    code = main(
        [
            "watch",
            str(run),
            "--once",
            "-q",
            "--alertmanager",
            alertmanager.url,  # type: ignore[attr-defined]
            "--dashboard-url",
            "http://127.0.0.1:8050",
        ]
    )
    assert code == 1
    held = {a["labels"]["alertname"]: a for a in alertmanager.alerts()}  # type: ignore[attr-defined]
    assert "entropy_collapse" in held and "kl_spike_critical" not in held
    a = held["entropy_collapse"]
    assert a["labels"] == {
        "alertname": "entropy_collapse",
        "severity": "critical",
        "run": "exp1",
        "group": a["labels"]["group"],
    }
    assert a["annotations"]["step"] == "20" and a["annotations"]["metric"] == "entropy/mean"
    assert a["generatorURL"] == "http://127.0.0.1:8050/tokens?run=exp1&step=20"
