"""Building blocks shared by the pages: the run header, panel graphs with their help text, notices.

Everything here renders user-controlled strings (run ids, metric docs, token text) as Dash children, which
React inserts as text nodes: nothing from a log is ever interpreted as HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode

from dash import dcc, html

from app import data, ids
from app.panels import HelpItem, Panel

GRAPH_CONFIG: Any = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"], "responsive": True}
RUN_QUERY_KEYS = ("run",)
DIRECTION_TEXT = {"lower": "lower is better", "higher": "higher is better", "neutral": ""}


def query_runs(search: str | None) -> list[str]:
    """The ``run`` values of a URL query string, in order."""
    qs = parse_qs((search or "").lstrip("?"), keep_blank_values=False)
    return [v for k in RUN_QUERY_KEYS for v in qs.get(k, [])]


def run_query(runs: list[str], **extra: Any) -> str:
    """``?run=a&run=b&step=3`` (empty string without parameters)."""
    items = [("run", r) for r in runs] + [(k, v) for k, v in extra.items() if v is not None]
    return "?" + urlencode(items) if items else ""


def as_list(value: Any) -> list[str]:
    """A query parameter that may be absent, one string or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def resolve_runs(requested: Any, *, multi: bool = True) -> tuple[list[str], str | None]:
    """The runs a page shows and an error to display (unknown or refused ids are named, as text).

    Without ``?run=`` the first run of the served folder is shown.
    """
    cat = data.catalog()
    wanted = as_list(requested)
    if not wanted:
        all_ids = cat.run_ids()
        return (all_ids[:1], None if all_ids else f"no runs found under {cat.root}")
    good = cat.valid_ids(wanted)
    bad = [w for w in wanted if w not in good]
    msg = (
        "unknown run id (runs resolve only under the served folder): " + ", ".join(repr(b) for b in bad)
        if bad
        else None
    )
    return (good if multi else good[:1]), msg


def notice(text: str, kind: str = "info") -> html.Div:
    return html.Div(text, className=f"notice notice-{kind}")


def run_header(
    title: str, runs: list[str], *, error: str | None = None, multi: bool = True, intro: str | None = None
) -> html.Div:
    """Page title, the run picker (mirrors ``?run=``) and an optional error line."""
    options = [{"label": r, "value": r} for r in data.catalog().run_ids()]
    children: list[Any] = [
        html.Div(
            [
                html.H2(title, className="page-title"),
                html.Div(
                    dcc.Dropdown(
                        id=ids.RUN_PICKER,
                        options=options,
                        value=runs if multi else (runs[:1] or None),
                        multi=multi,
                        clearable=False,
                        placeholder="choose a run",
                        className="run-picker",
                    ),
                    className="run-picker-box",
                ),
            ],
            className="page-head",
        ),
    ]
    if intro:
        children.append(html.P(intro, className="intro"))
    if error:
        children.append(notice(error, "error"))
    return html.Div(children)


def help_details(items: Sequence[HelpItem]) -> html.Details:
    """The registry's doc, formula, direction and source of each metric of a panel."""
    rows = []
    for it in items:
        bits: list[Any] = [html.Code(it.name), " — ", it.doc]
        meta = [x for x in (DIRECTION_TEXT.get(it.direction, ""), "derived formula" if it.derived else "") if x]
        if meta:
            bits.append(html.Span(" (" + "; ".join(meta) + ")", className="help-meta"))
        if it.formula:
            bits.extend([html.Br(), html.Span("formula: ", className="help-meta"), html.Code(it.formula)])
        if it.source:
            bits.extend([html.Br(), html.Span("source: " + it.source, className="help-meta")])
        rows.append(html.Li(bits))
    return html.Details([html.Summary("what is this?"), html.Ul(rows)], className="help")


def panel_card(page: str, panel: Panel, *, height: int = 280) -> html.Div:
    """A registry line panel: its title, a log-y toggle and a CSV button above the graph (clear of plotly's
    toolbar and the data), the graph (filled by the shell's panel callback), its stores, and its help."""
    metrics = panel.metrics
    return html.Div(
        [
            html.Div(
                [
                    html.H4(panel.title, className="panel-title", title=", ".join(metrics)),
                    dcc.Checklist(
                        id=ids.panel_part(ids.PANEL_OPTS, page, panel.key, metrics),
                        options=[{"label": " log y", "value": "log"}],
                        value=[],
                        className="panel-opt",
                    ),
                    html.Button(
                        "CSV",
                        id=ids.panel_part(ids.PANEL_CSV, page, panel.key, metrics),
                        className="button small",
                        title="download this panel's numbers (every step of every run shown) as CSV",
                        n_clicks=0,
                    ),
                ],
                className="panel-head",
            ),
            dcc.Graph(
                id=ids.panel(page, panel.key, metrics),
                config=GRAPH_CONFIG,
                style={"height": f"{height}px"},
                figure={"layout": {"height": height}},
            ),
            dcc.Store(id=ids.panel_zoom(page, panel.key, metrics), data=None),
            dcc.Store(id=ids.panel_part(ids.PANEL_SIG, page, panel.key, metrics), data=None),
            help_details(panel.help),
        ],
        id=ids.panel_part(ids.PANEL_CARD, page, panel.key, metrics),
        className="card",
    )


def panel_grid(page: str, panels: Sequence[Panel], *, height: int = 280) -> html.Div:
    return html.Div([panel_card(page, p, height=height) for p in panels], className="grid")


def section(title: str, *children: Any, note: str | None = None) -> html.Section:
    head: list[Any] = [html.H3(title)]
    if note:
        head.append(html.P(note, className="section-note"))
    return html.Section([*head, *children], className="section")


def clickable_graph(key: str, *, height: int = 380) -> dcc.Graph:
    """A graph whose clicked x-value opens the Tokens page at that step."""
    return dcc.Graph(
        id=ids.clickable(key),
        config=GRAPH_CONFIG,
        style={"height": f"{height}px"},
        figure={"layout": {"height": height}},
    )
