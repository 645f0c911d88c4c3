"""Overview: the registry's headline metrics of the selected runs, one section per family, alerts marked."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from app import data, figures, ids, panels
from app import layout as ui

dash.register_page(__name__, path="/overview", name="Overview", title="rldiag · Overview", order=1)

PAGE = "overview"


def alert_line(runs: list[str]) -> html.Div | None:
    """Firing alerts of the runs on screen, each linked to the Alerts page."""
    cat = data.catalog()
    chips: list[Any] = []
    for run_id in runs:
        for rule, ev in data.alert_states(cat.state(run_id).alerts()).items():
            if str(ev["state"]).lower() == "firing":
                text = f"{rule} (step {ev['step']})" if len(runs) == 1 else f"{run_id}: {rule} (step {ev['step']})"
                chips.append(
                    dash.dcc.Link(
                        text,
                        href="/alerts" + ui.run_query([run_id]),
                        className=f"alert-chip sev-{ev.get('severity') or 'warn'}",
                    )
                )
    if not chips:
        return None
    return html.Div([html.Span("firing: ", className="muted"), *chips], className="alert-line")


def restart_line(runs: list[str]) -> html.Div | None:
    """Where the runs on screen were restarted (a later attempt of a rank resumed at that step; the records it
    replaced count nowhere) and the steps a restart left without data. None for runs that never restarted."""
    cat = data.catalog()
    parts: list[str] = []
    for run_id in runs:
        prefix = f"{run_id}: " if len(runs) > 1 else ""
        parts += [prefix + part for part in cat.state(run_id).run.resume.describe(limit=8)]
    if not parts:
        return None
    return html.Div([html.Span("restarted: ", className="muted"), html.Span(" · ".join(parts))], className="alert-line")


PROBLEMS_SHOWN = 4
"""Problems listed per run on the Overview; ``rldiag info`` lists them all."""


def problems_line(runs: list[str]) -> html.Div | None:
    """What is wrong with the runs on screen that reading them did not stop: files skipped as damaged, two live
    writers on one rank, records a writer took and never published (a signal, a store that could not be
    written). None when nothing is."""
    from rldiag.analysis.inventory import unpublished_records

    cat = data.catalog()
    parts: list[str] = []
    for run_id in runs:
        run = cat.state(run_id).run
        found = [p.message for p in run.problems] + unpublished_records(run)
        prefix = f"{run_id}: " if len(runs) > 1 else ""
        parts += [prefix + msg for msg in found[:PROBLEMS_SHOWN]]
        if len(found) > PROBLEMS_SHOWN:
            parts.append(f"{prefix}{len(found) - PROBLEMS_SHOWN} more: rldiag info {run.path}")
    if not parts:
        return None
    return html.Div([html.Span("problems: ", className="muted"), html.Span(" · ".join(parts))], className="alert-line")


def custom_names(runs: list[str]) -> list[str]:
    """Names of the custom scalars (``Recorder.log``) of the runs on screen, in first-seen order."""
    cat = data.catalog()
    names: dict[str, None] = {}
    for run_id in runs:
        for name in cat.state(run_id).run.custom.names():
            names.setdefault(str(name), None)
    return list(names)


def custom_panels(names: list[str]) -> list[panels.Panel]:
    """One panel per custom scalar (their scales are unrelated: a loss and a learning rate do not share an
    axis). A name with a comma cannot travel in a panel id and is left out; a wall-clock scalar
    (:data:`app.figures.TIME_COLUMNS`) is the x axis by wall time, not a panel."""
    return [
        panels.Panel(f"custom-{i}", "custom", name, "", (name,), (panels.custom_help(name),))
        for i, name in enumerate(n for n in names if "," not in n and n not in figures.TIME_COLUMNS)
    ]


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Overview",
            runs,
            error=error,
            intro="Headline metrics of each family (flagged in the metric registry). Dashed vertical lines: alerts "
            "that started firing; grey dotted lines with a diamond: restarts. Click a point to inspect that step's "
            "tokens; drag to zoom (the server re-aggregates the zoomed range).",
        )
    ]
    if runs:
        children.append(html.Div(alert_line(runs), id=ids.OVERVIEW_FIRING))
        children.append(html.Div(restart_line(runs), id=ids.OVERVIEW_RESTARTS))
        children.append(html.Div(problems_line(runs), id=ids.OVERVIEW_PROBLEMS))
        # One grid: most families have one headline metric, and a section per family would leave half rows.
        children.append(ui.panel_grid(PAGE, panels.overview_panels()))
        names = custom_names(runs)
        children.append(html.Div(custom_section(names), id=ids.OVERVIEW_CUSTOM))
        children.append(dcc.Store(id=ids.OVERVIEW_CUSTOM_NAMES, data=names))
    return html.Div(children)


def custom_section(names: list[str]) -> list[Any]:
    """The "Custom" section of the Overview for these custom scalar names (empty without any)."""
    custom = custom_panels(names)
    if not custom:
        return []
    return [
        ui.section(
            "Custom",
            ui.panel_grid(PAGE, custom),
            note="Scalars the training loop logged itself with rec.log(step, {...}), exact per step.",
        )
    ]


@callback(
    Output(ids.OVERVIEW_CUSTOM, "children"),
    Output(ids.OVERVIEW_CUSTOM_NAMES, "data"),
    Input(ids.LIVE_PAYLOAD, "data"),
    State(ids.PAGE_RUNS, "data"),
    State(ids.OVERVIEW_CUSTOM_NAMES, "data"),
    prevent_initial_call=True,
)
def refresh_custom(_payload: Any, runs: list[str] | None, shown: list[str] | None) -> tuple[Any, Any]:
    """A scalar first logged while the page is open gets its panel at the next live tick that changed
    anything (the section is rebuilt only when the set of names changed)."""
    names = custom_names(data.catalog().valid_ids(runs or []))
    if names == list(shown or []):
        return no_update, no_update
    return custom_section(names), names


@callback(
    Output(ids.OVERVIEW_FIRING, "children"),
    Output(ids.OVERVIEW_RESTARTS, "children"),
    Output(ids.OVERVIEW_PROBLEMS, "children"),
    Input(ids.LIVE_PAYLOAD, "data"),
    State(ids.PAGE_RUNS, "data"),
    prevent_initial_call=True,
)
def refresh_lines(_payload: Any, runs: list[str] | None) -> tuple[Any, Any, Any]:
    """The firing chips, the restarts and the problems follow the run: a live tick that changed a panel (new
    steps, new alert marks, a restart) sends a payload, and the lines are read again then."""
    shown = data.catalog().valid_ids(runs or [])
    return alert_line(shown), restart_line(shown), problems_line(shown)
