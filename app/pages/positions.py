"""Positions & stages: step x bucket heatmaps of ratio, clipping, entropy and mismatch by position/stage/turn."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from app import data, figures, ids, panels
from app import layout as ui

dash.register_page(__name__, path="/positions", name="Positions & stages", title="rldiag · Positions", order=6)

PAGE = "positions"
BY = (("position", "pos"), ("stage", "stage"), ("turn", "turn"))
KEYS = {"step", "bucket", "pos", "stage", "turn", "bucket_lo", "bucket_hi", "lo", "hi"}


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Positions & stages",
            runs,
            error=error,
            intro="Per bucket of token position (deciles of the longest response), denoising stage or turn: "
            "GRPO-Guard's left shift of the ratio below 1 and its per-timestep variance spread show here "
            "before they show in the step means.",
        )
    ]
    if not runs:
        return html.Div(children)
    children.append(
        ui.section(
            "by bucket",
            html.Div(
                [
                    dcc.RadioItems(
                        id=ids.BUCKET_BY,
                        options=[{"label": label, "value": v} for label, v in BY],
                        value="pos",
                        inline=True,
                        className="radio",
                    ),
                    dcc.Dropdown(
                        id=ids.BUCKET_QUANTITY, options=[], value=None, clearable=False, className="inline-dropdown"
                    ),
                    html.Div(id=ids.BUCKET_NOTE, className="muted"),
                ],
                className="toolbar",
            ),
            dcc.Loading(html.Div(ui.clickable_graph(ids.BUCKET_HEATMAP, height=420), className="card"), type="dot"),
            note="First selected run. Click a cell to open that step's tokens.",
        )
    )
    children.append(ui.section("stage scalars", ui.panel_grid(PAGE, panels.page_panels(PAGE))))
    return html.Div(children)


def quantities(frame: Any) -> list[str]:
    """Numeric value columns of a bucket table (everything but the keys), the token count ``n`` last."""
    names = [c for c, t in frame.schema.items() if c not in KEYS and t.is_numeric()]
    return sorted(names, key=lambda c: c == "n")


def bucket_frame(run_id: str, by: str) -> Any:
    st = data.catalog().state(run_id)
    return st.cached(("buckets", by), lambda: st.bucket_metrics(by))


@callback(
    Output(ids.clickable(ids.BUCKET_HEATMAP), "figure"),
    Output(ids.BUCKET_QUANTITY, "options"),
    Output(ids.BUCKET_QUANTITY, "value"),
    Output(ids.BUCKET_NOTE, "children"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.BUCKET_BY, "value"),
    Input(ids.BUCKET_QUANTITY, "value"),
    Input(ids.DATA_VERSION, "data"),
)
def update_buckets(runs: list[str] | None, by: str, quantity: str | None, _version: int) -> tuple[Any, ...]:
    good = data.catalog().valid_ids(runs or [])
    if not good:
        return figures.empty_figure("no run selected"), [], None, ""
    try:
        frame = bucket_frame(good[0], by)
    except (ValueError, KeyError) as exc:
        return figures.empty_figure(f"no {by} buckets"), [], None, str(exc)
    if frame is None or frame.height == 0:
        return figures.empty_figure(f"this run has no {by} data"), [], None, f"{good[0]} has no {by} column"
    names = quantities(frame)
    if quantity not in names:
        quantity = names[0] if names else None
    if quantity is None:
        return figures.empty_figure("no quantities"), [], None, ""
    fig = figures.bucket_heatmap(frame, quantity, by=by)
    return fig, [{"label": n, "value": n} for n in names], quantity, coverage_note(good[0], frame)


def coverage_note(run_id: str, frame: Any) -> str:
    """Say when the table covers only part of the run's steps (long runs are sampled evenly)."""
    st = data.catalog().state(run_id)
    used, total = frame["step"].n_unique(), st.metrics().height
    part = f"{used} of {total} steps, evenly spaced" if used < total else f"all {total} steps"
    return f"{run_id}: {part}"
