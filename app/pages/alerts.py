"""Alerts: each rule's current state and the history from ``<run>/alerts.jsonl``, linked to the step."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from app import data, ids
from app import layout as ui
from app.security import visible
from rldiag.runformat import alert_history_name

dash.register_page(__name__, path="/alerts", name="Alerts", title="rldiag · Alerts", order=9)

HISTORY_LIMIT = 500
STATES = frozenset({"inactive", "pending", "firing", "resolved", "repeat"})
SEVERITIES = frozenset({"info", "warn", "warning", "critical", "error"})


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run, multi=False)
    return html.Div(
        [
            ui.run_header(
                "Alerts",
                runs,
                error=error,
                multi=False,
                intro="Rules of rldiag's alert engine (states inactive → pending → firing → resolved). "
                "History is read from the run's alerts.jsonl (alerts/ on object storage); click a step for its tokens.",
            ),
            ui.section("current state", html.Div(id=ids.ALERTS_STATES)),
            ui.section(
                "history", html.Div(id=ids.ALERTS_HISTORY), note=f"newest first, at most {HISTORY_LIMIT} events"
            ),
        ]
    )


def _time(t: Any) -> str:
    if isinstance(t, (int, float)) and math.isfinite(t):
        try:
            return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):  # a time no calendar shows (1e20): show the number
            return f"{t:.6g}"
    return "" if t is None else str(t)


def _txt(v: Any) -> str:
    """A text field of an event, with control and bidi characters visibly escaped."""
    return "" if v is None else visible(str(v))


def _state_class(state: str) -> str:
    return state if state in STATES else "other"


def _sev_class(severity: Any) -> str:
    return str(severity) if severity in SEVERITIES else "other"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else ("" if v is None else str(v))


def _step_link(run_id: str, step: Any) -> Any:
    if step is None:
        return ""
    return dcc.Link(str(step), href="/tokens" + ui.run_query([run_id], step=step))


def states_table(run_id: str, events: list[dict[str, Any]]) -> Any:
    states = data.alert_states(events)
    if not states:
        return ui.notice(
            "No alert events recorded for this run (alerts.jsonl is absent or empty). Record with "
            "rldiag.Recorder(..., alerts=True) or run `rldiag watch` to evaluate the rules."
        )
    rows = []
    for rule, ev in sorted(states.items(), key=lambda kv: (str(kv[1]["state"]) != "firing", kv[0])):
        state = str(ev["state"] or "")
        rows.append(
            html.Tr(
                [
                    html.Td(visible(rule)),
                    html.Td(html.Span(visible(state), className=f"badge badge-{_state_class(state)}")),
                    html.Td(html.Span(_txt(ev["severity"]), className=f"sev-{_sev_class(ev['severity'])}")),
                    html.Td(_step_link(run_id, ev["step"])),
                    html.Td(_step_link(run_id, ev["start_step"])),
                    html.Td(_txt(ev["metric"])),
                    html.Td(_num(ev["value"])),
                    html.Td(_num(ev["threshold"])),
                    html.Td(_txt(ev["summary"])),
                ]
            )
        )
    head = html.Thead(
        html.Tr(
            [
                html.Th(h)
                for h in ("rule", "state", "severity", "step", "since step", "metric", "value", "threshold", "summary")
            ]
        )
    )
    return html.Table([head, html.Tbody(rows)], className="table")


def history_table(run_id: str, events: list[dict[str, Any]]) -> Any:
    if not events:
        return html.Div()
    rows = []
    for raw in list(reversed(events))[:HISTORY_LIMIT]:
        ev = data.normalize_alert(raw)
        state = str(ev["state"] or "")
        rows.append(
            html.Tr(
                [
                    html.Td(_time(ev["time"])),
                    html.Td(_txt(ev["rule"])),
                    html.Td(html.Span(visible(state), className=f"badge badge-{_state_class(state)}")),
                    html.Td(html.Span(_txt(ev["severity"]), className=f"sev-{_sev_class(ev['severity'])}")),
                    html.Td(_step_link(run_id, ev["step"])),
                    html.Td(_num(ev["value"])),
                    html.Td(_txt(ev["summary"])),
                ]
            )
        )
    head = html.Thead(html.Tr([html.Th(h) for h in ("time", "rule", "event", "severity", "step", "value", "summary")]))
    return html.Table([head, html.Tbody(rows)], className="table")


@callback(
    Output(ids.ALERTS_STATES, "children"),
    Output(ids.ALERTS_HISTORY, "children"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.LIVE_INTERVAL, "n_intervals"),
)
def update_alerts(runs: list[str] | None, _n: int) -> tuple[Any, Any]:
    good = data.catalog().valid_ids(runs or [])
    if not good:
        return ui.notice("no run selected"), html.Div()
    st = data.catalog().state(good[0])
    events = st.alerts()
    hidden = len(st.alerts(replaced=True)) - len(events)
    history = history_table(good[0], events)
    if hidden:  # say so: the lines are still in the file
        note = (
            f"{hidden} event(s) computed from records a restart replaced are not shown (they stay in "
            f"{alert_history_name(st.run.path)}; the resumed records' own events are)"
        )
        history = html.Div([html.P(note, className="muted"), history])
    return states_table(good[0], events), history
