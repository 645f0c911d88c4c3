"""Positions & stages: step x bucket heatmaps of ratio, clipping, entropy and mismatch by position/stage/turn,
one per selected run, re-aggregated on zoom (:mod:`app.buckets`)."""

from __future__ import annotations

from typing import Any

import dash
from dash import html

from app import buckets, panels
from app import layout as ui

dash.register_page(__name__, path="/positions", name="Positions & stages", title="rldiag · Positions", order=6)

PAGE = "positions"
VIEW = buckets.POSITIONS
buckets.register(VIEW)


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
            VIEW.layout(runs),
            note="One heatmap per selected run. Drag over a heatmap to compute it again on the steps of that "
            "range (double click resets); click a cell to open that step's tokens.",
        )
    )
    children.append(ui.section("stage scalars", ui.panel_grid(PAGE, panels.page_panels(PAGE))))
    return html.Div(children)
