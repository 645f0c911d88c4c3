"""The alert engine: a pure state machine per (run, rule), fed one step of metrics at a time.

States follow Prometheus alerting rules::

    inactive ──trip──▶ pending ──met──▶ firing ──clear for N steps──▶ resolved ──trip──▶ pending ...
         └──────────────met (for = 1)────▶┘

plus *no-data*: while a run is stalled (no new step for ``stall_after`` seconds while open), every metric
rule reports ``nodata`` and the stall rule fires.

:func:`advance` is the pure transition ``(rule, state, step, values) -> (state, transition)``; the
:class:`Engine` keeps one state per rule, turns transitions into :class:`Notification` events with
fingerprints, labels and summaries, re-notifies while firing (``repeat_interval``, wall time taken from the
``now`` argument so tests are deterministic) and resumes from a run's alert history: steps are replayed and
events already in the history are not sent again.

A metric value that is NaN (or absent) is *missing*: the rule skips that step (it neither counts toward
``for`` nor clears a firing alert). ``ratio/nonfinite`` counts the non-finite tokens, so NaNs in the data
fire the ``nonfinite`` rule even though NaN values of a metric never fire anything.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from rldiag.alerts.rules import (
    CUSTOM_PREFIX,
    ON_POLICY_METRICS,
    TOKEN_COUNT_METRIC,
    Condition,
    Rule,
    RuleSet,
    coerce_rules,
    render_template,
)
from rldiag.runformat import read_alerts

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl

__all__ = [
    "State",
    "ConditionState",
    "RuleState",
    "Transition",
    "Notification",
    "RuleStatus",
    "Engine",
    "advance",
    "initial_state",
    "read_history",
    "fingerprint",
]

EventName = Literal["firing", "resolved", "repeat"]
EVENT_FIRING: Final = "firing"
EVENT_RESOLVED: Final = "resolved"
EVENT_REPEAT: Final = "repeat"
HISTORY_VERSION = 1

_DEFAULT_METRIC = "{rule}: {metric} = {value:.4g} at step {step}"
_DEFAULT_STALL = "{rule}: no new step after step {step}"
_RESOLVED_METRIC = "resolved at step {step}: {rule} (firing since step {start_step}); {metric} = {value:.4g}"
_RESOLVED_STALL = "resolved: {rule} (new steps arrived or the run closed; stalled after step {step})"


class State(str, enum.Enum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"
    NODATA = "nodata"

    def __str__(self) -> str:
        return self.value


# --------------------------------------------------------------------------------------------------
# pure per-rule state machine


@dataclass(frozen=True)
class ConditionState:
    """What one condition remembers between steps (all tuples: states are values)."""

    recent: tuple[float, ...] = ()
    """Previous values, for rolling medians (``window``) and trends (``steps``)."""
    trips: tuple[bool, ...] = ()
    """Trip flags of the last ``within`` evaluated steps."""
    baseline_values: tuple[float, ...] = ()
    baseline: float | None = None


@dataclass(frozen=True)
class RuleState:
    state: State = State.INACTIVE
    conditions: tuple[ConditionState, ...] = ()
    met: tuple[bool, ...] = ()
    """Rule-level window: was the combined condition met, for the last ``within`` evaluated steps."""
    clear_streak: int = 0
    pending_since: int | None = None
    start_step: int | None = None
    end_step: int | None = None
    last_step: int | None = None
    last_value: float | None = None
    last_metric: str | None = None
    last_threshold: float | None = None
    last_reference: float | None = None


@dataclass(frozen=True)
class Transition:
    """A notifying state change of one rule at one step."""

    event: Literal["firing", "resolved"]
    step: int
    start_step: int
    value: float | None
    metric: str | None
    threshold: float | None
    resolve: float | None
    reference: float | None
    op: str | None
    summary: str = ""
    """The deciding condition's own sentence (``Condition.summary``), else empty: the rule's is used."""


@dataclass(frozen=True)
class _Result:
    evaluated: bool
    trip: bool = False
    met: bool = False
    hold: bool = False
    value: float = math.nan
    threshold: float | None = None
    resolve: float | None = None
    reference: float | None = None


def initial_state(rule: Rule) -> RuleState:
    return RuleState(conditions=tuple(ConditionState() for _ in rule.conditions))


def _cmp(value: float, op: str, threshold: float) -> bool:
    if op == ">":
        return value > threshold
    if op == ">=":
        return value >= threshold
    if op == "<":
        return value < threshold
    return value <= threshold


def _eval_condition(
    cond: Condition, cs: ConditionState, value: float, tokens: float = math.nan
) -> tuple[ConditionState, _Result]:
    if math.isnan(value) or (cond.kind != "threshold" and not math.isfinite(value)):
        return cs, _Result(False)
    ref: float | None = None
    if cond.kind == "threshold":
        thr, res = cond.threshold, cond.resolve_threshold
        trip = _cmp(value, cond.op, thr)
        hold = _cmp(value, cond.op, res)
    elif cond.kind in ("baseline", "rolling"):
        if cond.kind == "baseline":
            if cs.baseline is None:
                vals = cs.baseline_values + (value,)
                if len(vals) >= cond.baseline_steps:
                    cs = replace(cs, baseline_values=(), baseline=statistics.median(vals))
                else:
                    cs = replace(cs, baseline_values=vals)
                return cs, _Result(False, value=value)
            ref = cs.baseline
        else:
            prev = cs.recent
            cs = replace(cs, recent=(prev + (value,))[-cond.window :])
            if len(prev) < cond.needed_periods:
                return cs, _Result(False, value=value)
            ref = statistics.median(prev)
        thr, res = cond.threshold * ref, cond.resolve_threshold * ref
        above_floor = cond.floor is None or _cmp(value, cond.op, cond.floor)
        trip = _cmp(value, cond.op, thr) and above_floor
        hold = _cmp(value, cond.op, res) and above_floor
        if cond.floor is not None:  # the effective bounds: a multiple of a reference of 0 is not "threshold 0"
            pick = max if cond.op in (">", ">=") else min
            thr, res = pick(thr, cond.floor), pick(res, cond.floor)
    else:  # trend
        hist = cs.recent + (value,)
        cs = replace(cs, recent=hist[-cond.steps :])
        if len(hist) < cond.steps + 1:
            return cs, _Result(False, value=value)
        hist = hist[-(cond.steps + 1) :]
        sign = 1.0 if cond.direction == "rising" else -1.0
        first, last = hist[0], hist[-1]
        if cond.mode == "monotone":
            moved = all(sign * (b - a) > 0 for a, b in zip(hist, hist[1:]))
            hold = sign * (hist[-1] - hist[-2]) > 0
        else:
            moved = sign * (last - first) > 0
            hold = moved
        enough = abs(last - first) >= cond.min_change * abs(first)
        if cond.floor is not None:  # the level must matter too: a rising trend of a negligible value is noise
            enough = enough and (last >= cond.floor if sign > 0 else last <= cond.floor)
        trip = moved and enough
        thr, res, ref = first, None, first
    if cond.min_tokens and math.isfinite(tokens) and not abs(value) * tokens >= cond.min_tokens:
        trip = hold = False  # a share of a handful of tokens: noise (an absent count leaves the test as it is)
    trips = (cs.trips + (trip,))[-cond.n :]
    cs = replace(cs, trips=trips)
    met = sum(trips) >= cond.for_
    return cs, _Result(
        True, trip=trip, met=met, hold=hold or trip, value=value, threshold=thr, resolve=res, reference=ref
    )


def _value(values: Mapping[str, float], name: str) -> float:
    """``values[name]`` as a float; NaN when absent or not a number."""
    raw = values.get(name, math.nan)
    try:
        return float(raw) if raw is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def advance(
    rule: Rule, state: RuleState, step: int, values: Mapping[str, float]
) -> tuple[RuleState, Transition | None]:
    """One step of one rule: the new state and the notifying transition, if any. Pure.

    ``values`` maps metric names to floats; an absent name or NaN is missing. Steps must be fed in
    increasing order (the :class:`Engine` ensures it).
    """
    if rule.kind != "metric":
        raise ValueError(f"rule {rule.name!r} is a {rule.kind} rule; advance() evaluates metric rules")
    conds: list[ConditionState] = []
    results: list[_Result] = []
    on_policy = rule.skip_on_policy and all(_value(values, m) == 1.0 for m in ON_POLICY_METRICS)
    tokens = _value(values, TOKEN_COUNT_METRIC)
    for cond, cs in zip(rule.conditions, state.conditions):
        value = math.nan if on_policy else _value(values, cond.metric)  # an on-policy step is a missing one
        cs, res = _eval_condition(cond, cs, value, tokens)
        conds.append(cs)
        results.append(res)
    state = replace(state, conditions=tuple(conds), last_step=step)
    evaluated = [(c, r) for c, r in zip(rule.conditions, results) if r.evaluated]
    if not evaluated or (rule.match == "all" and len(evaluated) < len(results)):
        return state, None
    combine = any if rule.match == "any" else all
    met_now = combine(r.met for _, r in evaluated)
    trip_now = combine(r.trip for _, r in evaluated)
    hold_now = combine(r.hold for _, r in evaluated)
    window = (state.met + (met_now,))[-rule.n :]
    rule_met = sum(window) >= rule.for_
    # Report the condition that matters: the first met, else the first tripping, else the first evaluated.
    cond, shown = next(
        ((c, r) for c, r in evaluated if r.met), next(((c, r) for c, r in evaluated if r.trip), evaluated[0])
    )
    state = replace(
        state,
        met=window,
        last_value=shown.value,
        last_metric=cond.metric,
        last_threshold=shown.threshold,
        last_reference=shown.reference,
    )

    def transition(event: Literal["firing", "resolved"], start: int) -> Transition:
        return Transition(
            event,
            step,
            start,
            shown.value,
            cond.metric,
            shown.threshold,
            shown.resolve,
            shown.reference,
            None if cond.kind == "trend" else cond.op,
            cond.summary,
        )

    if state.state == State.FIRING:
        streak = 0 if hold_now else state.clear_streak + 1
        if streak >= rule.clear_steps:
            start = state.start_step if state.start_step is not None else step
            return (
                replace(state, state=State.RESOLVED, clear_streak=0, end_step=step, pending_since=None),
                transition("resolved", start),
            )
        return replace(state, clear_streak=streak), None
    if rule_met:
        return (
            replace(state, state=State.FIRING, start_step=step, end_step=None, clear_streak=0, pending_since=None),
            transition("firing", step),
        )
    if trip_now or met_now:
        since = state.pending_since if state.state == State.PENDING else step
        return replace(state, state=State.PENDING, pending_since=since), None
    if state.state == State.PENDING:
        return replace(state, state=State.INACTIVE, pending_since=None), None
    return state, None


# --------------------------------------------------------------------------------------------------
# notifications


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fingerprint(labels: Mapping[str, str]) -> str:
    """Stable identity of an alert: 16 hex digits of the SHA-256 of its sorted labels (like Alertmanager)."""
    blob = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _num(v: float | None) -> float | None:
    """JSON has no NaN/Inf; write them as null / strings."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _json_num(v: float | None) -> Any:
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _from_json_num(v: Any) -> float | None:
    if v is None:
        return None
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return float(v)


@dataclass(frozen=True)
class Notification:
    """One notification event: a rule started firing, is still firing (repeat) or resolved."""

    event: Literal["firing", "resolved", "repeat"]
    rule: str
    severity: str
    fingerprint: str
    run: str
    step: int
    start_step: int
    value: float | None
    metric: str | None
    threshold: float | None
    summary: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    ends_at: float | None
    time: float
    replay: bool = False
    """True for an episode that began and ended inside a catch-up replay (a watcher started on an old
    run): history sinks record it, network sinks skip it."""
    record_only: bool = False
    """True for a transition notified once already, by the attempt a restart replaced, that the resumed attempt's
    own records reproduce: only sinks that keep the run's history take it (its earlier line no longer counts,
    :meth:`rldiag.runformat.Resume.superseded_alert`); nothing is sent, printed or stopped again."""

    @property
    def status(self) -> str:
        """Alertmanager status: "firing" (also for repeats) or "resolved"."""
        return "resolved" if self.event == EVENT_RESOLVED else "firing"

    def to_json(self) -> dict[str, Any]:
        """The alerts.jsonl record (one line per event; see docs/alerts.md)."""
        return {
            "v": HISTORY_VERSION,
            "event": self.event,
            "status": self.status,
            "rule": self.rule,
            "severity": self.severity,
            "fingerprint": self.fingerprint,
            "run": self.run,
            "step": self.step,
            "start_step": self.start_step,
            "value": _json_num(self.value),
            "metric": self.metric,
            "threshold": _json_num(self.threshold),
            "summary": self.summary,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "time": self.time,
            "starts_at": _iso(self.starts_at),
            "ends_at": _iso(self.ends_at),
            "starts_at_unix": self.starts_at,
            "ends_at_unix": self.ends_at,
            "replay": self.replay,
            "record_only": self.record_only,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Notification:
        return cls(
            event=d["event"],
            rule=d["rule"],
            severity=d["severity"],
            fingerprint=d["fingerprint"],
            run=d.get("run", ""),
            step=int(d["step"]),
            start_step=int(d.get("start_step", d["step"])),
            value=_from_json_num(d.get("value")),
            metric=d.get("metric"),
            threshold=_from_json_num(d.get("threshold")),
            summary=d.get("summary", ""),
            labels=dict(d.get("labels", {})),
            annotations=dict(d.get("annotations", {})),
            starts_at=float(d.get("starts_at_unix", d.get("time", 0.0))),
            ends_at=None if d.get("ends_at_unix") is None else float(d["ends_at_unix"]),
            time=float(d.get("time", 0.0)),
            replay=bool(d.get("replay", False)),
            record_only=bool(d.get("record_only", False)),
        )


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The events of an alerts.jsonl file, oldest first; a torn or foreign line is skipped."""
    return read_alerts(path)  # type: ignore[arg-type]  # a local path or a URI


@dataclass(frozen=True)
class RuleStatus:
    """What a rule is doing now (for ``rldiag watch``, the dashboard and tests)."""

    rule: str
    severity: str
    state: State
    step: int | None
    start_step: int | None
    value: float | None
    metric: str | None
    threshold: float | None
    fingerprint: str


@dataclass
class _Episode:
    start_step: int
    starts_at: float
    last_notified: float


@dataclass
class _Stall:
    step: int
    starts_at: float
    last_notified: float
    data_time: float | None = None


class Engine:
    """Evaluates a rule set over the steps of one run and produces notifications.

    >>> import polars as pl
    >>> from rldiag.alerts import Engine, load_rules
    >>> eng = Engine(load_rules(), run="demo")
    >>> frame = pl.DataFrame({"step": [1, 2], "kl/k3": [0.001, 0.09]})
    >>> [n.rule for n in eng.update(frame, now=0.0)]
    ['kl_spike', 'kl_spike_critical']

    ``history``: the events of the run's alerts.jsonl (:func:`read_history`). Replayed steps reproduce them
    and they are not sent again; the state after the replay equals the state before the restart.
    Feeding a step that is not newer than the last one is a no-op, so evaluating the same frame twice
    gives the same result.
    """

    def __init__(
        self,
        rules: RuleSet | Sequence[Rule] | str | Path | None = None,
        *,
        run: str = "run",
        history: Iterable[Mapping[str, Any]] = (),
        repeat_interval: float | None = None,
    ):
        self.rules = coerce_rules(rules)
        self.run = run
        self.repeat_interval: float = (
            float(self.rules.settings.repeat_interval) if repeat_interval is None else float(repeat_interval)
        )
        self._metric_rules = [r for r in self.rules if r.kind == "metric"]
        self._stall_rules = [r for r in self.rules if r.kind == "stall"]
        self._states: dict[str, RuleState] = {r.name: initial_state(r) for r in self._metric_rules}
        self._labels = {r.name: self._make_labels(r) for r in self.rules}
        self._fp = {name: fingerprint(lbl) for name, lbl in self._labels.items()}
        self._episodes: dict[str, _Episode] = {}
        self._stalls: dict[str, _Stall] = {}
        self.last_step: int | None = None
        self.last_data_time: float | None = None
        self.closed = False
        self.steps_evaluated = 0
        self._sent: dict[tuple[str, str, int], Mapping[str, Any]] = {}
        self._stale: set[tuple[str, str, int]] = set()  # sent, by an attempt a restart replaced (supersede_from)
        self._dangling: dict[str, tuple[int, Mapping[str, Any]]] = {}  # fingerprint -> a stale open episode
        self._last_notified: dict[tuple[str, int], float] = {}
        self._load_history(history)

    # ---------------------------------------------------------------- history
    def _load_history(self, history: Iterable[Mapping[str, Any]]) -> None:
        by_fp = {fp: name for name, fp in self._fp.items()}
        stall_names = {r.name for r in self._stall_rules}
        last_stall: dict[str, Mapping[str, Any]] = {}
        for ev in history:
            try:
                fp, event, step = ev["fingerprint"], ev["event"], int(ev["step"])
                start = int(ev.get("start_step", step))
                t = float(ev.get("time", 0.0))
            except (KeyError, TypeError, ValueError):
                continue
            if event in (EVENT_FIRING, EVENT_RESOLVED):
                self._sent[(fp, event, step)] = ev
            if event in (EVENT_FIRING, EVENT_REPEAT):
                key = (fp, start)
                self._last_notified[key] = max(self._last_notified.get(key, t), t)
            name = by_fp.get(fp)
            if name in stall_names:
                last_stall[name] = ev
        for name, ev in last_stall.items():
            if ev["event"] != EVENT_RESOLVED:
                starts = float(ev.get("starts_at_unix", ev.get("time", 0.0)))
                fp = self._fp[name]
                key = (fp, int(ev.get("start_step", ev["step"])))
                try:  # the stall fired `value` seconds after the last data
                    data_time: float | None = float(ev["time"]) - float(ev["value"])
                except (KeyError, TypeError, ValueError):
                    data_time = None
                self._stalls[name] = _Stall(int(ev["step"]), starts, self._last_notified.get(key, starts), data_time)

    def supersede(self, replaced: Callable[[Mapping[str, Any]], bool]) -> int:
        """Transitions of the history that ``replaced`` says were computed from records a restart replaced
        (:meth:`rldiag.runformat.Resume.superseded_alert`). One the resumed records reproduce is recorded again,
        for sinks that keep the history only (``record_only``: nothing is notified twice); the others stay in the
        history file, where readers no longer count them. Returns how many transitions that concerns."""
        for key, ev in self._sent.items():
            if ev.get("metric") is not None and replaced(ev):
                self._stale.add(key)
        # episodes whose firing was replaced and that never resolved: resolved as soon as the resumed records
        # pass their step without reproducing them (receivers would otherwise hold them firing)
        closed = {(k[0], int(ev.get("start_step", k[2]))) for k, ev in self._sent.items() if k[1] == EVENT_RESOLVED}
        for fp, event, step in self._stale:
            if event == EVENT_FIRING and (fp, step) not in closed:
                self._dangling[fp] = (step, self._sent[(fp, event, step)])
        return len(self._stale)

    def supersede_from(self, step: int) -> int:
        """:meth:`supersede` for this process's own restart: it resumed at ``step``, after every event of its
        history was notified."""
        return self.supersede(lambda ev: int(ev["step"]) >= step)

    # ---------------------------------------------------------------- labels / events
    def _make_labels(self, rule: Rule) -> dict[str, str]:
        labels = {"alertname": rule.name, "severity": rule.severity, "run": self.run, "group": rule.group or rule.name}
        labels.update(rule.labels)
        return labels

    def fingerprint(self, rule: str) -> str:
        return self._fp[rule]

    def _stall_notification(
        self,
        rule: Rule,
        event: EventName,
        step: int,
        idle: float | None,
        starts_at: float,
        ends_at: float | None,
        now: float,
    ) -> Notification:
        """The notification of a stalled-run rule: the value is the time without new data (seconds)."""
        return self._notification(
            rule,
            event,
            step=step,
            start_step=step,
            value=idle,
            metric=None,
            threshold=rule.stall_after,
            resolve=None,
            reference=None,
            op=None,
            starts_at=starts_at,
            ends_at=ends_at,
            now=now,
        )

    def _transition_notification(
        self,
        rule: Rule,
        event: EventName,
        tr: Transition,
        step: int,
        starts_at: float,
        ends_at: float | None,
        now: float,
    ) -> Notification:
        """The notification of a rule's transition ``tr`` (its values, threshold and comparison) at ``step``."""
        return self._notification(
            rule,
            event,
            step=step,
            start_step=tr.start_step,
            value=tr.value,
            metric=tr.metric,
            threshold=tr.threshold,
            resolve=tr.resolve,
            reference=tr.reference,
            op=tr.op,
            starts_at=starts_at,
            ends_at=ends_at,
            now=now,
            template=tr.summary or None,
        )

    def _notification(
        self,
        rule: Rule,
        event: EventName,
        *,
        step: int,
        start_step: int,
        value: float | None,
        metric: str | None,
        threshold: float | None,
        resolve: float | None,
        reference: float | None,
        op: str | None,
        starts_at: float,
        ends_at: float | None,
        now: float,
        template: str | None = None,
    ) -> Notification:
        fields = {
            "rule": rule.name,
            "severity": rule.severity,
            "run": self.run,
            "metric": metric or "",
            "value": _num(value),
            "threshold": _num(threshold),
            "resolve": _num(resolve),
            "op": op or "",
            "step": step,
            "start_step": start_step,
            "reference": _num(reference),
            "status": "resolved" if event == EVENT_RESOLVED else "firing",
        }
        if event == EVENT_RESOLVED:
            template = _RESOLVED_METRIC if rule.kind == "metric" else _RESOLVED_STALL
        else:  # the deciding condition's sentence, else the rule's
            template = template or rule.summary or (_DEFAULT_METRIC if rule.kind == "metric" else _DEFAULT_STALL)
        summary = render_template(template, fields)
        annotations = {
            "summary": summary,
            "description": " ".join(rule.doc.split()),
            "source": rule.source,
            "expr": rule.describe(),
        }
        if metric:
            annotations["metric"] = metric
        return Notification(
            event=event,
            rule=rule.name,
            severity=rule.severity,
            fingerprint=self._fp[rule.name],
            run=self.run,
            step=step,
            start_step=start_step,
            value=_num(value),
            metric=metric,
            threshold=_num(threshold),
            summary=summary,
            labels=dict(self._labels[rule.name]),
            annotations=annotations,
            starts_at=starts_at,
            ends_at=ends_at,
            time=now,
        )

    # ---------------------------------------------------------------- evaluation
    def observe(
        self, step: int, values: Mapping[str, float], *, now: float, data_time: float | None = None
    ) -> list[Notification]:
        """Evaluate one step (ignored unless newer than the last); returns the events to send."""
        return self._observe(int(step), values, now=now, data_time=data_time)

    def _observe(
        self, step: int, values: Mapping[str, float], *, now: float, data_time: float | None
    ) -> list[Notification]:
        if self.last_step is not None and step <= self.last_step:
            return []
        self.last_step = step
        self._saw_data(now if data_time is None else data_time)
        self.steps_evaluated += 1
        out: list[Notification] = []
        for name, stall in list(self._stalls.items()):
            if step > stall.step:
                out.extend(self._end_stall(name, now=now))
        for rule in self._metric_rules:
            state, tr = advance(rule, self._states[rule.name], step, values)
            self._states[rule.name] = state
            if tr is None:
                continue
            fp = self._fp[rule.name]
            past = self._sent.get((fp, tr.event, tr.step))
            if tr.event == EVENT_FIRING:
                starts_at = now
                if past is not None:
                    starts_at = float(past.get("starts_at_unix", past.get("time", now)))
                last = self._last_notified.get((fp, tr.start_step), starts_at)
                self._episodes[rule.name] = _Episode(tr.start_step, starts_at, last)
                if past is not None and not self._renewed(fp, tr):
                    continue
                n = self._transition_notification(rule, EVENT_FIRING, tr, step, starts_at, None, now)
                out.append(replace(n, record_only=True) if past is not None else n)
            else:
                ep = self._episodes.pop(rule.name, None)
                if past is not None and not self._renewed(fp, tr):
                    continue
                starts_at = ep.starts_at if ep is not None else now
                n = self._transition_notification(rule, EVENT_RESOLVED, tr, step, starts_at, now, now)
                out.append(replace(n, record_only=True) if past is not None else n)
        for rule in self._metric_rules if self._dangling else ():
            out.extend(self._resolve_dangling(rule, step, values, now))
        return out

    def _resolve_dangling(self, rule: Rule, step: int, values: Mapping[str, Any], now: float) -> list[Notification]:
        """A replaced attempt's episode of ``rule`` that never resolved (:meth:`supersede`), once the resumed
        records reach its step: resolved now, at ``step``, unless those records fire it again from the same step
        (then it goes on)."""
        fp = self._fp[rule.name]
        if fp not in self._dangling or step < self._dangling[fp][0]:
            return []
        start, past = self._dangling.pop(fp)
        ep = self._episodes.get(rule.name)
        if ep is not None and ep.start_step == start:
            return []
        metric = past.get("metric") or None
        value = values.get(metric) if metric else None
        starts_at = float(past.get("starts_at_unix", past.get("time", now)))
        return [
            self._notification(
                rule,
                EVENT_RESOLVED,
                step=step,
                start_step=start,
                value=None if value is None else float(value),
                metric=metric,
                threshold=None,
                resolve=None,
                reference=None,
                op=None,
                starts_at=starts_at,
                ends_at=now,
                now=now,
            )
        ]

    def _renewed(self, fp: str, tr: Transition) -> bool:
        """Whether transition ``tr``, already in the history, was sent by an attempt a restart replaced (it is
        recorded again, once: :meth:`supersede_from`)."""
        key = (fp, tr.event, tr.step)
        if key not in self._stale:
            return False
        self._stale.discard(key)
        return True

    def _saw_data(self, t: float) -> None:
        if self.last_data_time is None or t > self.last_data_time:
            self.last_data_time = t

    def touch(self, *, now: float, data_time: float | None = None) -> list[Notification]:
        """New data landed (a record of a step that is not complete yet): it resets the stall clock and
        resolves a stalled-run alert whose last data is older."""
        t = now if data_time is None else data_time
        self._saw_data(t)
        out: list[Notification] = []
        for name, stall in list(self._stalls.items()):
            if stall.data_time is not None and t > stall.data_time:
                out.extend(self._end_stall(name, now=now))
        return out

    def update(
        self, frame: pl.DataFrame, *, now: float, data_time: float | None = None, backfill: bool = False
    ) -> list[Notification]:
        """Evaluate the steps of ``frame`` newer than the last evaluated one, in step order.

        ``frame`` has a ``step`` column and one column per metric (registry names); missing columns
        and nulls are missing values. ``backfill=True`` marks episodes that start and end inside this
        frame as ``replay`` (a watcher catching up on an old run: recorded, not sent to network sinks).
        """
        events = []
        for step, values in _rows(frame, self._needed_metrics()):
            events.extend(self._observe(step, values, now=now, data_time=data_time))
        return _mark_replay(events) if backfill else events

    def _needed_metrics(self) -> list[str]:
        return list(dict.fromkeys(m for r in self._metric_rules for m in r.metrics))

    def tick(self, now: float) -> list[Notification]:
        """Time-driven events at wall time ``now``: stalled-run alerts and repeats of firing alerts."""
        out: list[Notification] = []
        if not self.closed and self.last_data_time is not None and self.last_step is not None:
            idle = now - self.last_data_time
            for rule in self._stall_rules:
                if rule.name not in self._stalls and idle >= rule.stall_after:
                    self._stalls[rule.name] = _Stall(self.last_step, now, now, self.last_data_time)
                    out.append(self._stall_notification(rule, EVENT_FIRING, self.last_step, idle, now, None, now))
        for rule in self._metric_rules:
            ep = self._episodes.get(rule.name)
            if ep is None:
                continue
            interval = rule.repeat_interval or self.repeat_interval
            if now - ep.last_notified >= interval:
                ep.last_notified = now
                st = self._states[rule.name]
                out.append(
                    self._notification(
                        rule,
                        EVENT_REPEAT,
                        step=st.last_step if st.last_step is not None else ep.start_step,
                        start_step=ep.start_step,
                        value=st.last_value,
                        metric=st.last_metric,
                        threshold=st.last_threshold,
                        resolve=None,
                        reference=st.last_reference,
                        op=None,
                        starts_at=ep.starts_at,
                        ends_at=None,
                        now=now,
                    )
                )
        for rule in self._stall_rules:
            stall = self._stalls.get(rule.name)
            if stall is None:
                continue
            interval = rule.repeat_interval or self.repeat_interval
            if now - stall.last_notified >= interval:
                stall.last_notified = now
                silent = now - self.last_data_time if self.last_data_time is not None else None
                out.append(self._stall_notification(rule, EVENT_REPEAT, stall.step, silent, stall.starts_at, None, now))
        return out

    def _end_stall(self, name: str, *, now: float) -> list[Notification]:
        stall = self._stalls.pop(name)
        rule = self.rules[name]
        idle = now - self.last_data_time if self.last_data_time is not None else None
        return [self._stall_notification(rule, EVENT_RESOLVED, stall.step, idle, stall.starts_at, now, now)]

    def close(self, now: float) -> list[Notification]:
        """The run was closed: it can no longer stall; a stalled-run alert resolves."""
        self.closed = True
        out: list[Notification] = []
        for name in list(self._stalls):
            out.extend(self._end_stall(name, now=now))
        return out

    def reopen(self) -> None:
        """The run was resumed after a close: stall detection applies again."""
        self.closed = False

    # ---------------------------------------------------------------- inspection
    @property
    def stalled(self) -> bool:
        return bool(self._stalls)

    def state(self, rule: str) -> RuleState:
        return self._states[rule]

    def status(self) -> dict[str, RuleStatus]:
        """Current state of every rule (while the run is stalled, metric rules that are not firing report
        ``nodata``)."""
        out = {}
        for rule in self.rules:
            if rule.kind == "stall":
                stall = self._stalls.get(rule.name)
                out[rule.name] = RuleStatus(
                    rule.name,
                    rule.severity,
                    State.FIRING if stall else State.INACTIVE,
                    self.last_step,
                    stall.step if stall else None,
                    None,
                    None,
                    rule.stall_after,
                    self._fp[rule.name],
                )
                continue
            st = self._states[rule.name]
            # A stall hides what a rule would say about new data, but not that it was firing when data stopped.
            state = State.NODATA if self._stalls and st.state != State.FIRING else st.state
            out[rule.name] = RuleStatus(
                rule.name,
                rule.severity,
                state,
                st.last_step,
                st.start_step,
                st.last_value,
                st.last_metric,
                st.last_threshold,
                self._fp[rule.name],
            )
        return out

    def firing(self) -> list[str]:
        """Names of the rules firing now (a stalled run counts as firing its stall rule)."""
        names = [r.name for r in self._metric_rules if self._states[r.name].state == State.FIRING]
        return names + list(self._stalls)


def _mark_replay(events: list[Notification]) -> list[Notification]:
    """Mark both events of every episode that fired and resolved inside one catch-up batch."""
    fired = {(n.fingerprint, n.start_step) for n in events if n.event == EVENT_FIRING}
    ended = {(n.fingerprint, n.start_step) for n in events if n.event == EVENT_RESOLVED}
    done = fired & ended
    return [replace(n, replay=True) if (n.fingerprint, n.start_step) in done else n for n in events]


def _rows(frame: pl.DataFrame, metrics: Sequence[str]) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, {metric: value}) per row of ``frame`` in step order, only the metrics rules use."""
    if "step" not in frame.columns:
        raise ValueError(f"a step-metrics frame needs a 'step' column; it has {frame.columns[:8]}")
    import polars as pl

    # a rule's `custom:<name>` reads the custom scalar's column, which step_metrics() names `<name>`
    source = {m: m if m in frame.columns else m[len(CUSTOM_PREFIX) :] for m in metrics}
    cols = [m for m in metrics if source[m] in frame.columns and (m in frame.columns or m.startswith(CUSTOM_PREFIX))]
    sub = frame.select([pl.col("step"), *(pl.col(source[m]).alias(m) for m in cols)])
    sub = sub.filter(sub["step"].is_not_null()).sort("step")
    for row in sub.iter_rows():
        step = int(row[0])
        yield step, {name: (math.nan if v is None else float(v)) for name, v in zip(cols, row[1:])}
