"""Ratios & trust region: the |log-ratio| distribution per step with tail bands, ESS, KL, tail index."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, html

from app import data, figures, ids, panels
from app import layout as ui
from app.downsample import bucket_sum, downsample

dash.register_page(__name__, path="/ratios", name="Ratios & trust region", title="rldiag · Ratios", order=2)

PAGE = "ratios"
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
            "(heatmap, first selected run) with its p50/p99/p99.9 bands, then each ratio, ESS, KL and "
            "sequence-level metric of the registry.",
        )
    ]
    if runs:
        children.append(
            ui.section(
                "log-ratio distribution",
                ui.clickable_graph(ids.RATIO_HEATMAP, height=400),
                note="Colour: log10 of the share of the step's tokens in each bin. Steps are "
                "merged (histograms add) when there are more than fit the width.",
            )
        )
        by_family: dict[str, list[panels.Panel]] = {}
        for p in panels.page_panels(PAGE):
            by_family.setdefault(p.family, []).append(p)
        children.extend(ui.section(fam, ui.panel_grid(PAGE, ps)) for fam, ps in by_family.items())
    return html.Div(children)


def heatmap_figure(runs: list[str]) -> Any:
    """The |log-ratio| heatmap of the first run, with the registry's quantile bands."""
    cat = data.catalog()
    good = cat.valid_ids(runs)
    if not good:
        return figures.empty_figure("no run selected")
    st = cat.state(good[0])
    steps, centers, counts = st.cached("lr_hist", st.lr_histogram)
    x, merged = bucket_sum(steps, counts)
    frame = st.metrics()
    steps_all = frame["step"].to_numpy()
    bands, band_x = {}, steps_all
    for name in BANDS:
        if name in frame.columns:
            # a tail quantile's spike must survive: keep each bucket's maximum
            env = downsample(steps_all, data.to_numpy(frame, name))
            bands[name.split("/", 1)[1]], band_x = env.hi, env.x
    return figures.ratio_heatmap(
        x, centers, merged, bands=bands, band_steps=band_x, title=f"|log-ratio| per step — {good[0]}"
    )


@callback(
    Output(ids.clickable(ids.RATIO_HEATMAP), "figure"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.DATA_VERSION, "data"),
)
def update_heatmap(runs: list[str] | None, _version: int) -> Any:
    return heatmap_figure(runs or [])
