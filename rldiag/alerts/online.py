"""Online evaluation: the recorder hands each completed step's metrics to :class:`OnlineAlerts`.

``observe()`` only enqueues; a background thread runs the :class:`~rldiag.alerts.engine.Engine` and the
sinks, checks for a stalled run between steps and re-notifies alerts that keep firing. On start it resumes
from the run directory: the run's alert history is read (``alerts.jsonl`` of a local run; on object storage,
which cannot append, the objects ``alerts/<source>-<n>.jsonl`` that each evaluator process rewrites whole:
:func:`history_sink`), and the steps already on disk (a resumed run) are replayed silently so baselines and
windows are right and nothing is notified twice.

Wiring (what :class:`rldiag.Recorder` does with its ``alerts=`` argument)::

    from rldiag.alerts import online_from_arg
    alerts = online_from_arg(alerts_arg, run_dir=run_dir, rank=rank, world_size=world_size)  # None: off
    ...
    alerts.check()                      # start of record(): raises StopTraining once a stop alert fired
    alerts.observe_stats(step, table)   # writer thread, per record: its statistics row(s) (pyarrow)
    alerts.close()                      # in Recorder.close()

A step is evaluated when the first record of a later step arrives (or at close): its statistics are merged
exactly, as ``open_run(...).step_metrics()`` would. On a multi-rank run only rank 0 evaluates, from the
statistics every rank publishes in the run directory (complete steps only), so the metrics are the exactly
merged ones; they lag by the writers' publication interval (``RecorderConfig.roll_seconds``).
Trainer integrations that already have metrics can call ``observe(step, {name: value})`` instead.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rldiag import runformat
from rldiag.alerts.engine import Engine, Notification, RuleStatus
from rldiag.alerts.follow import RunFollower
from rldiag.alerts.rules import Rule, RuleSet, coerce_rules
from rldiag.alerts.sinks import (
    AlertmanagerSink,
    CallbackSink,
    ConsoleSink,
    InFlight,
    JsonlSink,
    LoggingSink,
    Notifier,
    Sink,
    SlackSink,
    StopTrainingSink,
    WebhookSink,
)
from rldiag.runformat import ALERTS_FILE, AlertHistoryObjects, alert_source_id, read_alerts
from rldiag.storage import Location, location

__all__ = [
    "AlertConfig",
    "HistoryObjectSink",
    "OnlineAlerts",
    "history_sink",
    "make_online_alerts",
    "online_from_arg",
    "run_label",
]

log = logging.getLogger("rldiag.alerts")


def run_label(run_dir: str | Location | None) -> str:
    """The ``run`` label of a run directory: its base name (stable across machines sharing a filesystem)."""
    if run_dir is None:
        return "run"
    from rldiag import storage

    return storage.location(run_dir).resolve().name or "run"


class HistoryObjectSink(Sink):
    """The run's alert history on object storage: every event of this process in
    ``alerts/<source>-<n>.jsonl``, rewritten whole per event (:class:`rldiag.runformat.AlertHistoryObjects`).

    Object stores cannot append, so each evaluator process keeps its own objects; a restarted one writes new
    ones and reads the old ones as its history (nothing is notified twice).
    """

    name = "history"
    keeps_history = True

    def __init__(self, run_dir: str | Location, source: str | None = None, **kw: Any):
        super().__init__(**kw)
        self.history = AlertHistoryObjects(location(run_dir), source)

    def deliver(self, n: Notification) -> None:
        self.history.append(n.to_json())


def history_sink(run_dir: str | Location, *, kind: str = "alerts") -> Sink:
    """The sink that keeps the run's alert history: appends to ``alerts.jsonl`` on a local run, whole objects
    ``alerts/<kind>-<host>-<pid>-<start>-<n>.jsonl`` on object storage (``kind``: ``alerts`` for the online
    evaluator, ``watch`` for ``rldiag watch``). :func:`rldiag.runformat.read_alerts` reads both."""
    loc = location(run_dir)
    if isinstance(loc, Path):
        return JsonlSink(loc / ALERTS_FILE)
    return HistoryObjectSink(loc, alert_source_id(kind))


@dataclass(frozen=True)
class AlertConfig:
    """What ``Recorder(..., alerts=AlertConfig(...))`` builds. Every field has a working default.

    >>> AlertConfig(rules="my_rules.toml", slack_webhooks=("https://hooks.slack.com/...",),
    ...             stop_on=("critical",))  # doctest: +SKIP
    """

    rules: RuleSet | Sequence[Rule] | str | Path | None = None
    """A rule set, a list of rules, a TOML file laid over the default pack, or None (the default pack)."""
    console: bool | str = True
    """True: one line per event on stderr; "logging": through the ``rldiag.alerts`` logger; False: off."""
    jsonl: bool = True
    """Keep the run's alert history (the dashboard and restarts read it): append to ``<run_dir>/alerts.jsonl``,
    or on object storage write ``alerts/<source>-<n>.jsonl`` objects (:func:`history_sink`)."""
    alertmanager: tuple[str, ...] = ()
    """Alertmanager addresses (``http://127.0.0.1:9093``): alerts posted to its ingest API ``/api/v2/alerts``."""
    dashboard_url: str | None = None
    """The rldiag dashboard's address: Alertmanager alerts link to the run's page at the alert's step."""
    webhooks: tuple[str, ...] = ()
    """URLs that receive the body Alertmanager sends to its webhook receivers (version 4)."""
    slack_webhooks: tuple[str, ...] = ()
    """Slack incoming-webhook URLs."""
    callbacks: tuple[Callable[[Notification], Any], ...] = ()
    """Python functions called with each :class:`Notification` (on their own thread)."""
    sinks: tuple[Sink, ...] = ()
    """Further sink objects."""
    stop_on: tuple[str, ...] = ()
    """Severities ("critical") and/or rule names whose firing stops training (:class:`StopTraining`)."""
    repeat_interval: float | None = None
    """Seconds between re-notifications of a firing alert (default: the rule file's, 4 h)."""
    resume: bool = True
    """Replay the run's steps already on disk before evaluating new ones (a resumed run)."""
    min_severity: str = "info"
    """Network and callback sinks ignore alerts below this severity."""

    def __post_init__(self) -> None:
        for name in ("alertmanager", "webhooks", "slack_webhooks", "callbacks", "sinks", "stop_on"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or callable(value) or isinstance(value, Sink):
                value = (value,)
            object.__setattr__(self, name, tuple(value))

    def build_sinks(self, run_dir: str | Location | None) -> list[Sink]:
        from rldiag.alerts.rules import SEVERITIES

        sinks: list[Sink] = []
        if self.console == "logging":
            sinks.append(LoggingSink())
        elif self.console:
            sinks.append(ConsoleSink())
        if self.jsonl and run_dir is not None:
            sinks.append(history_sink(run_dir))
        sinks += [
            AlertmanagerSink(u, min_severity=self.min_severity, dashboard_url=self.dashboard_url)
            for u in self.alertmanager
        ]
        sinks += [WebhookSink(u, min_severity=self.min_severity) for u in self.webhooks]
        sinks += [SlackSink(u, min_severity=self.min_severity) for u in self.slack_webhooks]
        sinks += [CallbackSink(fn, min_severity=self.min_severity) for fn in self.callbacks]
        sinks += list(self.sinks)
        if self.stop_on:
            sev = [s for s in self.stop_on if s in SEVERITIES]
            rules = [s for s in self.stop_on if s not in SEVERITIES]
            sinks.append(StopTrainingSink(severities=sev, rules=rules))
        return sinks


_CLOSE = object()


@dataclass
class _Drain:
    """Evaluate now what was handed over, the newest step included (:meth:`OnlineAlerts.drain`)."""

    done: threading.Event = field(default_factory=threading.Event)
    ranks_until: float = 0.0
    """Several ranks: until when (``time.monotonic()``) to read the run directory again while a rank's writer
    file does not say closed yet (the other ranks got the same signal and are publishing)."""


@dataclass
class _Obs:
    step: int
    values: dict[str, float]
    time: float


class _Custom(_Obs):
    """Custom scalars of a step (``Recorder.log``), evaluated with that step's statistics."""


@dataclass
class _Stats:
    step: int
    table: Any  # pyarrow.Table of statistics rows (rldiag.stats.table schema)
    time: float


@dataclass
class _Counters:
    observed: int = 0
    dropped: int = 0
    errors: int = 0
    late_records: int = 0
    replayed_steps: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class OnlineAlerts:
    """Evaluates alert rules on a background thread as steps complete.

    >>> alerts = OnlineAlerts(run_dir="runs/exp1")                      # doctest: +SKIP
    >>> alerts.observe(12, {"kl/k3": 0.02, "entropy/mean": 1.3})        # doctest: +SKIP
    >>> alerts.close()                                                  # doctest: +SKIP

    ``rules``: see :class:`AlertConfig`. ``sinks``: None gives a console sink plus ``alerts.jsonl`` in
    ``run_dir`` (when given); a list is used as is. ``clock`` returns wall time in seconds (tests pass a
    fake). ``tick_interval``: how often, between steps, stalls and repeats are checked.
    """

    def __init__(
        self,
        rules: RuleSet | Sequence[Rule] | str | Path | None = None,
        sinks: Sequence[Sink] | None = None,
        run_dir: str | Location | None = None,
        *,
        run: str | None = None,
        repeat_interval: float | None = None,
        resume: bool = True,
        world_size: int = 1,
        queue_size: int = 10_000,
        tick_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.rules = coerce_rules(rules)
        self.run_dir = None if run_dir is None else location(run_dir)
        if sinks is None:
            sinks = AlertConfig().build_sinks(self.run_dir)
        self.notifier = Notifier(sinks)
        self.run = run if run is not None else run_label(self.run_dir)
        self._repeat_interval = repeat_interval
        self._engine = self._reloaded()
        self._resume = resume and self.run_dir is not None
        self.world_size = int(world_size)
        if self.world_size > 1 and self.run_dir is None:
            raise ValueError("a multi-rank OnlineAlerts reads every rank's statistics from run_dir; give run_dir")
        self._follower: RunFollower | None = (
            RunFollower(self.run_dir, self._engine, reload=self._reloaded)
            if self.world_size > 1 and self.run_dir is not None
            else None
        )
        self._last_poll = -math.inf
        self._pending_step: int | None = None
        self._pending_parts: list[Any] = []
        self._pending_custom: dict[str, float] = {}
        self._pending_time = 0.0
        self._metric_names = list(dict.fromkeys(m for r in self.rules for m in r.metrics))
        self._clock = clock
        self._tick_interval = tick_interval
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._inflight = InFlight()
        self._closed = False
        self._close_lock = threading.Lock()
        self.counters = _Counters()
        self._thread = threading.Thread(target=self._work, name="rldiag-alerts", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: AlertConfig, run_dir: str | Location | None, **kw: Any) -> OnlineAlerts:
        """An evaluator with the rules and sinks of ``config``."""
        return cls(
            config.rules,
            config.build_sinks(run_dir),
            run_dir,
            repeat_interval=config.repeat_interval,
            resume=config.resume,
            **kw,
        )

    # ---------------------------------------------------------------- caller side (training thread)
    def observe(self, step: int, metrics: Mapping[str, float]) -> None:
        """Hand one completed step's metrics over; never blocks (a full queue drops and counts)."""
        if self._closed:
            return
        self._enqueue(_Obs(int(step), dict(metrics), self._clock()))

    def observe_custom(self, step: int, values: Mapping[str, float]) -> None:
        """Custom scalars logged at ``step`` (``Recorder.log``): evaluated with the step's statistics by rules
        that name them ``custom:<name>``. Never blocks."""
        if self._closed:
            return
        self._enqueue(_Custom(int(step), {f"custom:{k}": float(v) for k, v in values.items()}, self._clock()))

    def observe_stats(self, step: int, table: Any) -> None:
        """Hand over one record's statistics rows (a pyarrow Table, :mod:`rldiag.stats.table` schema).

        Called by the recorder's writer thread for every record; never blocks. The step is evaluated once
        a record of a later step arrives, or at :meth:`close`.
        """
        if self._closed:
            return
        self._enqueue(_Stats(int(step), table, self._clock()))

    def _enqueue(self, obs: Any) -> None:
        if self._inflight.put(self._queue, obs):
            self.counters.observed += 1
        else:
            self.counters.dropped += 1
            if self.counters.dropped == 1 or self.counters.dropped % 1000 == 0:
                log.warning("rldiag alerts: evaluator queue full; %d steps dropped", self.counters.dropped)

    @property
    def should_stop(self) -> bool:
        """True once a stop-training alert fired (see ``AlertConfig.stop_on``)."""
        return self.notifier.should_stop

    def check(self) -> None:
        """Raise :class:`StopTraining` if a stop-training alert fired; the recorder calls this first thing."""
        self.notifier.check()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every observed step is evaluated and the sinks delivered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._inflight.wait(timeout):
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.notifier.flush(left)

    def drain(self, timeout: float | None = None) -> bool:
        """Evaluate now everything handed over so far and wait until the sinks delivered what it fired; False if
        ``timeout`` seconds pass first.

        What the recorder does when a signal stops the process (``Recorder(handle_signals=True)``, after the
        writer published): a step is otherwise evaluated once a record of a later step arrives, and on several
        ranks the run directory is read every ``tick_interval`` seconds, so the last step before the signal
        would never page. One rank: the newest step is evaluated with the records it has. Several ranks: the run
        directory is read again until every rank's writer file says closed (each rank marks its own on the
        signal), for at most half of ``timeout`` (:data:`rldiag.runformat.RANKS_CLOSE_WAIT` seconds without
        one): the steps every rank published are evaluated, and the last one too once all are closed. Unlike
        :meth:`close`, the evaluator goes on: later steps are evaluated as usual, while records of a step
        already evaluated are not (counted in ``late_records``).
        """
        if self._closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = runformat.RANKS_CLOSE_WAIT if timeout is None else timeout / 2
        marker = _Drain(ranks_until=time.monotonic() + wait)
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not marker.done.wait(left):
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.notifier.flush(left)

    def close(self, timeout: float | None = 10.0) -> None:
        """Evaluate what is queued, mark the run closed (no stall alerts), close the sinks. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(_CLOSE, timeout=timeout)
        except queue.Full:  # pragma: no cover - the worker is wedged
            log.warning("rldiag alerts: evaluator did not drain its queue before close")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(left)
        left = None if deadline is None else max(0.1, deadline - time.monotonic())
        self.notifier.close(left)
        failures = {k: v for k, v in self.notifier.stats().items() if v["failed"] or v["dropped"]}
        if failures or self.counters.dropped or self.counters.errors:
            log.warning(
                "rldiag alerts: closed with failures: sinks=%s dropped_steps=%d evaluator_errors=%d",
                failures,
                self.counters.dropped,
                self.counters.errors,
            )

    def __enter__(self) -> OnlineAlerts:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- inspection
    @property
    def engine(self) -> Engine:
        """The engine evaluating the run (on several ranks, a new one after a restart: :attr:`RunFollower.reload`)."""
        return self._follower.engine if self._follower is not None else self._engine

    def _reloaded(self) -> Engine:
        """An engine that resumes from the run's alert history as it is now (none without a run directory)."""
        history = read_alerts(self.run_dir / ALERTS_FILE) if self.run_dir is not None else []
        return Engine(self.rules, run=self.run, history=history, repeat_interval=self._repeat_interval)

    def status(self) -> dict[str, RuleStatus]:
        """Current state per rule (read from another thread: a consistent-enough snapshot)."""
        return self.engine.status()

    def firing(self) -> list[str]:
        return self.engine.firing()

    def stats(self) -> dict[str, Any]:
        """Counters: observed/dropped steps, evaluator errors, and per-sink sent/failed/dropped/retries."""
        c = self.counters
        return {
            "observed": c.observed,
            "dropped": c.dropped,
            "errors": c.errors,
            "late_records": c.late_records,
            "replayed_steps": c.replayed_steps,
            "last_error": c.last_error,
            "sinks": self.notifier.stats(),
        }

    # ---------------------------------------------------------------- worker thread
    def _done(self) -> None:
        self._inflight.done()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # keep evaluating: one bad step must not silence every later alert
            self.counters.errors += 1
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("rldiag alerts: evaluator error")

    def _work(self) -> None:
        first = self._queue.get()  # wait for the first step: it bounds the replay of a resumed run
        if self._resume and self._follower is None:
            bound = first.step if isinstance(first, (_Obs, _Stats)) else None
            if bound is not None:  # a restart resumes here: what the history holds from here on was replaced
                self.engine.supersede_from(bound)
            self._guard(lambda: self._replay(bound))
        item = first
        while True:
            if item is _CLOSE:
                self._guard(self._finish)
                return
            if isinstance(item, (_Obs, _Stats)):
                self._guard(lambda item=item: self._handle(item))  # type: ignore[misc]
                self._done()
            elif isinstance(item, _Drain):
                self._guard(lambda until=item.ranks_until: self._drain_now(until))  # type: ignore[misc]
                item.done.set()
            self._guard(self._tick)
            try:
                item = self._queue.get(timeout=self._tick_interval)
            except queue.Empty:
                item = None

    def _handle(self, item: _Obs | _Stats) -> None:
        now = self._clock()
        if self._follower is not None:  # multi-rank: the run directory is the source; records are heartbeats
            return
        if isinstance(item, _Obs) and not isinstance(item, _Custom):  # metrics handed over whole: evaluated now
            self._evaluate_pending(now)
            self.notifier.dispatch(self.engine.observe(item.step, item.values, now=now, data_time=item.time))
            return
        if not isinstance(item, _Custom):
            self.notifier.dispatch(self.engine.touch(now=now, data_time=item.time))
        last, pending = self.engine.last_step, self._pending_step
        if (last is not None and item.step <= last) or (pending is not None and item.step < pending):
            # its step was evaluated already (a later step came first, or a drain): cannot be evaluated again
            self.counters.late_records += 1
            return
        if self._pending_step is not None and item.step > self._pending_step:
            self._evaluate_pending(now)
        if self._pending_step is None:
            self._pending_time = item.time
        self._pending_step = item.step
        if isinstance(item, _Custom):  # joins its step's statistics
            self._pending_custom.update(item.values)
        else:
            self._pending_parts.append(item.table)
            self._pending_time = item.time

    def _evaluate_pending(self, now: float) -> None:
        if self._pending_step is None:
            return
        step, parts, t = self._pending_step, self._pending_parts, self._pending_time
        self._pending_step, self._pending_parts = None, []
        values = self._metrics_of(parts) if parts else {}
        values.update(self._pending_custom)
        self._pending_custom = {}
        self.notifier.dispatch(self.engine.observe(step, values, now=now, data_time=t))

    def _metrics_of(self, parts: list[Any]) -> dict[str, float]:
        import pyarrow as pa

        from rldiag.analysis.aggregate import metrics_of
        from rldiag.metrics.registry import REGISTRY

        names = [m for m in self._metric_names if m in REGISTRY]
        frame = metrics_of(pa.concat_tables(parts), names=names)
        row = frame.row(0, named=True)
        return {k: float(v) for k, v in row.items() if k != "step" and v is not None}

    def _tick(self) -> None:
        now = self._clock()
        if self._follower is not None:
            mono = time.monotonic()
            if mono - self._last_poll >= self._tick_interval:  # rescanning the directory is not free
                self._last_poll = mono
                self.notifier.dispatch(self._follower.poll(now, closed=False))
        else:
            self.notifier.dispatch(self.engine.tick(now))

    def _drain_now(self, until: float) -> None:
        now = self._clock()
        if self._follower is not None:
            follower, run_dir = self._follower, self.run_dir
            assert run_dir is not None  # several ranks need a run directory (checked at construction)

            def read() -> bool:  # closed once every rank's writer file says so: then the last step is complete too
                self._last_poll = time.monotonic()
                self.notifier.dispatch(follower.poll(self._clock()))
                return follower.engine.closed

            runformat.read_until_closed(read, run_dir, until)
            return
        self._evaluate_pending(now)

    def _finish(self) -> None:
        now = self._clock()
        if self._follower is not None:
            self.notifier.dispatch(self._follower.poll(now, closed=False))
            self.notifier.dispatch(self.engine.close(now))
            return
        self._evaluate_pending(now)
        self.notifier.dispatch(self.engine.close(now))

    def _replay(self, before: int | None) -> None:
        """Evaluate the steps already in the run directory (older than ``before``) without re-notifying."""
        assert self.run_dir is not None
        if not self.run_dir.exists():
            return
        try:
            import rldiag

            run = rldiag.open_run(self.run_dir)
            steps = run.steps()
        except Exception as exc:  # a new run (no manifest yet) or no reader: nothing to replay
            log.debug("rldiag alerts: nothing to replay in %s (%s)", self.run_dir, exc)
            return
        if before is not None:
            steps = [s for s in steps if s < before]
        if not steps:
            return
        frame = run.step_metrics(steps=steps)
        events = self.engine.update(frame, now=self._clock(), backfill=True)
        self.counters.replayed_steps = len(steps)
        self.notifier.dispatch(events)


def make_online_alerts(
    alerts: Any, run_dir: str | Location | None, *, run: str | None = None, **kw: Any
) -> OnlineAlerts | None:
    """Turn the ``alerts=`` argument of ``Recorder`` into an :class:`OnlineAlerts` (or None).

    - ``None`` / ``False``: no alerts;
    - ``True``: the default pack, console + ``alerts.jsonl`` sinks;
    - a path (str / Path) to a TOML rule file laid over the defaults;
    - a :class:`RuleSet` or a list of :class:`Rule`;
    - an :class:`AlertConfig`;
    - an :class:`OnlineAlerts` (used as is).
    """
    if alerts is None or alerts is False:
        return None
    if isinstance(alerts, OnlineAlerts):
        return alerts
    if alerts is True:
        config = AlertConfig()
    elif isinstance(alerts, AlertConfig):
        config = alerts
    elif isinstance(alerts, (str, Path, RuleSet)) or (
        isinstance(alerts, Sequence) and all(isinstance(r, Rule) for r in alerts)
    ):
        config = AlertConfig(rules=alerts)
    else:
        raise TypeError(
            "alerts= takes True, a rule-file path, a RuleSet, a list of Rule, an AlertConfig or "
            f"an OnlineAlerts; got {type(alerts).__name__}"
        )
    return OnlineAlerts.from_config(config, run_dir, run=run, **kw)


def online_from_arg(
    alerts: Any, *, run_dir: str | Location | None, rank: int = 0, world_size: int = 1, config: Any = None, **kw: Any
) -> OnlineAlerts | None:
    """What ``Recorder(..., alerts=...)`` calls: an evaluator on rank 0, None elsewhere or when off.

    ``alerts`` takes every form :func:`make_online_alerts` accepts. On a multi-rank run rank 0 evaluates
    the exactly merged statistics of all ranks from the run directory. ``config`` (the recorder's
    :class:`~rldiag.config.RecorderConfig`) is accepted for symmetry; the statistics carry their settings.
    """
    if alerts is None or alerts is False or int(rank) != 0:
        return None
    if isinstance(alerts, OnlineAlerts):
        return alerts
    return make_online_alerts(alerts, run_dir, world_size=int(world_size), **kw)
