"""Clipping & balance: clip fractions, the four regimes, the positive share, and the objective lens."""

from __future__ import annotations

from typing import Any

import dash
import polars as pl
from dash import Input, Output, callback, html

from app import data, figures, ids, panels, perrun
from app import layout as ui

dash.register_page(__name__, path="/clipping", name="Clipping & balance", title="rldiag · Clipping", order=3)

PAGE = "clipping"
perrun.register_lens()  # the lens of every selected run (app/perrun.py)
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
            perrun.lens_layout(runs),
            note="Counterfactual: how PPO, DAPO, dual-clip, DCPO, CISPO, SAPO, GSPO, CTPO, TIS/MIS, BAPO and "
            "Trust-the-Batch would have weighted each selected run's tokens (one row per run).",
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
    title = f"regimes — {good[0]}"
    on = figures.onpolicy_mask(frame)
    if frame.height and on.all():
        return figures.empty_figure(
            f"{good[0]}: every step is on-policy (every ratio exactly 1): no token is in a regime"
        )
    if on.any():  # r = 1 exactly: no token is in any regime, the stack would drop to 0 there
        frame = frame.filter(pl.Series(~on))
        title += f" (on-policy steps left out: {int(on.sum())})"
    labels = {
        "regime/pos_up": "adv>0, r>1",
        "regime/pos_down": "adv>0, r<1",
        "regime/neg_up": "adv<0, r>1",
        "regime/neg_down": "adv<0, r<1",
    }
    return figures.stacked_shares(frame, regime_metrics(), title=title, labels=labels)
