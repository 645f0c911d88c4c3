"""Runs: every run under the served folder, its status, size, firing alerts, config and tags; filter and group
them, and draw a group's mean and min/max band of one metric (seeds); pick several to compare."""

from __future__ import annotations

import math
import time
from typing import Any, cast

import dash
from dash import ALL, Input, Output, State, callback, ctx, dcc, html
from dash.exceptions import MissingCallbackContextException

from app import data, groups, ids
from app import layout as ui
from app.layout import run_query
from app.security import visible

dash.register_page(__name__, path="/", name="Runs", title="rldiag · Runs", order=0)

SELECT = "run-select"
COLUMNS = "runs-columns"
GROUP_BY = "runs-group-by"
BAND_METRIC = "runs-band-metric"
BAND = "runs-band"
BAND_NOTE = "runs-band-note"
FILL = "runs-fill"
"""A fast interval, enabled only while some runs of the table are still loading."""
FILL_SECONDS = 1.0
MAX_ROWS = 500
"""Most runs the table lists (the filter narrows the rest down)."""
FINISHED_RECHECK_SECONDS = 30.0
"""A finished run's row is read again at most this often (a restarted job may add to it)."""
LOAD_BUDGET_SECONDS = 0.5
"""Time one render of the table spends opening runs not cached yet; the rest load in the background."""
DEFAULT_COLUMNS = 4
"""Attribute columns shown at first: the first few that differ between runs."""
BAND_METRICS = ("reward/mean", "entropy/mean", "ratio/logabs_p999", "kl/k3", "clip/frac", "tokens/count")


def layout(**_query: Any) -> html.Div:
    cat = data.catalog()
    run_ids = cat.run_ids()
    attrs = attributes(run_ids)
    keys = sorted({k for a in attrs.values() for k in a})
    shown = groups.varying(attrs)[:DEFAULT_COLUMNS]
    table = runs_table(run_ids, selected=[], columns=shown, attrs=attrs)
    return html.Div(
        [
            html.Div(
                [
                    html.H2("Runs", className="page-title"),
                    html.Span(f"served folder: {visible(str(cat.root))}", className="muted"),
                ],
                className="page-head",
            ),
            html.Div(
                [
                    dcc.Input(
                        id=ids.RUNS_FILTER,
                        type="text",
                        debounce=True,
                        placeholder="filter: name or glob, and key=value (grpo* eps_high=0.28 seed!=3)",
                        className="filter",
                    ),
                    html.Button("refresh", id=ids.RUNS_REFRESH, n_clicks=0, className="button"),
                    dcc.Link("compare selected →", id=ids.RUNS_COMPARE, href="/overview", className="button primary"),
                ],
                className="toolbar",
            ),
            html.Div(
                [
                    html.Label("columns", htmlFor=COLUMNS, className="muted"),
                    dcc.Dropdown(
                        id=COLUMNS,
                        options=[{"label": k, "value": k} for k in keys],
                        value=shown,
                        multi=True,
                        placeholder="config and tags as columns",
                        className="inline-dropdown wide-dropdown",
                    ),
                    html.Label("group by", htmlFor=GROUP_BY, className="muted"),
                    dcc.Dropdown(
                        id=GROUP_BY,
                        options=[{"label": groups.NAME_GROUP, "value": groups.NAME_GROUP}]
                        + [{"label": k, "value": k} for k in keys],
                        value=None,
                        placeholder="no grouping",
                        className="inline-dropdown",
                    ),
                ],
                className="toolbar",
            ),
            html.Div(id=ids.RUNS_TABLE, children=table),
            dcc.Interval(id=FILL, interval=int(FILL_SECONDS * 1000), disabled=not still_loading(table)),
            ui.section(
                "group band",
                html.Div(
                    [
                        html.Label("metric", htmlFor=BAND_METRIC, className="muted"),
                        dcc.Dropdown(
                            id=BAND_METRIC,
                            options=[{"label": m, "value": m} for m in band_metrics()],
                            value=BAND_METRICS[0],
                            clearable=False,
                            searchable=True,
                            className="inline-dropdown",
                        ),
                        html.Div(id=BAND_NOTE, className="muted"),
                    ],
                    className="toolbar",
                ),
                html.Div(
                    dcc.Loading(
                        dcc.Graph(id=BAND, config=cast(Any, ui.GRAPH_CONFIG), style={"height": "360px"}), type="dot"
                    ),
                    className="card",
                ),
                note="Choose a group-by above: each group's runs (seeds, say) drawn as their mean and min/max band "
                "of the metric, over the runs the filter shows.",
            ),
        ]
    )


def band_metrics() -> list[str]:
    """The registry's metric names, the usual band metrics first."""
    from app import panels

    names = list(panels.registry())
    first = [m for m in BAND_METRICS if m in names]
    return first + [m for m in names if m not in first]


def attributes(run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Run id -> its attributes (config, tags) from the manifest, read without opening the run."""
    cat = data.catalog()
    out = {}
    for r in run_ids:
        try:
            out[r] = groups.attributes(cat.state(r).manifest())
        except data.UnknownRun:
            continue
    return out


def matches(run_id: str, pattern: str | None, attrs: dict[str, Any] | None = None) -> bool:
    """Case-insensitive glob when the pattern has wildcards, substring otherwise; ``key=value`` terms test
    the run's attributes (:func:`app.groups.matches`)."""
    return groups.matches(run_id, attrs or {}, pattern)


def summary(run_id: str, deadline: float | None = None, *, force: bool = False) -> dict[str, Any]:
    """Status, steps, tokens, last step and firing alerts of one run (from cached step metrics).

    A run not loaded yet when ``deadline`` (``time.monotonic()``) has passed is handed to the catalog's
    background loader and shown as ``loading``. A run found finished is looked at again only every
    :data:`FINISHED_RECHECK_SECONDS` (or when ``force``: the refresh button), so a table of hundreds of finished
    runs costs no file listing per poll.
    """
    cat = data.catalog()
    st = cat.state(run_id)
    if deadline is not None and not st.loaded and time.monotonic() > deadline:
        cat.warm([run_id])
        return {"run": run_id, "status": "loading"}
    memo = st.memo.get("summary")
    if memo and not force and memo[1]["status"] == "finished" and time.monotonic() - memo[0] < FINISHED_RECHECK_SECONDS:
        return cast(dict[str, Any], memo[1])
    out = _summary(run_id, st)
    st.memo["summary"] = (time.monotonic(), out)
    return out


def _summary(run_id: str, st: data.RunState) -> dict[str, Any]:
    try:
        st.update()
        frame = st.metrics(data.ALWAYS)
    except Exception as exc:  # an unreadable run is listed with its error, never hides the others
        return {"run": run_id, "status": "error", "error": str(exc)}
    steps = frame.height
    tokens = float(frame["tokens/count"].sum()) if "tokens/count" in frame.columns and steps else float("nan")
    firing = sorted(r for r, ev in data.alert_states(st.alerts()).items() if str(ev["state"]).lower() == "firing")
    return {
        "run": run_id,
        "status": st.status(),
        "steps": steps,
        "last_step": int(cast(int, frame["step"].max())) if steps else None,
        "tokens": tokens,
        "firing": firing,
        "restarts": list(st.run.resume.restarted_ranks()),
        "gaps": len(st.run.resume.gaps),
    }


def _fmt_count(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def runs_table(
    run_ids: list[str],
    *,
    selected: list[str],
    pattern: str | None = None,
    columns: list[str] | None = None,
    group_by: str | None = None,
    attrs: dict[str, dict[str, Any]] | None = None,
    force: bool = False,
) -> Any:
    if not run_ids:
        return html.P("No runs here yet. Record one with rldiag.Recorder, or run `rldiag demo`.", className="muted")
    attrs = attributes(run_ids) if attrs is None else attrs
    shown = [r for r in run_ids if matches(r, pattern, attrs.get(r))]
    if not shown:
        return html.P("No run matches the filter.", className="muted")
    more = len(shown) - MAX_ROWS
    shown = shown[:MAX_ROWS]
    columns = [c for c in (columns or []) if isinstance(c, str)][:20]
    head = html.Thead(
        html.Tr(
            [html.Th(h) for h in ("", "run", "status", "steps", "last step", "tokens", "restarts", "firing alerts")]
            + [html.Th(c, className="attr") for c in columns]
        )
    )
    rows: list[Any] = []
    deadline = time.monotonic() + LOAD_BUDGET_SECONDS
    loading = 0
    for label, members in groups.group_runs(shown, attrs, group_by).items():
        if group_by:
            rows.append(
                html.Tr(
                    html.Td(f"{visible(label)} · {len(members)} run(s)", colSpan=8 + len(columns)),
                    className="group-row",
                )
            )
        for rid in members:
            s = summary(rid, deadline, force=force)
            loading += s["status"] == "loading"
            rows.append(_row(s, selected, columns, attrs.get(rid, {})))
    parts: list[Any] = [head, html.Tbody(rows)]
    notes = []
    if loading:
        notes.append(f"{loading} run(s) still loading: they fill in on the next refresh.")
    if more > 0:
        notes.append(f"{more} more run(s) not listed: narrow the filter.")
    if notes:
        parts.append(html.Caption(" ".join(notes), className="muted"))
    return html.Table(parts, className="table runs")


def _row(s: dict[str, Any], selected: list[str], columns: list[str], attrs: dict[str, Any]) -> html.Tr:
    rid, status = s["run"], s["status"]
    return html.Tr(
        [
            html.Td(
                dcc.Checklist(
                    id={"type": SELECT, "run": rid},
                    options=[{"label": "", "value": rid}],
                    value=[rid] if rid in selected else [],
                    className="row-check",
                )
            ),
            html.Td(dcc.Link(visible(rid), href="/overview" + run_query([rid]), className="run-link")),
            html.Td(html.Span(status, className=f"badge badge-{status}")),
            html.Td(str(s.get("steps", "–"))),
            html.Td("–" if s.get("last_step") is None else str(s["last_step"])),
            html.Td(_fmt_count(s.get("tokens", float("nan")))),
            html.Td(_restarts_text(s), className="muted"),
            html.Td(
                [
                    dcc.Link(visible(r), href="/alerts" + run_query([rid]), className="alert-chip")
                    for r in s.get("firing", [])
                ]
                or visible(s.get("error") or ("–" if status == "loading" else "none"))
            ),
        ]
        + [html.Td(visible(groups.fmt(attrs.get(c))), className="attr") for c in columns]
    )


def _restarts_text(s: dict[str, Any]) -> str:
    """The steps where a run was restarted (its first three), and whether a restart left steps without data."""
    steps = s.get("restarts") or []
    if not steps:
        return "–"
    shown = ", ".join(map(str, steps[:3])) + (" …" if len(steps) > 3 else "")
    return ("step " if len(steps) == 1 else "steps ") + shown + ("; gap" if s.get("gaps") else "")


def _triggered() -> Any:
    """The id that fired the running callback (None outside one: tests, benchmarks)."""
    try:
        return ctx.triggered_id
    except MissingCallbackContextException:
        return None


def still_loading(table: Any) -> bool:
    """Whether a table from :func:`runs_table` shows runs that are still loading."""
    return "still loading" in str(getattr(table, "children", ""))


@callback(
    Output(ids.RUNS_TABLE, "children"),
    Output(FILL, "disabled"),
    Input(ids.RUNS_FILTER, "value"),
    Input(ids.RUNS_REFRESH, "n_clicks"),
    Input(ids.LIVE_INTERVAL, "n_intervals"),
    State({"type": SELECT, "run": ALL}, "value"),
    Input(COLUMNS, "value"),
    Input(GROUP_BY, "value"),
    Input(FILL, "n_intervals"),
    prevent_initial_call=True,
)
def refresh_table(
    pattern: str | None,
    _clicks: int,
    _ticks: int,
    checked: list[list[str]],
    columns: list[str] | None,
    group_by: str | None,
    _fill: int | None = None,
) -> tuple[Any, bool]:
    selected = [r for values in (checked or []) for r in (values or [])]
    table = runs_table(
        data.catalog().run_ids(),
        selected=selected,
        pattern=pattern,
        columns=columns,
        group_by=group_by,
        force=_triggered() == ids.RUNS_REFRESH,
    )
    return table, not still_loading(table)


@callback(
    Output(BAND, "figure"),
    Output(BAND_NOTE, "children"),
    Input(ids.RUNS_FILTER, "value"),
    Input(GROUP_BY, "value"),
    Input(BAND_METRIC, "value"),
    Input(ids.RUNS_REFRESH, "n_clicks"),
)
def update_band(pattern: str | None, group_by: str | None, metric: str | None, _clicks: int) -> tuple[Any, str]:
    from app.figures import empty_figure

    if not group_by:
        return empty_figure("choose a group-by to draw each group's band"), ""
    cat = data.catalog()
    run_ids = cat.run_ids()
    attrs = attributes(run_ids)
    shown = [r for r in run_ids if matches(r, pattern, attrs.get(r))][:MAX_ROWS]
    grouped = groups.group_runs(shown, attrs, group_by)
    if not metric:
        return empty_figure("choose a metric"), ""
    frames = {label: groups.frames_of(members, metric) for label, members in grouped.items()}
    note = f"{len(grouped)} group(s) of {len(shown)} run(s)"
    empty = [label for label, fr in frames.items() if not any(groups.has_values(f, metric) for f in fr.values())]
    if empty:
        note += f"; no {metric} data in " + ", ".join(visible(e) for e in empty[:5]) + ("…" if len(empty) > 5 else "")
    if len(grouped) > groups.MAX_GROUPS:
        note += f"; the {groups.MAX_GROUPS} largest are drawn"
    return groups.band_figure(frames, metric), note


def selected_runs(checked: list[list[str]] | None) -> list[str]:
    return [r for values in (checked or []) for r in (values or [])]


@callback(Output(ids.RUNS_COMPARE, "href"), Input({"type": SELECT, "run": ALL}, "value"))
def compare_link(checked: list[list[str]]) -> str:
    return "/overview" + run_query(selected_runs(checked))
