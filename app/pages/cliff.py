"""Cliff calculator: lambda*(p, b, c) of on-policy distillation with reward extrapolation, and q(lambda)."""

from __future__ import annotations

import importlib
import math
from typing import Any, cast

import dash
from dash import Input, Output, callback, dcc, html

from app import figures, ids
from app import layout as ui

dash.register_page(__name__, path="/cliff", name="Cliff calculator", title="rldiag · Cliff", order=8)

DEFAULTS = {"p": 0.96, "b": 0.90, "c": 2.0, "lam": None}


def _number(
    id_: str, label: str, value: float | None, *, lo: float, hi: float | None, step: float, help_: str
) -> html.Div:
    return html.Div(
        [
            html.Label(label, htmlFor=id_, className="field-label"),
            dcc.Input(id=id_, type="number", value=value, min=lo, max=hi, step=step, debounce=True, className="num"),
            html.Span(help_, className="muted field-help"),
        ],
        className="field",
    )


def layout(p: Any = None, b: Any = None, c: Any = None, lam: Any = None, **_query: Any) -> html.Div:
    def num(v: Any, default: float | None) -> float | None:
        try:
            return float(v) if v not in (None, "") else default
        except (TypeError, ValueError):
            return default

    return html.Div(
        [
            html.Div(html.H2("Cliff calculator", className="page-title"), className="page-head"),
            html.P(
                "On-policy distillation with reward extrapolation drives the policy toward "
                "base^(1-λ)·teacher^λ. Past λ* a base-relative ratio leaves the clip range [1/c, c] and the "
                "clipped objective stops constraining the update: the extrapolation cliff. rldiag's λ* is a "
                "derivation (docs/cliff.md), not the paper's own equations.",
                className="intro",
            ),
            html.Div(
                [
                    _number(
                        ids.CLIFF_P,
                        "p — teacher modal probability",
                        num(p, DEFAULTS["p"]),
                        lo=0.0,
                        hi=1.0,
                        step=0.001,
                        help_="at the binding (near-deterministic) position",
                    ),
                    _number(
                        ids.CLIFF_B,
                        "b — warm-start (base) mass",
                        num(b, DEFAULTS["b"]),
                        lo=0.0,
                        hi=1.0,
                        step=0.001,
                        help_="of the same token under the base model",
                    ),
                    _number(
                        ids.CLIFF_C,
                        "c — IS clip strength",
                        num(c, DEFAULTS["c"]),
                        lo=1.0,
                        hi=None,
                        step=0.1,
                        help_="ratios are clipped to [1/c, c]; c = 1/(1-ε) for a PPO ε",
                    ),
                    _number(
                        ids.CLIFF_LAM,
                        "λ — your extrapolation weight (optional)",
                        num(lam, DEFAULTS["lam"]),
                        lo=0.0,
                        hi=None,
                        step=0.01,
                        help_="shows the headroom λ/λ*",
                    ),
                ],
                className="fields",
            ),
            html.Div(id=ids.CLIFF_RESULT, className="cliff-result"),
            html.Div(
                dcc.Graph(id=ids.CLIFF_FIGURE, config=cast(Any, ui.GRAPH_CONFIG), style={"height": "420px"}),
                className="card",
            ),
        ]
    )


def cliff_view(p: Any, b: Any, c: Any, lam: Any) -> tuple[Any, Any]:
    """(figure, result line) for the inputs, or an explanation of what is wrong with them."""
    try:
        p, b, c = float(p), float(b), float(c)
        lam = float(lam) if lam not in (None, "") else None
    except (TypeError, ValueError):
        return figures.empty_figure("enter p, b and c"), ui.notice("p, b and c must be numbers.", "error")
    if not (0 < p < 1 and 0 < b < 1 and c > 1):
        return figures.empty_figure("out of range"), ui.notice("need 0 < p < 1, 0 < b < 1 and c > 1.", "error")
    try:
        mod = importlib.import_module("rldiag.analysis.cliff")
    except ImportError:
        return figures.empty_figure("cliff calculator not available"), ui.notice(
            "rldiag.analysis.cliff is not available in this version.", "error"
        )
    try:
        star = float(mod.lambda_star(p, b, c))
        fig = mod.cliff_figure(p, b, c, lam=lam)
    except (ValueError, ArithmeticError) as exc:
        return figures.empty_figure("cannot compute"), ui.notice(str(exc), "error")
    text = f"λ* = {star:.4f}" if math.isfinite(star) else "λ* = ∞ (the clip never binds)"
    parts: list[Any] = [html.Strong(text)]
    if lam is not None and math.isfinite(star) and star > 0:
        headroom = lam / star
        level = str(mod.severity(headroom)) if hasattr(mod, "severity") else ""
        state = {"critical": "critical: past the cliff", "warn": "warn: close to it", "ok": "safe"}.get(level, level)
        parts.append(html.Span(f" · λ/λ* = {headroom:.3f} ({state})", className=f"sev-{level}"))
    return fig, html.Div(parts)


@callback(
    Output(ids.CLIFF_FIGURE, "figure"),
    Output(ids.CLIFF_RESULT, "children"),
    Input(ids.CLIFF_P, "value"),
    Input(ids.CLIFF_B, "value"),
    Input(ids.CLIFF_C, "value"),
    Input(ids.CLIFF_LAM, "value"),
)
def update_cliff(p: Any, b: Any, c: Any, lam: Any) -> tuple[Any, Any]:
    return cliff_view(p, b, c, lam)
