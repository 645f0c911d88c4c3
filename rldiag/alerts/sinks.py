"""Where notifications go. Side effects live here and nowhere else in rldiag.alerts.

- :class:`ConsoleSink` (a line on stderr) and :class:`LoggingSink` (the ``rldiag.alerts`` logger);
- :class:`JsonlSink`: the run's append-only ``alerts.jsonl`` (whole lines, flushed and fsync'ed; the
  dashboard and a restarted evaluator read it);
- :class:`AlertmanagerSink`: Alertmanager's ingest API (``POST /api/v2/alerts``, a bare JSON array of
  alerts), re-sending what is firing before Alertmanager's resolve timeout and ending what resolved;
- :class:`WebhookSink` (the body Alertmanager *sends* to its webhook receivers, for tools that expect that
  format) and :class:`SlackSink` (Slack incoming-webhook text + blocks), each with its own worker thread, a
  bounded queue and retries with exponential backoff;
- :class:`CallbackSink`: a Python function, called on its own worker thread;
- :class:`StopTrainingSink`: sets a flag the recorder turns into :class:`StopTraining` on its next call.

No sink ever blocks the evaluator: network and callback sinks only enqueue (dropping, and counting, when
the queue is full), every failure is counted in :attr:`Sink.stats` and logged, and :meth:`Sink.close`
waits at most its timeout.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

from rldiag.alerts.engine import EVENT_RESOLVED, Notification
from rldiag.alerts.rules import SEVERITIES

_T = TypeVar("_T")

__all__ = [
    "StopTraining",
    "Sink",
    "SinkStats",
    "ConsoleSink",
    "LoggingSink",
    "JsonlSink",
    "QueuedSink",
    "AlertmanagerSink",
    "WebhookSink",
    "SlackSink",
    "CallbackSink",
    "StopTrainingSink",
    "Notifier",
    "alertmanager_alert",
    "alertmanager_payload",
    "slack_payload",
]

log = logging.getLogger("rldiag.alerts")

_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not ended yet"


class StopTraining(RuntimeError):
    """Raised by the recorder on the call after a stop-training alert fired."""

    def __init__(self, message: str, notification: Notification | None = None):
        super().__init__(message)
        self.notification = notification


@dataclass
class SinkStats:
    """Counters of one sink (read them from any thread; they only grow)."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    skipped: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(
            sent=self.sent,
            failed=self.failed,
            dropped=self.dropped,
            retries=self.retries,
            skipped=self.skipped,
            last_error=self.last_error,
        )


class Sink:
    """Base class. Subclasses implement :meth:`deliver`; :meth:`send` applies the filters.

    ``min_severity``: ignore less severe alerts. ``live_only``: ignore replayed episodes (a watcher
    catching up on history). ``events``: which events to pass (firing, repeat, resolved).
    """

    name = "sink"
    keeps_history = False
    """Whether the sink keeps the run's alert history: only such sinks take ``record_only`` notifications."""

    def __init__(
        self,
        *,
        min_severity: str = "info",
        live_only: bool = False,
        events: Iterable[str] = ("firing", "repeat", "resolved"),
    ):
        if min_severity not in SEVERITIES:
            raise ValueError(f"min_severity must be one of {', '.join(SEVERITIES)}, got {min_severity!r}")
        self.min_severity = min_severity
        self.live_only = live_only
        self.events = frozenset(events)
        self.stats = SinkStats()

    def accepts(self, n: Notification) -> bool:
        if self.live_only and n.replay:
            return False
        if n.record_only and not self.keeps_history:
            return False
        if n.event not in self.events:
            return False
        rank = SEVERITIES.index(n.severity) if n.severity in SEVERITIES else len(SEVERITIES)
        return rank >= SEVERITIES.index(self.min_severity)

    def send(self, n: Notification) -> None:
        """Hand one notification to the sink; never raises, never blocks for long."""
        if not self.accepts(n):
            self.stats.skipped += 1
            return
        try:
            self.deliver(n)
            self.stats.sent += 1
        except Exception as exc:  # a sink must never take the evaluator down
            self.stats.failed += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("rldiag alerts: sink %s failed: %s", self.name, self.stats.last_error)

    def deliver(self, n: Notification) -> None:
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over was delivered or given up; False on timeout."""
        return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Release resources; idempotent."""


# --------------------------------------------------------------------------------------------------
# local sinks


def _line(n: Notification) -> str:
    tag = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}[n.event]
    replay = " (replayed)" if n.replay else ""
    return f"[rldiag alert] {tag} {n.severity} {n.rule} run={n.run} step={n.step}{replay}: {n.summary}"


class ConsoleSink(Sink):
    """One line per event on a text stream (default: ``sys.stderr``)."""

    name = "console"

    def __init__(self, stream: TextIO | None = None, **kw: Any):
        super().__init__(**kw)
        self._stream = stream
        self._lock = threading.Lock()

    def deliver(self, n: Notification) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        with self._lock:
            stream.write(_line(n) + "\n")
            stream.flush()


class LoggingSink(Sink):
    """Log through :mod:`logging`: critical -> ERROR, warn -> WARNING, info and resolved -> INFO."""

    name = "logging"

    def __init__(self, logger: logging.Logger | str = "rldiag.alerts", **kw: Any):
        super().__init__(**kw)
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger

    def deliver(self, n: Notification) -> None:
        level = logging.INFO
        if n.event != EVENT_RESOLVED:
            level = {"critical": logging.ERROR, "warn": logging.WARNING}.get(n.severity, logging.INFO)
        self.logger.log(level, "%s", _line(n), extra={"rldiag_alert": n.to_json()})


class JsonlSink(Sink):
    """Append one JSON object per event to ``alerts.jsonl``; never rewrites the file.

    Each event is written with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``: a line
    is whole or absent, and readers skip a torn last line after a crash.
    """

    name = "jsonl"
    keeps_history = True

    def __init__(self, path: str | Path, *, fsync: bool = True, **kw: Any):
        super().__init__(**kw)
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def deliver(self, n: Notification) -> None:
        data = (json.dumps(n.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            fd = self._open()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)

    def close(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# --------------------------------------------------------------------------------------------------
# queued sinks (own thread each)


class _Retry(Exception):
    """A delivery failed in a way worth retrying (network error, 5xx, 429)."""


class InFlight:
    """Count of items handed to a worker thread and not finished yet, with a wait for zero.

    ``put(q, item)`` counts the item and enqueues it without blocking (False, uncounted, when the queue is
    full); the worker calls :meth:`done` per item; :meth:`wait` is the flush barrier.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0

    def put(self, q: queue.Queue[_T], item: _T) -> bool:
        with self._cond:
            self.count += 1
        try:
            q.put_nowait(item)
            return True
        except queue.Full:
            self.done()
            return False

    def done(self) -> None:
        with self._cond:
            self.count -= 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """True once nothing is in flight; False if ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.count > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True


class QueuedSink(Sink):
    """A sink whose deliveries run on its own daemon thread behind a bounded queue.

    ``send`` only enqueues (a full queue drops the event and counts it in ``stats.dropped``); the worker
    retries a failed delivery ``max_retries`` times, waiting ``backoff * 2**attempt`` seconds (at most
    ``max_backoff``) between tries, then counts it in ``stats.failed`` and moves on.
    """

    def __init__(
        self,
        *,
        queue_size: int = 1000,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        **kw: Any,
    ):
        super().__init__(**kw)
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._queue: queue.Queue[Notification | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._inflight = InFlight()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"rldiag-alerts-{self.name}", daemon=True)
        self._thread.start()

    def send(self, n: Notification) -> None:
        if not self.accepts(n):
            self.stats.skipped += 1
            return
        if self._closed:
            self.stats.dropped += 1
            return
        if not self._inflight.put(self._queue, n):
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                log.warning(
                    "rldiag alerts: sink %s queue full, %d notifications dropped so far", self.name, self.stats.dropped
                )

    def _work(self) -> None:
        while True:
            n = self._queue.get()
            if n is None:
                return
            try:
                self._deliver_with_retries(n)
            finally:
                self._inflight.done()

    def _deliver_with_retries(self, n: Notification) -> None:
        attempt = 0
        while True:
            try:
                self.deliver(n)
                self.stats.sent += 1
                return
            except _Retry as exc:
                self.stats.last_error = str(exc)
                if attempt >= self.max_retries or self._stop.is_set():
                    break
                delay = min(self.backoff * (2**attempt), self.max_backoff)
                attempt += 1
                self.stats.retries += 1
                if self._stop.wait(delay):
                    break
            except Exception as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                break
        self.stats.failed += 1
        log.warning(
            "rldiag alerts: sink %s gave up on %s %s after %d attempt(s): %s",
            self.name,
            n.event,
            n.rule,
            attempt + 1,
            self.stats.last_error,
        )

    def flush(self, timeout: float | None = None) -> bool:
        return self._inflight.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop (retries are cut short)."""
        if self._closed:
            return
        self._closed = True
        drained = self.flush(timeout)
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(0.0 if not drained else (1.0 if timeout is None else min(timeout, 1.0)))
        if not drained:
            left = self._inflight.count
            self.stats.dropped += left
            log.warning("rldiag alerts: sink %s closed with %d undelivered notification(s)", self.name, left)

    @property
    def pending(self) -> int:
        """Notifications queued or in flight."""
        return self._inflight.count


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HTTPSink(QueuedSink):
    def __init__(self, url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None, **kw: Any):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"a webhook URL must be http:// or https://, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "rldiag-alerts", **(headers or {})}
        # Loopback targets never go through an environment proxy (it could not reach them anyway).
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        super().__init__(**kw)

    def payload(self, n: Notification) -> dict[str, Any]:
        raise NotImplementedError

    def deliver(self, n: Notification) -> None:
        self._post(self.payload(n))

    def _post(self, obj: object) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                raise _Retry(f"HTTP {exc.code} from {self.url}") from None
            raise RuntimeError(f"HTTP {exc.code} from {self.url}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
            reason = getattr(exc, "reason", exc)
            raise _Retry(f"{type(exc).__name__} posting to {self.url}: {reason}") from None


def alertmanager_payload(n: Notification, *, receiver: str = "rldiag") -> dict[str, Any]:
    """The body Alertmanager *sends* to a webhook receiver (version 4), carrying one alert.

    Alertmanager itself does not accept this: it ingests :func:`alertmanager_alert` objects in a bare JSON
    array (:class:`AlertmanagerSink`).
    """
    doc = n.to_json()
    alert = {
        "status": n.status,
        "labels": dict(n.labels),
        "annotations": {
            **n.annotations,
            "step": str(n.step),
            "start_step": str(n.start_step),
            "value": "" if n.value is None else repr(n.value),
        },
        "startsAt": doc["starts_at"],
        "endsAt": doc["ends_at"] if n.ends_at is not None else _ZERO_TIME,
        "generatorURL": "",
        "fingerprint": n.fingerprint,
    }
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{n.rule}", run="{n.run}"}}',
        "truncatedAlerts": 0,
        "status": n.status,
        "receiver": receiver,
        "groupLabels": {"alertname": n.rule, "run": n.run},
        "commonLabels": dict(n.labels),
        "commonAnnotations": dict(alert["annotations"]),
        "externalURL": "",
        "alerts": [alert],
    }


class WebhookSink(_HTTPSink):
    """POST the body Alertmanager sends to its webhook receivers (``{"version": "4", "status", "alerts": [...]}``)
    to ``url``: for tools that consume Alertmanager's receiver format. To feed Alertmanager itself use
    :class:`AlertmanagerSink`."""

    name = "webhook"

    def __init__(self, url: str, *, live_only: bool = True, **kw: Any):
        super().__init__(url, live_only=live_only, **kw)

    def payload(self, n: Notification) -> dict[str, Any]:
        return alertmanager_payload(n)


_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _label_name(name: str) -> str:
    """A Prometheus/Alertmanager label name (``[a-zA-Z_][a-zA-Z0-9_]*``) for an rldiag label key."""
    out = _LABEL_NAME.sub("_", name) or "_"
    return "_" + out if out[0].isdigit() else out


def dashboard_link(dashboard_url: str, run: str, step: int | None) -> str:
    """The dashboard page of ``run`` at ``step``: ``<dashboard_url>/tokens?run=<run>&step=<step>``."""
    query = [("run", run)] + ([("step", str(step))] if step is not None else [])
    return dashboard_url.rstrip("/") + "/tokens?" + urllib.parse.urlencode(query)


def alertmanager_alert(
    n: Notification,
    *,
    now: float,
    valid_for: float = 240.0,
    dashboard_url: str | None = None,
    extra_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One alert as Alertmanager's ingest API (``POST /api/v2/alerts``) takes it.

    Labels: the rule's labels (``alertname``, ``severity``, ``run``, ``group`` and the rule file's own, with
    ``rank`` among them where a rule sets it) plus ``extra_labels``. A resolved alert ends at its
    resolve time; a firing one ends ``valid_for`` seconds after ``now`` unless it is re-sent before (the
    sink re-sends every ``resend_interval``), as Prometheus does, so a watcher that dies leaves no alert
    firing forever. ``dashboard_url`` adds a ``dashboard`` annotation and the ``generatorURL``: the page of
    the run at the alert's step.
    """
    labels = {_label_name(k): str(v) for k, v in {**n.labels, **(extra_labels or {})}.items()}
    annotations = {k: str(v) for k, v in n.annotations.items() if v not in (None, "")}
    annotations.update(summary=n.summary, step=str(n.step), start_step=str(n.start_step))
    if n.value is not None:
        annotations["value"] = f"{n.value:.6g}"
    if n.threshold is not None:
        annotations["threshold"] = f"{n.threshold:.6g}"
    doc = n.to_json()
    ends = doc["ends_at"] if n.event == EVENT_RESOLVED and n.ends_at is not None else None
    if ends is None:
        ends = datetime.fromtimestamp(now + valid_for, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    alert: dict[str, Any] = {"labels": labels, "annotations": annotations, "startsAt": doc["starts_at"], "endsAt": ends}
    if dashboard_url:
        link = dashboard_link(dashboard_url, n.run, n.step)
        annotations["dashboard"] = link
        alert["generatorURL"] = link
    return alert


def _alertmanager_url(url: str) -> str:
    """``http://host:9093`` or ``http://host:9093/prefix`` -> ``.../api/v2/alerts`` (a full URL is kept)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/api/v2/alerts"):
        path += "/api/v2/alerts"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class AlertmanagerSink(_HTTPSink):
    """Feed Alertmanager through its ingest API: ``POST <url>/api/v2/alerts`` with a JSON array of alerts.

    ``url`` is Alertmanager's address (``http://127.0.0.1:9093``; a URL already ending in
    ``/api/v2/alerts`` is used as is). Firing alerts are re-sent every ``resend_interval`` seconds (default
    60) and each carries ``endsAt = now + valid_for`` (default 4 x ``resend_interval``, below Alertmanager's
    default 5-minute ``resolve_timeout``), so Alertmanager keeps them firing while the watcher lives and
    ends them soon after it stops; a resolved alert is posted with its end time, which resolves it at once.
    Replayed episodes (a watcher catching up on history) are not sent. ``dashboard_url``: the dashboard's
    address, for a link to the run at the alert's step (annotation ``dashboard`` and ``generatorURL``).
    ``extra_labels`` are added to every alert.

    >>> sink = AlertmanagerSink("http://127.0.0.1:9093", dashboard_url="http://127.0.0.1:8050")  # doctest: +SKIP
    """

    name = "alertmanager"

    def __init__(
        self,
        url: str,
        *,
        dashboard_url: str | None = None,
        resend_interval: float = 60.0,
        valid_for: float | None = None,
        extra_labels: Mapping[str, str] | None = None,
        live_only: bool = True,
        clock: Callable[[], float] = time.time,
        **kw: Any,
    ):
        if not resend_interval > 0:
            raise ValueError(f"resend_interval must be positive, got {resend_interval}")
        if dashboard_url is not None:
            dparts = urllib.parse.urlsplit(dashboard_url)
            if dparts.scheme not in ("http", "https") or not dparts.netloc:
                raise ValueError(f"a dashboard URL must be http:// or https://, got {dashboard_url!r}")
        self.dashboard_url = dashboard_url
        self.resend_interval = float(resend_interval)
        self.valid_for = 4.0 * self.resend_interval if valid_for is None else float(valid_for)
        if not self.valid_for > self.resend_interval:
            raise ValueError(f"valid_for ({self.valid_for}) must exceed resend_interval ({self.resend_interval})")
        self.extra_labels = dict(extra_labels or {})
        self.clock = clock
        self.resends = 0
        self._active: dict[str, Notification] = {}
        self._active_lock = threading.Lock()
        super().__init__(_alertmanager_url(url), live_only=live_only, **kw)

    def _alert(self, n: Notification) -> dict[str, Any]:
        return alertmanager_alert(
            n,
            now=self.clock(),
            valid_for=self.valid_for,
            dashboard_url=self.dashboard_url,
            extra_labels=self.extra_labels,
        )

    def deliver(self, n: Notification) -> None:
        with self._active_lock:
            if n.event == EVENT_RESOLVED:
                self._active.pop(n.fingerprint, None)
            else:
                self._active[n.fingerprint] = n
        self._post([self._alert(n)])

    @property
    def active(self) -> list[Notification]:
        """The alerts this sink keeps firing in Alertmanager (re-sent every ``resend_interval``)."""
        with self._active_lock:
            return list(self._active.values())

    def resend(self) -> None:
        """Post every firing alert again (one request; a failure is counted and logged, not retried)."""
        alerts = self.active
        if not alerts:
            return
        try:
            self._post([self._alert(n) for n in alerts])
            self.resends += 1
        except Exception as exc:
            self.stats.failed += 1
            self.stats.last_error = str(exc)
            log.warning("rldiag alerts: sink %s could not re-send %d firing alert(s): %s", self.name, len(alerts), exc)

    def _work(self) -> None:
        due = time.monotonic() + self.resend_interval
        while True:
            try:
                n = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                n = False  # type: ignore[assignment]
            if n is None:
                return
            if n is not False:
                try:
                    self._deliver_with_retries(n)
                finally:
                    self._inflight.done()
            if time.monotonic() >= due and not self._stop.is_set():
                self.resend()
                due = time.monotonic() + self.resend_interval


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_payload(n: Notification) -> dict[str, Any]:
    """A Slack incoming-webhook body: ``text`` (notification fallback) plus Block Kit ``blocks``."""
    tag = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}[n.event]
    value = "n/a" if n.value is None else f"{n.value:.6g}"
    text = f"[{tag}] {n.severity} {n.rule} (run {n.run}, step {n.step}): {n.summary}"
    fields = [
        {"type": "mrkdwn", "text": f"*Run*\n{n.run}"},
        {"type": "mrkdwn", "text": f"*Step*\n{n.step}"},
        {"type": "mrkdwn", "text": f"*Severity*\n{n.severity}"},
        {"type": "mrkdwn", "text": f"*Value*\n`{n.metric or '-'}` = {value}"},
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(f"{tag}: {n.rule}", 150)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(n.summary, 3000)}},
        {"type": "section", "fields": fields},
    ]
    context = f"rldiag · fingerprint {n.fingerprint} · since step {n.start_step}"
    if n.annotations.get("source"):
        context += f" · source: {n.annotations['source']}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(context, 3000)}]})
    return {"text": _clip(text, 3000), "blocks": blocks}


class SlackSink(_HTTPSink):
    """POST a Slack-compatible message (text + blocks) to an incoming-webhook URL."""

    name = "slack"

    def __init__(self, url: str, *, live_only: bool = True, **kw: Any):
        super().__init__(url, live_only=live_only, **kw)

    def payload(self, n: Notification) -> dict[str, Any]:
        return slack_payload(n)


class CallbackSink(QueuedSink):
    """Call ``fn(notification)`` on the sink's own thread (an exception counts as a failure, no retry)."""

    name = "callback"

    def __init__(self, fn: Callable[[Notification], object], *, max_retries: int = 0, **kw: Any):
        if not callable(fn):
            raise TypeError(f"CallbackSink needs a callable, got {type(fn).__name__}")
        self.fn = fn
        super().__init__(max_retries=max_retries, **kw)

    def deliver(self, n: Notification) -> None:
        self.fn(n)


class StopTrainingSink(Sink):
    """Ask the trainer to stop when a matching alert fires.

    Matches firing events whose severity is in ``severities`` or whose rule is in ``rules``. The recorder
    polls :attr:`should_stop` (or calls :meth:`check`) on its next call and raises :class:`StopTraining`;
    a trainer integration can poll :attr:`should_stop` directly and stop gracefully.
    """

    name = "stop"

    def __init__(self, *, severities: Sequence[str] = ("critical",), rules: Sequence[str] = (), **kw: Any):
        kw.setdefault("live_only", True)
        kw.setdefault("events", ("firing", "repeat"))
        super().__init__(**kw)
        bad = [s for s in severities if s not in SEVERITIES]
        if bad:
            raise ValueError(f"unknown severity {bad[0]!r}; use {', '.join(SEVERITIES)}")
        self.severities = frozenset(severities)
        self.rules = frozenset(rules)
        self._flag = threading.Event()
        self.notification: Notification | None = None

    def accepts(self, n: Notification) -> bool:
        if self.live_only and n.replay:
            return False
        return n.event in self.events and (n.severity in self.severities or n.rule in self.rules)

    def deliver(self, n: Notification) -> None:
        if not self._flag.is_set():
            self.notification = n
            self._flag.set()

    @property
    def should_stop(self) -> bool:
        return self._flag.is_set()

    @property
    def reason(self) -> str | None:
        n = self.notification
        return None if n is None else f"alert {n.rule} ({n.severity}) fired at step {n.step}: {n.summary}"

    def check(self) -> None:
        """Raise :class:`StopTraining` if a matching alert fired."""
        if self._flag.is_set():
            raise StopTraining(f"rldiag stopped training: {self.reason}", self.notification)

    def reset(self) -> None:
        self._flag.clear()
        self.notification = None


# --------------------------------------------------------------------------------------------------
# fan-out


class Notifier:
    """Fans notifications out to sinks, at most once per event identity.

    The engine emits each firing/resolved event once per episode; the notifier also drops an event whose
    identity ``(fingerprint, event, start_step, step)`` it already dispatched (a repeat is identified by
    its time as well), so overlapping evaluations cannot double-send.
    """

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)
        self._seen: set[tuple[Any, ...]] = set()
        self.duplicates = 0

    def dispatch(self, events: Iterable[Notification]) -> None:
        for n in events:
            key: tuple[Any, ...] = (n.fingerprint, n.event, n.start_step, n.step)
            if n.event == "repeat":
                key += (n.time,)
            if key in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(key)
            for sink in self.sinks:
                sink.send(n)

    def flush(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for sink in self.sinks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = sink.flush(left) and ok
        return ok

    def close(self, timeout: float | None = 10.0) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for sink in self.sinks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                sink.close(left)
            except Exception as exc:  # pragma: no cover - defensive
                log.warning("rldiag alerts: closing sink %s failed: %s", sink.name, exc)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per sink, keyed ``name`` (``name#2`` for a second sink of the same kind)."""
        out: dict[str, dict[str, Any]] = {}
        for sink in self.sinks:
            key = sink.name
            i = 2
            while key in out:
                key = f"{sink.name}#{i}"
                i += 1
            out[key] = sink.stats.as_dict()
        return out

    @property
    def should_stop(self) -> bool:
        return any(isinstance(s, StopTrainingSink) and s.should_stop for s in self.sinks)

    def check(self) -> None:
        for s in self.sinks:
            if isinstance(s, StopTrainingSink):
                s.check()
