"""One figure per selected run for the views that cannot overlay runs: the |log-ratio| heatmap (re-aggregated
on zoom) and the objective lens.

Like :mod:`app.buckets`, each view is a layout piece (one card per run, side by side in the page grid) and
callbacks that a page module registers when Dash executes it (:func:`register_ratio`, :func:`register_lens`).
Clicking a step opens that run's tokens.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from dash import ALL, MATCH, Input, Output, State, callback, ctx, dcc, html
from dash.exceptions import PreventUpdate

from app import data, figures, ids
from app import layout as ui
from app.buckets import click_href, zoom_of
from app.downsample import bucket_sum, downsample
from app.security import plot_text

RATIO_GRAPH = "ratio-runs-graph"
LENS_LINES = "lens-runs-lines"
LENS_BARS = "lens-runs-bars"
LENS_QUANTITY = "lens-runs-quantity"
LENS_NOTE = "lens-runs-note"
BANDS = ("ratio/logabs_p50", "ratio/logabs_p99", "ratio/logabs_p999")
"""Registry quantiles of |log-ratio| drawn over the heatmap."""
LENS_QUANTITIES = ("kept_frac", "weight_mean", "pos_share", "kept_adv_frac")


def _graph(graph_id: dict[str, str], height: int) -> dcc.Graph:
    return dcc.Graph(
        id=graph_id,
        config=cast(Any, ui.GRAPH_CONFIG),
        style={"height": f"{height}px"},
        figure={"layout": {"height": height}},
    )


def _redraw(relayout: Any) -> bool:
    return isinstance(relayout, dict) and any(k.endswith("autorange") or k == "autosize" for k in relayout)


# --- |log-ratio| heatmap ------------------------------------------------------------------------------------
def ratio_layout(runs: list[str], *, height: int = 400) -> html.Div:
    """One heatmap card per run (full width for one run, a grid for several)."""
    cards = [html.Div(_graph({"type": RATIO_GRAPH, "run": r}, height), className="card") for r in runs]
    return html.Div(cards, className="grid" if len(runs) > 1 else "")


def ratio_figure(run_id: str, x_range: tuple[float, float] | None = None) -> Any:
    """The |log-ratio| heatmap of one run with the registry's quantile bands; within ``x_range`` the stored
    histograms of that range are merged again into at most ``DEFAULT_BUCKETS`` columns (exact: they add)."""
    st = data.catalog().state(run_id)
    steps, centers, counts = st.cached("lr_hist", st.lr_histogram)
    steps = np.asarray(steps)
    if x_range is not None and len(steps):
        lo, hi = sorted(x_range)
        keep = (steps >= lo) & (steps <= hi)
        steps, counts = steps[keep], counts[:, keep]
    x, merged = bucket_sum(steps, counts)
    frame = st.metrics(BANDS)
    steps_all = frame["step"].to_numpy()
    bands, band_x = {}, steps_all
    for name in BANDS:
        if name in frame.columns:
            env = downsample(steps_all, data.to_numpy(frame, name), x_range=x_range)  # a bucket keeps its max
            bands[name.split("/", 1)[1]], band_x = env.hi, env.x
    fig = figures.ratio_heatmap(
        x,
        centers,
        merged,
        bands=bands,
        band_steps=band_x,
        title=f"{plot_text(run_id)}<br><span style='font-size:11px'>|log-ratio| per step</span>",
    )
    fig.update_layout(margin=dict(t=52))
    if x_range is not None:
        fig.update_xaxes(range=list(sorted(x_range)))
    return fig


def register_ratio() -> None:
    """Callbacks of the per-run heatmaps (called by the page module that shows them)."""
    graph = {"type": RATIO_GRAPH, "run": MATCH}

    @callback(
        Output(graph, "figure"),
        Input(ids.DATA_VERSION, "data"),
        Input(graph, "relayoutData"),
        State(graph, "id"),
    )
    def _figure(_version: int, relayout: Any, graph_id: dict[str, str]) -> Any:
        x_range = None
        if isinstance(ctx.triggered_id, dict):
            x_range = zoom_of(relayout)
            if x_range is None and not _redraw(relayout):
                raise PreventUpdate
        good = data.catalog().valid_ids([str(graph_id.get("run", ""))])
        if not good:
            return figures.empty_figure("unknown run")
        return ratio_figure(good[0], x_range)

    @callback(
        Output(ids.REDIRECT, "href", allow_duplicate=True),
        Input({"type": RATIO_GRAPH, "run": ALL}, "clickData"),
        prevent_initial_call=True,
    )
    def _click(_clicks: list[Any]) -> str:
        return click_href(ctx.triggered_id, ctx.triggered[0]["value"] if ctx.triggered else None)


# --- objective lens -------------------------------------------------------------------------------------------
def lens_layout(runs: list[str], *, height: int = 340) -> html.Div:
    """The quantity choice and, per run, the lens lines and bars side by side."""
    rows = [
        html.Div(
            [
                html.Div(_graph({"type": LENS_LINES, "run": r}, height), className="card"),
                html.Div(_graph({"type": LENS_BARS, "run": r}, height), className="card"),
            ],
            className="grid",
        )
        for r in runs
    ]
    return html.Div(
        [
            html.Div(
                [
                    dcc.RadioItems(
                        id=LENS_QUANTITY,
                        options=[{"label": q, "value": q} for q in LENS_QUANTITIES],
                        value=LENS_QUANTITIES[0],
                        inline=True,
                        className="radio",
                    ),
                    html.Div(id=LENS_NOTE, className="muted"),
                ],
                className="toolbar",
            ),
            dcc.Loading(html.Div(rows), type="dot"),
        ]
    )


def lens_figures(run_id: str, quantity: str) -> tuple[Any, Any]:
    """(lines over steps, bars per objective) of one run's objective lens."""
    st = data.catalog().state(run_id)
    frame = st.cached("lens", st.lens)
    if frame is None or frame.height == 0:
        empty = figures.empty_figure(f"{run_id}: no token rows for the lens")
        return empty, empty
    total = st.metrics(data.ALWAYS).height
    part = f"{frame.height} of {total} steps" if frame.height < total else f"all {total} steps"
    lines, bars = figures.lens_lines(frame, quantity), figures.lens_bars(frame, quantity)
    for fig in (lines, bars):
        what = fig.layout.title.text or ""
        fig.update_layout(
            title=dict(text=f"{plot_text(run_id)}<br><span style='font-size:11px'>{what} · {part}</span>", y=0.97),
            margin=dict(t=52),
        )
    return lines, bars


def register_lens() -> None:
    """Callbacks of the per-run lens (called by the page module that shows it)."""

    @callback(
        Output({"type": LENS_LINES, "run": MATCH}, "figure"),
        Output({"type": LENS_BARS, "run": MATCH}, "figure"),
        Input(LENS_QUANTITY, "value"),
        Input(ids.DATA_VERSION, "data"),
        State({"type": LENS_LINES, "run": MATCH}, "id"),
    )
    def _figures(quantity: str | None, _version: int, graph_id: dict[str, str]) -> tuple[Any, Any]:
        good = data.catalog().valid_ids([str(graph_id.get("run", ""))])
        if not good:
            empty = figures.empty_figure("unknown run")
            return empty, empty
        return lens_figures(good[0], quantity or LENS_QUANTITIES[0])

    @callback(Output(LENS_NOTE, "children"), Input(ids.PAGE_RUNS, "data"))
    def _note(runs: list[str] | None) -> str:
        n = len(data.catalog().valid_ids(runs or []))
        return f"one row per selected run ({n})" if n > 1 else ""

    @callback(
        Output(ids.REDIRECT, "href", allow_duplicate=True),
        Input({"type": LENS_LINES, "run": ALL}, "clickData"),
        prevent_initial_call=True,
    )
    def _click(_clicks: list[Any]) -> str:
        return click_href(ctx.triggered_id, ctx.triggered[0]["value"] if ctx.triggered else None)
