"""Runs: every run under the served folder, its status, size and firing alerts; pick several to compare."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import dash
from dash import ALL, Input, Output, State, callback, dcc, html

from app import data, ids
from app.layout import run_query

dash.register_page(__name__, path="/", name="Runs", title="rldiag · Runs", order=0)

SELECT = "run-select"


def layout(**_query: Any) -> html.Div:
    cat = data.catalog()
    return html.Div(
        [
            html.Div(
                [html.H2("Runs", className="page-title"), html.Span(f"served folder: {cat.root}", className="muted")],
                className="page-head",
            ),
            html.Div(
                [
                    dcc.Input(
                        id=ids.RUNS_FILTER,
                        type="text",
                        debounce=True,
                        placeholder="filter: name or glob (grpo*, *lr3e-6*)",
                        className="filter",
                    ),
                    html.Button("refresh", id=ids.RUNS_REFRESH, n_clicks=0, className="button"),
                    dcc.Link("compare selected →", id=ids.RUNS_COMPARE, href="/overview", className="button primary"),
                ],
                className="toolbar",
            ),
            html.Div(id=ids.RUNS_TABLE, children=runs_table(cat.run_ids(), selected=[])),
        ]
    )


def matches(run_id: str, pattern: str | None) -> bool:
    """Case-insensitive glob when the pattern has wildcards, substring otherwise."""
    if not pattern:
        return True
    p = pattern.strip().lower()
    rid = run_id.lower()
    return fnmatch.fnmatchcase(rid, p) if any(c in p for c in "*?[") else p in rid


def summary(run_id: str) -> dict[str, Any]:
    """Status, steps, tokens, last step and firing alerts of one run (from cached step metrics)."""
    st = data.catalog().state(run_id)
    try:
        st.update()
        frame = st.metrics()
    except Exception as exc:  # an unreadable run is listed with its error, never hides the others
        return {"run": run_id, "status": "error", "error": str(exc)}
    steps = frame.height
    tokens = float(frame["tokens/count"].sum()) if "tokens/count" in frame.columns and steps else float("nan")
    firing = sorted(r for r, ev in data.alert_states(st.alerts()).items() if str(ev["state"]).lower() == "firing")
    return {
        "run": run_id,
        "status": st.status(),
        "steps": steps,
        "last_step": int(frame["step"].max()) if steps else None,
        "tokens": tokens,
        "firing": firing,
    }


def _fmt_count(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def runs_table(run_ids: list[str], *, selected: list[str], pattern: str | None = None) -> Any:
    shown = [r for r in run_ids if matches(r, pattern)]
    if not run_ids:
        return html.P("No runs here yet. Record one with rldiag.Recorder, or run `rldiag demo`.", className="muted")
    if not shown:
        return html.P("No run matches the filter.", className="muted")
    head = html.Thead(
        html.Tr([html.Th(h) for h in ("", "run", "status", "steps", "last step", "tokens", "firing alerts")])
    )
    rows = []
    for rid in shown:
        s = summary(rid)
        status = s["status"]
        rows.append(
            html.Tr(
                [
                    html.Td(
                        dcc.Checklist(
                            id={"type": SELECT, "run": rid},
                            options=[{"label": "", "value": rid}],
                            value=[rid] if rid in selected else [],
                            className="row-check",
                        )
                    ),
                    html.Td(dcc.Link(rid, href="/overview" + run_query([rid]), className="run-link")),
                    html.Td(html.Span(status, className=f"badge badge-{status}")),
                    html.Td(str(s.get("steps", "–"))),
                    html.Td("–" if s.get("last_step") is None else str(s["last_step"])),
                    html.Td(_fmt_count(s.get("tokens", float("nan")))),
                    html.Td(
                        [
                            dcc.Link(r, href="/alerts" + run_query([rid]), className="alert-chip")
                            for r in s.get("firing", [])
                        ]
                        or (s.get("error") or "none")
                    ),
                ]
            )
        )
    return html.Table([head, html.Tbody(rows)], className="table runs")


@callback(
    Output(ids.RUNS_TABLE, "children"),
    Input(ids.RUNS_FILTER, "value"),
    Input(ids.RUNS_REFRESH, "n_clicks"),
    Input(ids.LIVE_INTERVAL, "n_intervals"),
    State({"type": SELECT, "run": ALL}, "value"),
    prevent_initial_call=True,
)
def refresh_table(pattern: str | None, _clicks: int, _ticks: int, checked: list[list[str]]) -> Any:
    selected = [r for values in (checked or []) for r in (values or [])]
    return runs_table(data.catalog().run_ids(max_age=0.0), selected=selected, pattern=pattern)


@callback(Output(ids.RUNS_COMPARE, "href"), Input({"type": SELECT, "run": ALL}, "value"))
def compare_link(checked: list[list[str]]) -> str:
    selected = [r for values in (checked or []) for r in (values or [])]
    return "/overview" + run_query(selected)
