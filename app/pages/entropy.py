"""Entropy: mean and quantile bands, low-entropy share, entropy-advantage covariance, the entropy law."""

from __future__ import annotations

import importlib
import math
from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from app import data, figures, ids, panels
from app import layout as ui

dash.register_page(__name__, path="/entropy", name="Entropy", title="rldiag · Entropy", order=4)

PAGE = "entropy"
ENTROPY_METRIC = "entropy/mean"


def reward_metrics() -> list[str]:
    """Performance series the law can be fitted against: the registry's ``reward`` family."""
    return [s.name for s in panels.families().get("reward", [])]


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Entropy",
            runs,
            error=error,
            intro="Policy entropy and what drives it: the covariance of log-prob and advantage predicts the "
            "entropy change (Entropy Mechanism paper); a positive covariance while entropy falls is an "
            "early collapse signal.",
        )
    ]
    if not runs:
        return html.Div(children)
    children.append(ui.section("entropy", ui.panel_grid(PAGE, panels.page_panels(PAGE))))
    options = [{"label": m, "value": m} for m in reward_metrics()]
    children.append(
        ui.section(
            "entropy-performance law",
            html.Div(
                [
                    html.Span("performance series: ", className="muted"),
                    dcc.Dropdown(
                        id=ids.LAW_REWARD,
                        options=options,
                        value=options[0]["value"] if options else None,
                        clearable=False,
                        className="inline-dropdown",
                    ),
                ],
                className="toolbar",
            ),
            html.Div(id=ids.LAW_NOTE, className="law-note"),
            html.Div(dcc.Graph(id=ids.LAW_FIGURE, config=ui.GRAPH_CONFIG, style={"height": "360px"}), className="card"),
            note="Fit of R = -a·exp(H) + b over the run's steps (first selected run); the ceiling b - a is the "
            "performance predicted when entropy is exhausted.",
        )
    )
    return html.Div(children)


def _field(result: Any, *names: str) -> Any:
    for n in names:
        if isinstance(result, dict) and n in result:
            return result[n]
        if hasattr(result, n):
            return getattr(result, n)
    return None


def law_view(run_id: str, metric: str) -> tuple[Any, str]:
    """(figure, note) of the law fit, or an explanation when it cannot be fitted."""
    try:
        law = importlib.import_module("rldiag.analysis.law")
    except ImportError:
        return figures.empty_figure("law fit not available"), "rldiag.analysis.law is not available in this version."
    frame = data.catalog().state(run_id).metrics()
    if metric not in frame.columns or ENTROPY_METRIC not in frame.columns:
        return figures.empty_figure(f"this run has no {metric}"), f"{run_id} has no {metric} or {ENTROPY_METRIC}."
    try:
        result = law.fit_law(frame, metric=metric)
    except (ValueError, ArithmeticError) as exc:
        return figures.empty_figure("cannot fit the law"), f"cannot fit: {exc}"
    a, b = _field(result, "a"), _field(result, "b")
    r2 = _field(result, "r2", "r_squared")
    if a is None or b is None:
        return figures.empty_figure("cannot fit the law"), "the fit returned no coefficients"
    fig = figures.law_figure(
        data.to_numpy(frame, ENTROPY_METRIC),
        data.to_numpy(frame, metric),
        a=float(a),
        b=float(b),
        r2=float(r2 if r2 is not None else float("nan")),
        reward_name=metric,
    )
    ceiling = _field(result, "ceiling")
    reached = _field(result, "reached")
    gain = _field(result, "gain_reached")
    parts = [f"a = {float(a):.4g}, b = {float(b):.4g}"]
    if r2 is not None:
        parts.append(f"R² = {float(r2):.3f}")
    parts.append(f"ceiling = {float(ceiling if ceiling is not None else b - a):.4g}")
    if reached is not None and math.isfinite(float(reached)):
        parts.append(f"R now = {100 * float(reached):.0f}% of the ceiling")
    if gain is not None and math.isfinite(float(gain)):
        parts.append(f"{100 * float(gain):.0f}% of the possible gain made")
    agree = _field(result, "sign_agreement", "mechanism_agreement")
    if agree is not None and math.isfinite(float(agree)):
        parts.append(f"sign agreement of -cov with the entropy change: {100 * float(agree):.0f}%")
    caveats = result.caveats() if hasattr(result, "caveats") else []
    return fig, "; ".join(parts) + "".join(f". Caution: {c}" for c in caveats) + ("." if caveats else "")


@callback(
    Output(ids.LAW_FIGURE, "figure"),
    Output(ids.LAW_NOTE, "children"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.LAW_REWARD, "value"),
    Input(ids.DATA_VERSION, "data"),
)
def update_law(runs: list[str] | None, metric: str | None, _version: int) -> tuple[Any, str]:
    good = data.catalog().valid_ids(runs or [])
    if not good or not metric:
        return figures.empty_figure("no run selected"), ""
    return law_view(good[0], metric)
