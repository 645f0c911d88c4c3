"""``rldiag watch RUN``: evaluate alert rules on a run directory, once or while it grows.

Follows a run written by this machine or by another one onto a shared filesystem: every ``--interval``
seconds it rescans the run, evaluates the steps completed since (on every rank) and sends what changed to
the sinks. Events are appended to ``RUN/alerts.jsonl`` (the dashboard reads it), which is also the history
a restarted watcher resumes from without notifying twice (a renamed copy of a run keeps its history: nothing
is appended again). ``--once`` evaluates what is there, prints every rule's state and exits.

Exit status: 0 nothing at or above --fail-on is firing and every notification was delivered; 1 an alert at
or above --fail-on (default critical) is firing; 4 a notification could not be delivered (a sink failed or
dropped it); 5 both; 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rldiag import storage
from rldiag.alerts.engine import Engine, Notification, State
from rldiag.alerts.follow import ALERTS_FILE, RunFollower
from rldiag.alerts.online import history_sink, run_label
from rldiag.alerts.rules import SEVERITIES, RuleError, RuleSet, load_rules
from rldiag.alerts.sinks import AlertmanagerSink, ConsoleSink, Notifier, Sink, SlackSink, WebhookSink
from rldiag.cli import RUNS_HELP
from rldiag.commands._util import ReadTrouble, stop_on_signals
from rldiag.runformat import alert_history_where, read_alerts
from rldiag.storage import read_failure

if TYPE_CHECKING:
    import polars as pl

    from rldiag.analysis.io import Run

EXIT_OK = 0
EXIT_FIRING = 1
"""An alert at or above ``--fail-on`` is firing."""
EXIT_DELIVERY = 4
"""A sink failed or dropped a notification (added to EXIT_FIRING: 5 means both)."""
FAIL_ON = (*SEVERITIES, "never")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "watch",
        help="evaluate alert rules on a run, once or as it grows",
        description=(__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run",
        metavar="RUN",
        nargs="+",
        help="runs written by rldiag.Recorder, " + RUNS_HELP,
    )
    p.add_argument("--rules", metavar="FILE", help="TOML rule file laid over the default pack")
    p.add_argument(
        "--alertmanager",
        metavar="URL",
        action="append",
        default=[],
        help="send alerts to Alertmanager's ingest API at URL (e.g. http://127.0.0.1:9093; "
        "POST /api/v2/alerts), re-sent while firing, ended when resolved (repeatable)",
    )
    p.add_argument(
        "--dashboard-url",
        metavar="URL",
        help="the rldiag dashboard's address: Alertmanager alerts link to the run's page at the step",
    )
    p.add_argument(
        "--webhook",
        metavar="URL",
        action="append",
        default=[],
        help="POST the body Alertmanager sends to its webhook receivers (version 4) to URL, for "
        "tools that consume that format; Alertmanager itself takes --alertmanager (repeatable)",
    )
    p.add_argument(
        "--slack-webhook",
        metavar="URL",
        action="append",
        default=[],
        help="POST Slack messages (text + blocks) to an incoming-webhook URL (repeatable)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="evaluate what is there, print the rule states and exit (see the exit status below)",
    )
    p.add_argument(
        "--fail-on",
        choices=FAIL_ON,
        default="critical",
        help="exit 1 when an alert of this severity or above is firing at exit (default critical: "
        "warn-level alerts do not fail a CI job; 'never' ignores alerts)",
    )
    p.add_argument(
        "--interval", metavar="S", type=float, default=10.0, help="seconds between rescans when following (default 10)"
    )
    p.add_argument(
        "--min-severity",
        choices=SEVERITIES,
        default="info",
        help="Alertmanager, webhooks and Slack ignore less severe alerts (default info)",
    )
    p.add_argument(
        "--no-history",
        action="store_true",
        help="neither resume from nor append to RUN/alerts.jsonl (e.g. when the recorder's "
        "online alerts already write it)",
    )
    p.add_argument(
        "--exit-on-close",
        action="store_true",
        help="stop following once the run is closed and fully evaluated (exit status as with --once)",
    )
    p.add_argument(
        "--send-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="at exit, wait at most S seconds for network sinks to deliver (default 30)",
    )
    p.add_argument(
        "--metrics-port",
        metavar="P",
        type=int,
        help="serve each run's latest headline metrics and alert states for Prometheus on "
        "http://127.0.0.1:P/metrics (labelled by run; needs prometheus_client)",
    )
    p.add_argument(
        "--metrics-host",
        metavar="ADDR",
        default="127.0.0.1",
        help="address the metrics endpoint binds (default 127.0.0.1)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no event lines on stderr")
    p.add_argument(
        "--cliff-lam",
        metavar="L",
        type=float,
        help="the run's reward-extrapolation lambda: adds cliff/headroom (from teacher and base "
        "log-probs in the token rows) so the extrapolation_cliff rules can fire",
    )
    p.add_argument(
        "--cliff-threshold",
        metavar="P",
        type=float,
        default=0.9,
        help="teacher modal probability above which a position binds (default 0.9)",
    )
    p.set_defaults(func=run)


class Watcher:
    """Follows one run directory and dispatches what each :meth:`poll` produces.

    ``clock`` gives wall time (tests pass a fake one); ``open_run`` opens the directory (default
    :func:`rldiag.open_run`).
    """

    def __init__(
        self,
        run_dir: str | storage.Location,
        rules: RuleSet,
        sinks: Sequence[Sink],
        *,
        history: bool = True,
        clock: Callable[[], float] = time.time,
        open_run: Callable[[storage.Location], Any] | None = None,
        augment: Callable[[Any, Any], Any] | None = None,
        metrics: Any = None,
    ):
        self.run_dir = storage.location(run_dir)  # a local folder or a URI (s3://...)
        self.rules = rules
        self.history = (self.run_dir / ALERTS_FILE) if history else None
        """The run's alert history this watcher resumes from and appends to (None: --no-history)."""
        reload = self._engine if self.history is not None else None  # without a history all would be sent again
        self.follower = RunFollower(self.run_dir, self._engine(), open_run=open_run, augment=augment, reload=reload)
        self.notifier = Notifier(sinks)
        self.clock = clock
        self.metrics = metrics
        self._served_step: int | None = None
        self.read_error: str | None = None
        """Why the last poll could not read the run (None: it could)."""

    @property
    def engine(self) -> Engine:
        """The engine evaluating the run (a new one after a restart: :attr:`RunFollower.reload`)."""
        return self.follower.engine

    def _engine(self) -> Engine:
        """An engine that resumes from the run's alert history as it is now (nothing in it is sent again)."""
        engine = Engine(self.rules, run=run_label(self.run_dir))
        if self.history is None:
            return engine
        events = own_history(read_alerts(self.history), engine)  # local or a URI
        return Engine(self.rules, run=engine.run, history=events)

    def poll(self) -> list[Notification]:
        """Rescan, evaluate newly complete steps, check for a stall and repeats, dispatch; returns the events.

        A restart of the job seen since the last poll (a later attempt that resumed from a checkpoint) may have
        replaced records this watcher had evaluated: with a history, it evaluates the run again as it now stands,
        as a watcher started now would (nothing already notified is sent again; :attr:`RunFollower.reload`).

        Once the run has been read, a failure to read it again (the network to an object store, a shared
        filesystem that went away) is kept in :attr:`read_error` and the next poll tries again, so that a blip
        does not end a watcher; nothing is evaluated from a failed read. Before that, it raises."""
        try:
            events = self.follower.poll(self.clock())
        except Exception as exc:
            message = read_failure(exc)
            if message is None or self.follower.run is None:
                raise
            self.read_error = message
            return []
        self.read_error = None
        self.notifier.dispatch(events)
        if self.metrics is not None:
            self._serve()
        return events

    def _serve(self) -> None:
        """Hand the last evaluated step's metrics and the rule states to the metrics server."""
        step = self.engine.last_step
        if step is not None and step != self._served_step and self.follower.run is not None:
            self.metrics.update_frame(self.engine.run, self.follower.run.step_metrics(steps=[step]))
            self._served_step = step
        self.metrics.set_alerts(self.engine.run, self.engine.status())

    def follow(self, interval: float, stop: threading.Event, *, exit_on_close: bool = False) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set (or the run is closed, if asked)."""
        while not stop.is_set():
            self.poll()
            if exit_on_close and self.engine.closed:
                return
            stop.wait(interval)

    def close(self, timeout: float | None) -> dict[str, dict[str, Any]]:
        """Wait up to ``timeout`` seconds for the sinks to deliver, close them, return their counters."""
        self.notifier.flush(timeout)
        self.notifier.close(1.0)
        return self.notifier.stats()


def own_history(events: Sequence[Any], engine: Engine) -> list[Any]:
    """The history events of a run as this engine identifies them.

    A run copied or renamed keeps the ``alerts.jsonl`` written under its old name, whose fingerprints
    carry the old ``run`` label: matched by rule name instead, they are recognised, and watching the copy
    appends nothing that is already there.
    """
    names = {r.name for r in engine.rules}
    out = []
    for ev in events:
        rule = ev.get("rule") if isinstance(ev, dict) else None
        if rule in names and ev.get("fingerprint") != engine.fingerprint(rule):
            ev = {**ev, "fingerprint": engine.fingerprint(rule)}
        out.append(ev)
    return out


def exit_status(engine: Engine, stats: dict[str, dict[str, Any]], fail_on: str) -> int:
    """EXIT_FIRING if an alert at or above ``fail_on`` fires, plus EXIT_DELIVERY if a sink failed or dropped."""
    code = EXIT_OK
    if fail_on != "never":
        floor = SEVERITIES.index(fail_on)
        severity = {r.name: r.severity for r in engine.rules}
        if any(SEVERITIES.index(severity.get(name, SEVERITIES[-1])) >= floor for name in engine.firing()):
            code |= EXIT_FIRING
    if any(st["failed"] or st["dropped"] for st in stats.values()):
        code |= EXIT_DELIVERY
    return code


def following_line(w: Watcher) -> str:
    """What a watcher in follow mode says once it has read its run: where it stands and what it does next."""
    e = w.engine
    where = f"step {e.last_step} evaluated" if e.last_step is not None else "no complete step yet"
    firing = ", ".join(e.firing()) or "none"
    history = "" if w.history is None else f"; events already in {alert_history_where(w.run_dir)} are not sent again"
    return (
        f"rldiag watch: following {e.run} ({where}; firing: {firing}{history}); "
        "new steps are evaluated as they land, Ctrl-C stops and prints every rule's state"
    )


def format_status(engine: Engine) -> str:
    """A table of every rule's state, firing rules first."""
    order = {State.FIRING: 0, State.PENDING: 1, State.NODATA: 2, State.RESOLVED: 3, State.INACTIVE: 4}
    rows = sorted(engine.status().values(), key=lambda s: (order[s.state], s.rule))
    head = f"run {engine.run}: {engine.steps_evaluated} steps evaluated"
    head += f", last step {engine.last_step}" if engine.last_step is not None else ", no complete step yet"
    head += " (closed)" if engine.closed else ""
    lines = [head, f"{'RULE':<28} {'SEVERITY':<9} {'STATE':<9} {'SINCE':>6}  VALUE"]
    for s in rows:
        since = str(s.start_step) if s.state == State.FIRING and s.start_step is not None else ""
        value = "" if s.value is None else f"{s.value:.4g}" + (f" ({s.metric})" if s.metric else "")
        lines.append(f"{s.rule:<28} {s.severity:<9} {s.state.value:<9} {since:>6}  {value}")
    return "\n".join(lines)


def cliff_augment(lam: float, threshold: float) -> Callable[[Run, pl.DataFrame], pl.DataFrame]:
    """A frame augmenter joining cliff/headroom and cliff/lambda_star of the frame's steps (from token rows)."""

    def augment(run: Run, frame: pl.DataFrame) -> pl.DataFrame:
        from rldiag.analysis.cliff import HEADROOM, LAMBDA_STAR

        steps = frame["step"].to_list()
        if not steps:
            return frame
        report = run.cliff(lam, threshold, steps=steps).select("step", LAMBDA_STAR, HEADROOM)
        return frame.join(report, on="step", how="left")

    return augment


def build_sinks(args: argparse.Namespace, run_dir: storage.Location | None, *, network: bool = True) -> list[Sink]:
    """The sinks the arguments ask for: network sinks (``run_dir`` None) or the run's own (console, history)."""
    from rldiag.cli import CLIError

    sinks: list[Sink] = []
    if run_dir is None:
        try:
            sinks += [
                AlertmanagerSink(u, min_severity=args.min_severity, dashboard_url=args.dashboard_url)
                for u in args.alertmanager
            ]
            sinks += [WebhookSink(u, min_severity=args.min_severity) for u in args.webhook]
            sinks += [SlackSink(u, min_severity=args.min_severity) for u in args.slack_webhook]
        except ValueError as exc:
            for s in sinks:
                s.close(0.0)
            raise CLIError(str(exc)) from None
        return sinks
    if not args.quiet:
        sinks.append(ConsoleSink(sys.stderr))
    if not args.no_history:  # alerts.jsonl, or whole objects alerts/watch-...jsonl where files cannot be appended
        sinks.insert(0, history_sink(run_dir, kind="watch"))
    return sinks


def run(args: argparse.Namespace) -> int:
    from rldiag.cli import CLIError

    run_dirs = [storage.location(r) for r in args.run]
    labels = [run_label(r) for r in run_dirs]
    if len(set(labels)) != len(labels):
        raise CLIError(
            f"two runs share the name {next(x for x in labels if labels.count(x) > 1)!r}; "
            "alerts and metrics are labelled by the run's folder name"
        )
    if args.interval <= 0:
        raise CLIError(f"--interval must be positive, got {args.interval}")
    try:
        rules = load_rules(args.rules)
    except RuleError as exc:
        raise CLIError(str(exc)) from None
    if args.once:
        import rldiag

        for run_dir in run_dirs:
            try:
                rldiag.open_run(run_dir)
            except (FileNotFoundError, ValueError) as exc:
                raise CLIError(f"cannot read run {run_dir}: {exc}") from None
    augment = None
    if args.cliff_lam is not None:
        if not args.cliff_lam > 0:
            raise CLIError(f"--cliff-lam must be positive, got {args.cliff_lam}")
        augment = cliff_augment(args.cliff_lam, args.cliff_threshold)
    metrics = None
    if args.metrics_port is not None:
        from rldiag.export.prometheus import MetricsServer

        try:
            metrics = MetricsServer(args.metrics_port, args.metrics_host)
        except ImportError as exc:
            raise CLIError(str(exc)) from None
        except OSError as exc:
            raise CLIError(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc}") from None
        print(f"rldiag watch: serving metrics on {metrics.url}", file=sys.stderr)
    shared = build_sinks(args, None)
    watchers = []
    for run_dir in run_dirs:
        own = build_sinks(args, run_dir, network=False)
        watchers.append(
            Watcher(run_dir, rules, own + shared, history=not args.no_history, augment=augment, metrics=metrics)
        )
    stop = threading.Event()
    try:
        if args.once:
            for w in watchers:
                w.poll()
        else:
            for w, run_dir in zip(watchers, run_dirs):
                if not w.follower.ensure_open():
                    print(f"rldiag watch: waiting for a run to appear at {run_dir}", file=sys.stderr)
            announced: set[int] = set()
            trouble = ReadTrouble("rldiag watch", args.interval)
            try:
                with stop_on_signals(stop, "rldiag watch"):
                    while not stop.is_set():
                        for k, w in enumerate(watchers):
                            if stop.is_set():
                                break  # stopping (SIGTERM or Ctrl-C): after the run whose pass was in progress
                            w.poll()
                            trouble.update(str(w.engine.run), w.read_error)
                            if k not in announced and w.follower.run is not None:
                                announced.add(k)
                                if not args.quiet:
                                    print(following_line(w), file=sys.stderr)
                        if args.exit_on_close and all(w.engine.closed for w in watchers):
                            break
                        stop.wait(args.interval)
            except KeyboardInterrupt:
                pass
    finally:
        for w in watchers:
            w.close(args.send_timeout)
        if metrics is not None:
            metrics.close()
    unique: list[Sink] = []
    for w in watchers:
        unique += [s for s in w.notifier.sinks if all(s is not u for u in unique)]
    stats = Notifier(unique).stats()
    print("\n\n".join(format_status(w.engine) for w in watchers))
    for name, st in stats.items():
        if st["failed"] or st["dropped"]:
            print(
                f"rldiag watch: sink {name}: {st['sent']} sent, {st['failed']} failed, {st['dropped']} dropped"
                + (f" (last error: {st['last_error']})" if st["last_error"] else ""),
                file=sys.stderr,
            )
    return max(exit_status(w.engine, stats, args.fail_on) for w in watchers)
