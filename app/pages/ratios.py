"""Ratios & trust region: the |log-ratio| distribution per step with tail bands, ESS, KL, tail index."""

from __future__ import annotations

from typing import Any

import dash
from dash import html

from app import layout as ui
from app import panels, perrun

dash.register_page(__name__, path="/ratios", name="Ratios & trust region", title="rldiag · Ratios", order=2)

PAGE = "ratios"
perrun.register_ratio()  # one heatmap per selected run (app/perrun.py)
BANDS = ("ratio/logabs_p50", "ratio/logabs_p99", "ratio/logabs_p999")
"""Registry quantiles of |log-ratio| drawn over the heatmap."""


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Ratios & trust region",
            runs,
            error=error,
            intro="How far the policy moved from the one that sampled: the |log-ratio| distribution of every step "
            "(a heatmap per selected run) with its p50/p99/p99.9 bands, then each ratio, ESS, KL and "
            "sequence-level metric of the registry.",
        )
    ]
    if runs:
        children.append(
            ui.section(
                "log-ratio distribution",
                perrun.ratio_layout(runs),
                note="Colour: log10 of the share of the step's tokens in each bin. Steps are "
                "merged (histograms add) when there are more than fit the width; drag to zoom (merged again "
                "over the range), double click resets.",
            )
        )
        by_family: dict[str, list[panels.Panel]] = {}
        for p in panels.page_panels(PAGE):
            by_family.setdefault(p.family, []).append(p)
        children.extend(ui.section(fam, ui.panel_grid(PAGE, ps)) for fam, ps in by_family.items())
    return html.Div(children)
