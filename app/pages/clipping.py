"""Clipping & balance: clip fractions, the four regimes, the positive share, and the objective lens."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from app import data, figures, ids, panels
from app import layout as ui

dash.register_page(__name__, path="/clipping", name="Clipping & balance", title="rldiag · Clipping", order=3)

PAGE = "clipping"
LENS_QUANTITIES = ("kept_frac", "weight_mean", "pos_share", "kept_adv_frac")


def regime_metrics() -> list[str]:
    """The DISPO regime shares, from the registry's ``regime`` family."""
    return [s.name for s in panels.families().get("regime", [])]


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Clipping & balance",
            runs,
            error=error,
            intro="Which tokens the clip removed, in which direction, and whether positive or negative advantages "
            "dominate the update. The objective lens replays the same tokens under other objectives.",
        )
    ]
    if not runs:
        return html.Div(children)
    by_family: dict[str, list[panels.Panel]] = {}
    for p in panels.page_panels(PAGE):
        if p.family != "regime":
            by_family.setdefault(p.family, []).append(p)
    for fam, ps in by_family.items():
        children.append(ui.section(fam, ui.panel_grid(PAGE, ps)))
        if fam == "clip":
            children.append(
                ui.section(
                    "regimes",
                    ui.clickable_graph(ids.REGIME_STACK, height=300),
                    note="Token shares of (adv>0, r>1), (adv>0, r<1), (adv<0, r>1), (adv<0, r<1) — DISPO's four "
                    "regimes — first selected run.",
                )
            )
    children.append(
        ui.section(
            "objective lens",
            html.Div(
                [
                    dcc.RadioItems(
                        id=ids.LENS_QUANTITY,
                        options=[{"label": q, "value": q} for q in LENS_QUANTITIES],
                        value="kept_frac",
                        inline=True,
                        className="radio",
                    ),
                    html.Div(id=ids.LENS_NOTE, className="muted"),
                ],
                className="toolbar",
            ),
            dcc.Loading(
                html.Div(
                    [
                        html.Div(ui.clickable_graph(ids.LENS_LINES, height=340), className="card"),
                        html.Div(
                            dcc.Graph(id=ids.LENS_BARS, config=ui.GRAPH_CONFIG, style={"height": "340px"}),
                            className="card",
                        ),
                    ],
                    className="grid",
                ),
                type="dot",
            ),
            note="Counterfactual: how PPO, DAPO, dual-clip, DCPO, CISPO, SAPO, GSPO, CTPO, TIS/MIS, BAPO and "
            "Trust-the-Batch would have weighted this run's tokens (first selected run).",
        )
    )
    return html.Div(children)


@callback(
    Output(ids.clickable(ids.REGIME_STACK), "figure"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.DATA_VERSION, "data"),
)
def update_regimes(runs: list[str] | None, _version: int) -> Any:
    good = data.catalog().valid_ids(runs or [])
    if not good:
        return figures.empty_figure("no run selected")
    frame = data.catalog().state(good[0]).metrics()
    labels = {
        "regime/pos_up": "adv>0, r>1",
        "regime/pos_down": "adv>0, r<1",
        "regime/neg_up": "adv<0, r>1",
        "regime/neg_down": "adv<0, r<1",
    }
    return figures.stacked_shares(frame, regime_metrics(), title=f"regimes — {good[0]}", labels=labels)


def lens_frame(run_id: str) -> Any:
    """The lens of a run (None when :mod:`rldiag.analysis.lens` is not available)."""
    st = data.catalog().state(run_id)
    return st.cached("lens", st.lens)


@callback(
    Output(ids.clickable(ids.LENS_LINES), "figure"),
    Output(ids.LENS_BARS, "figure"),
    Output(ids.LENS_NOTE, "children"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.LENS_QUANTITY, "value"),
    Input(ids.DATA_VERSION, "data"),
)
def update_lens(runs: list[str] | None, quantity: str, _version: int) -> tuple[Any, Any, str]:
    good = data.catalog().valid_ids(runs or [])
    if not good:
        empty = figures.empty_figure("no run selected")
        return empty, empty, ""
    frame = lens_frame(good[0])
    if frame is None:
        empty = figures.empty_figure("objective lens not available (rldiag.analysis.lens missing)")
        return empty, empty, "rldiag.analysis.lens is not installed in this version"
    total = data.catalog().state(good[0]).metrics().height
    note = f"{good[0]}: " + (
        f"{frame.height} of {total} steps, evenly spaced" if frame.height < total else f"all {total} steps"
    )
    return figures.lens_lines(frame, quantity), figures.lens_bars(frame, quantity), note
