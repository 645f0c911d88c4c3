"""Sinks: jsonl history, Alertmanager and Slack payloads received by a real HTTP server, failures never block."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

import polars as pl
import pytest

from rldiag.alerts import (
    CallbackSink,
    Condition,
    ConsoleSink,
    Engine,
    JsonlSink,
    LoggingSink,
    Notification,
    Notifier,
    Rule,
    RuleSet,
    SlackSink,
    StopTraining,
    StopTrainingSink,
    WebhookSink,
    read_history,
)
from tests.alerts.conftest import Receiver

T0 = 1_700_000_000.0


def episode() -> list[Notification]:
    """A firing, a repeat and a resolve of one critical rule."""
    rule = Rule(
        "kl_spike_critical",
        (Condition("kl/k3", op=">", threshold=0.05, resolve=0.03),),
        severity="critical",
        summary="k3 {value:.3f} > {threshold}",
        doc="why it matters",
        source="Schulman",
        group="kl_spike",
    )
    eng = Engine(RuleSet((rule,)), run="exp1", repeat_interval=60.0)
    f = pl.DataFrame({"step": [10, 11, 12], "kl/k3": [0.01, 0.08, 0.07]})
    evs = eng.update(f, now=T0) + eng.tick(T0 + 60.0)
    evs += eng.update(pl.DataFrame({"step": [13], "kl/k3": [0.01]}), now=T0 + 90.0)
    assert [n.event for n in evs] == ["firing", "repeat", "resolved"]
    return evs


# ---------------------------------------------------------------- local sinks


def test_jsonl_appends_whole_lines_and_never_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "run" / "alerts.jsonl"
    sink = JsonlSink(path)
    evs = episode()
    sink.send(evs[0])
    first = path.read_bytes()
    for n in evs[1:]:
        sink.send(n)
    sink.close()
    data = path.read_bytes()
    assert data.startswith(first) and data.endswith(b"\n") and data.count(b"\n") == 3
    lines = [json.loads(line) for line in data.splitlines()]
    assert [d["event"] for d in lines] == ["firing", "repeat", "resolved"]
    d = lines[0]
    assert d["v"] == 1 and d["rule"] == "kl_spike_critical" and d["status"] == "firing" and d["step"] == 11
    assert d["value"] == 0.08 and d["metric"] == "kl/k3" and d["starts_at"].endswith("Z") and d["ends_at"] is None
    assert lines[2]["ends_at"] is not None and lines[2]["starts_at"] == d["starts_at"]
    assert [Notification.from_json(x) for x in lines] == evs
    # a second sink (another process) appends after what is there
    JsonlSink(path).send(evs[0])
    assert path.read_bytes().startswith(data) and len(read_history(path)) == 4


def test_read_history_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    good = json.dumps(episode()[0].to_json())
    path.write_text(f'{good}\n{{"not": "an event"}}\n[1, 2]\n{good[: len(good) // 2]}')
    assert len(read_history(path)) == 1
    assert read_history(tmp_path / "missing.jsonl") == []


def test_console_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    for n in episode():
        sink.send(n)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[rldiag alert] FIRING critical kl_spike_critical run=exp1 step=11: k3 0.080 > 0.05")
    assert "STILL FIRING" in lines[1] and "RESOLVED" in lines[2]
    with caplog.at_level(logging.INFO, logger="rldiag.alerts"):
        log_sink = LoggingSink()
        for n in episode():
            log_sink.send(n)
    levels = [r.levelno for r in caplog.records if r.name == "rldiag.alerts"]
    assert levels == [logging.ERROR, logging.ERROR, logging.INFO]
    assert caplog.records[0].rldiag_alert["rule"] == "kl_spike_critical"  # type: ignore[attr-defined]


def test_filters_severity_and_replay() -> None:
    buf = io.StringIO()
    evs = episode()
    ConsoleSink(buf, min_severity="critical").send(evs[0])
    s = ConsoleSink(buf, min_severity="critical")
    warn = Notification(**{**evs[0].__dict__, "severity": "warn"})
    s.send(warn)
    assert s.stats.skipped == 1 and buf.getvalue().count("\n") == 1
    live = ConsoleSink(io.StringIO(), live_only=True)
    live.send(Notification(**{**evs[0].__dict__, "replay": True}))
    assert live.stats.skipped == 1 and live.stats.sent == 0


def test_stop_training_sink() -> None:
    stop = StopTrainingSink()
    evs = episode()
    assert not stop.should_stop
    stop.send(Notification(**{**evs[0].__dict__, "replay": True}))  # an old episode does not stop training
    assert not stop.should_stop
    stop.send(evs[0])
    assert stop.should_stop and "kl_spike_critical" in (stop.reason or "")
    with pytest.raises(StopTraining) as info:
        stop.check()
    assert info.value.notification == evs[0]
    by_rule = StopTrainingSink(severities=(), rules=("other",))
    by_rule.send(evs[0])
    assert not by_rule.should_stop


def test_notifier_dedups_and_isolates_failures() -> None:
    got: list[str] = []

    class Broken(ConsoleSink):
        def deliver(self, n: Notification) -> None:
            raise OSError("disk full")

    broken = Broken(io.StringIO())
    buf = io.StringIO()
    notifier = Notifier([broken, ConsoleSink(buf)])
    evs = episode()
    notifier.dispatch(evs)
    notifier.dispatch(evs)  # the same events again: not sent twice
    got = buf.getvalue().splitlines()
    assert len(got) == 3 and notifier.duplicates == 3
    assert broken.stats.failed == 3 and "disk full" in (broken.stats.last_error or "")
    assert notifier.stats()["console"]["failed"] == 3 and notifier.stats()["console#2"]["sent"] == 3


# ---------------------------------------------------------------- network sinks against a real server


def test_webhook_alertmanager_payload_field_by_field(receiver: Receiver) -> None:
    sink = WebhookSink(receiver.url)
    evs = episode()
    for n in evs:
        sink.send(n)
    assert sink.flush(20.0)
    sink.close()
    assert receiver.wait_received(3)
    assert sink.stats.sent == 3 and sink.stats.failed == 0
    bodies = [r["json"] for r in receiver.received]
    assert all(r["path"] == "/hook" and r["headers"]["Content-Type"] == "application/json" for r in receiver.received)
    fire, repeat, resolve = bodies
    assert fire["version"] == "4" and fire["status"] == "firing" and fire["receiver"] == "rldiag"
    assert fire["groupLabels"] == {"alertname": "kl_spike_critical", "run": "exp1"}
    (a,) = fire["alerts"]
    assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert a["status"] == "firing"
    assert a["labels"] == {"alertname": "kl_spike_critical", "severity": "critical", "run": "exp1", "group": "kl_spike"}
    assert a["annotations"]["summary"] == "k3 0.080 > 0.05"
    assert a["annotations"]["description"] == "why it matters" and a["annotations"]["source"] == "Schulman"
    assert a["annotations"]["step"] == "11" and a["annotations"]["metric"] == "kl/k3"
    assert a["startsAt"] == "2023-11-14T22:13:20.000Z" and a["endsAt"] == "0001-01-01T00:00:00Z"
    assert a["fingerprint"] == evs[0].fingerprint
    assert repeat["status"] == "firing" and repeat["alerts"][0]["startsAt"] == a["startsAt"]
    (r,) = resolve["alerts"]
    assert resolve["status"] == "resolved" and r["status"] == "resolved"
    assert r["startsAt"] == a["startsAt"] and r["endsAt"] == "2023-11-14T22:14:50.000Z"
    assert r["fingerprint"] == a["fingerprint"]


def test_slack_payload_text_and_blocks(receiver: Receiver) -> None:
    sink = SlackSink(receiver.url)
    evs = episode()
    sink.send(evs[0])
    sink.send(evs[2])
    assert sink.flush(20.0) and receiver.wait_received(2)
    sink.close()
    fire, resolve = (r["json"] for r in receiver.received)
    assert fire["text"] == "[FIRING] critical kl_spike_critical (run exp1, step 11): k3 0.080 > 0.05"
    header, summary, fields, context = fire["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": "FIRING: kl_spike_critical"}}
    assert summary["text"] == {"type": "mrkdwn", "text": "k3 0.080 > 0.05"}
    assert [f["text"] for f in fields["fields"]] == [
        "*Run*\nexp1",
        "*Step*\n11",
        "*Severity*\ncritical",
        "*Value*\n`kl/k3` = 0.08",
    ]
    assert context["type"] == "context" and evs[0].fingerprint in context["elements"][0]["text"]
    assert resolve["text"].startswith("[RESOLVED] critical kl_spike_critical (run exp1, step 13)")


def test_webhook_500_is_retried_then_counted_as_failed(receiver: Receiver) -> None:
    receiver.mode = "500"
    sink = WebhookSink(receiver.url, max_retries=2, backoff=0.01)
    sink.send(episode()[0])
    assert sink.flush(20.0)
    assert receiver.requests == 3 and sink.stats.retries == 2 and sink.stats.failed == 1 and sink.stats.sent == 0
    assert "HTTP 500" in (sink.stats.last_error or "")
    receiver.mode = "ok"  # the endpoint recovers: the next notification goes through
    sink.send(episode()[2])
    assert sink.flush(20.0) and receiver.wait_received(1)
    assert sink.stats.sent == 1
    sink.close()


def test_webhook_4xx_is_not_retried(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            hits.append(1)
            self.send_response(400)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sink = WebhookSink(f"http://127.0.0.1:{srv.server_address[1]}/", max_retries=3, backoff=0.01)
        sink.send(episode()[0])
        assert sink.flush(20.0)
        assert len(hits) == 1 and sink.stats.failed == 1 and sink.stats.retries == 0
        sink.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_refused_connection_is_retried() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    sink = WebhookSink(f"http://127.0.0.1:{port}/", max_retries=1, backoff=0.01)
    sink.send(episode()[0])
    assert sink.flush(20.0)
    assert sink.stats.failed == 1 and sink.stats.retries == 1
    sink.close()


def test_hanging_webhook_never_blocks_the_sender(receiver: Receiver) -> None:
    receiver.mode = "hang"
    sink = WebhookSink(receiver.url, queue_size=2, timeout=30.0)
    evs = episode()
    sink.send(evs[0])
    assert receiver.wait_requests(1)  # the worker is stuck inside the request now
    for _ in range(5):  # every send returns at once; what does not fit the queue is dropped and counted
        sink.send(evs[1])
    assert sink.stats.dropped == 3 and sink.pending == 3
    assert not sink.flush(0.05)
    sink.close(timeout=0.05)  # close gives up after its timeout; it does not wait for the hung server
    assert sink.stats.dropped >= 3
    receiver.release.set()


def test_callback_sink_runs_off_thread_and_counts_errors() -> None:
    seen: list[tuple[str, str]] = []

    def cb(n: Notification) -> None:
        seen.append((n.event, threading.current_thread().name))
        if n.event == "repeat":
            raise ValueError("boom")

    sink = CallbackSink(cb)
    for n in episode():
        sink.send(n)
    assert sink.flush(20.0)
    sink.close()
    assert [e for e, _ in seen] == ["firing", "repeat", "resolved"]
    assert all(name.startswith("rldiag-alerts-callback") for _, name in seen)
    assert sink.stats.sent == 2 and sink.stats.failed == 1 and "boom" in (sink.stats.last_error or "")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/", "hooks.slack.com/x", ""])
def test_webhook_url_must_be_http(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookSink(url)


# --------------------------------------------------------------------------------------------------
# Alertmanager's ingest API, against the real Alertmanager (Debian's prometheus-alertmanager)


def _kl_rule_engine(run: str = "exp-am") -> Engine:
    rule = Rule(
        "kl_spike_critical",
        (Condition("kl/k3", op=">", threshold=0.05, resolve=0.03),),
        severity="critical",
        summary="k3 {value:.3f} > {threshold} at step {step}",
        doc="why it matters",
        source="Schulman",
        group="kl_spike",
        labels={"rank": "0"},
    )
    return Engine(RuleSet([rule]), run=run)


def _held(am: object, name: str) -> list[dict]:  # type: ignore[type-arg]
    return [a for a in am.alerts() if a["labels"].get("alertname") == name]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_alertmanager_sink_fires_resolves_and_is_silenced(alertmanager: object) -> None:
    import time

    from rldiag.alerts.sinks import AlertmanagerSink
    from tests.alerts.conftest import http_json

    am = alertmanager
    sink = AlertmanagerSink(am.url, dashboard_url="http://127.0.0.1:8050", resend_interval=0.5)  # type: ignore[attr-defined]
    assert sink.url == f"{am.url}/api/v2/alerts"  # type: ignore[attr-defined]
    eng, notifier = _kl_rule_engine(), Notifier([sink])
    now = time.time()
    notifier.dispatch(eng.update(pl.DataFrame({"step": [1, 2, 3], "kl/k3": [0.01, 0.02, 0.09]}), now=now))
    assert notifier.flush(10) and sink.stats.failed == 0, sink.stats
    held = _held(am, "kl_spike_critical")
    assert len(held) == 1, am.alerts()  # type: ignore[attr-defined]
    a = held[0]
    assert a["labels"] == {
        "alertname": "kl_spike_critical",
        "severity": "critical",
        "run": "exp-am",
        "group": "kl_spike",
        "rank": "0",
    }
    assert a["annotations"]["summary"] == "k3 0.090 > 0.05 at step 3"
    assert a["annotations"]["description"] == "why it matters" and a["annotations"]["step"] == "3"
    link = "http://127.0.0.1:8050/tokens?run=exp-am&step=3"
    assert a["annotations"]["dashboard"] == link and a["generatorURL"] == link
    assert a["status"]["state"] == "active"
    # firing alerts are re-sent before they would expire: endsAt moves forward
    first_end = a["endsAt"]
    deadline = time.monotonic() + 10
    while sink.resends < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sink.resends >= 2 and _held(am, "kl_spike_critical")[0]["endsAt"] > first_end
    # a silence set through Alertmanager's API silences it
    sil = http_json(
        "POST",
        f"{am.url}/api/v2/silences",
        {  # type: ignore[attr-defined]
            "matchers": [
                {"name": "alertname", "value": "kl_spike_critical", "isRegex": False, "isEqual": True},
                {"name": "run", "value": "exp-am", "isRegex": False, "isEqual": True},
            ],
            "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1)),
            "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)),
            "createdBy": "rldiag tests",
            "comment": "silenced by the test",
        },
    )
    a = _held(am, "kl_spike_critical")[0]
    assert a["status"]["state"] == "suppressed" and a["status"]["silencedBy"] == [sil["silenceID"]]
    # the rule resolves: the alert ends in Alertmanager
    notifier.dispatch(eng.update(pl.DataFrame({"step": [4, 5], "kl/k3": [0.02, 0.01]}), now=time.time()))
    assert notifier.flush(10) and sink.stats.failed == 0
    assert sink.active == []
    time.sleep(0.2)
    assert _held(am, "kl_spike_critical") == []
    sink.close(2)


@pytest.mark.slow
def test_alertmanager_rejects_the_receiver_format_but_takes_ours(alertmanager: object) -> None:
    """The receiver-format body (what --webhook posts) is refused by the ingest API: 400, counted as failed."""
    import time

    from rldiag.alerts.sinks import AlertmanagerSink

    eng = _kl_rule_engine("exp-wh")
    events = eng.update(pl.DataFrame({"step": [1], "kl/k3": [0.09]}), now=time.time())
    wrong = WebhookSink(f"{alertmanager.url}/api/v2/alerts", max_retries=0)  # type: ignore[attr-defined]
    right = AlertmanagerSink(alertmanager.url)  # type: ignore[attr-defined]
    Notifier([wrong, right]).dispatch(events)
    assert wrong.flush(10) and right.flush(10)
    assert wrong.stats.failed == 1 and "HTTP 400" in (wrong.stats.last_error or "")
    assert right.stats.sent == 1 and right.stats.failed == 0
    assert len(_held(alertmanager, "kl_spike_critical")) == 1
    wrong.close(1)
    right.close(1)
