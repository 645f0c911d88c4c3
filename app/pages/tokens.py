"""Tokens: one step's worst tokens (|log-ratio|, entropy, covariance) with their sequence context, coloured.

Reached by clicking a point on any chart (``/tokens?run=<id>&step=<n>``). Token text comes from a local
tokenizer (``rldiag dashboard --tokenizer DIR``) or is shown as ids; either way it is rendered as text.
"""

from __future__ import annotations

import math
from typing import Any, cast

import dash
import numpy as np
from dash import Input, Output, callback, dcc, html

from app import data, ids
from app import layout as ui
from app import tokens as tv
from app.security import clamp, visible

dash.register_page(__name__, path="/tokens", name="Tokens", title="rldiag · Tokens", order=7)

K_CHOICES = (5, 10, 20, 50)
DEFAULT_K = 10
MAX_K = max(K_CHOICES)
"""Rows per ranking, bounded on the server whatever a request sends (``k=10**9`` is 50 rows)."""
SUGGEST_METRIC = "ratio/logabs_p999"
"""Steps suggested when none is given: the largest tail of |log-ratio| (a registry metric)."""


def _step(value: Any) -> int | None:
    try:
        step = int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: "inf", 1e400
        return None
    return step if step is None or 0 <= step < 2**63 else None


def layout(run: Any = None, step: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run, multi=False)
    children: list[Any] = [
        ui.run_header(
            "Tokens",
            runs,
            error=error,
            multi=False,
            intro="Pick a step (or click a point on any chart). Each row is one "
            "token; the strip beside it is its sequence around it, coloured "
            "by log-ratio (blue: r < 1, red: r > 1) or by entropy.",
        )
    ]
    if not runs:
        return html.Div(children)
    st = data.catalog().state(runs[0])
    frame = st.metrics([SUGGEST_METRIC])
    chosen = _step(step)
    if chosen is None and frame.height:
        chosen = int(cast(int, frame["step"].max()))
    children.append(
        html.Div(
            [
                html.Label("step", htmlFor=ids.TOKENS_STEP, className="muted"),
                dcc.Input(id=ids.TOKENS_STEP, type="number", value=chosen, debounce=True, className="step-input"),
                html.Label("colour by", className="muted"),
                dcc.RadioItems(
                    id=ids.TOKENS_COLOR,
                    options=[{"label": "log-ratio", "value": "logratio"}, {"label": "entropy", "value": "entropy"}],
                    value="logratio",
                    inline=True,
                    className="radio",
                ),
                html.Label("rows", htmlFor=ids.TOKENS_K, className="muted"),
                dcc.Dropdown(
                    id=ids.TOKENS_K, options=list(K_CHOICES), value=DEFAULT_K, clearable=False, className="k-dropdown"
                ),
            ],
            className="toolbar",
        )
    )
    children.append(suggestions(runs[0], frame))
    children.append(html.Div(id=ids.TOKENS_SUMMARY, className="muted"))
    children.append(dcc.Loading(html.Div(id=ids.TOKENS_BODY), type="dot"))
    return html.Div(children)


def suggestions(run_id: str, frame: Any) -> html.Div:
    """Links to the steps with the largest |log-ratio| tail and to steps where alerts fired."""
    links: list[Any] = []
    if SUGGEST_METRIC in frame.columns and frame.height:
        v = data.to_numpy(frame, SUGGEST_METRIC)
        steps = frame["step"].to_numpy()
        ok = np.flatnonzero(np.isfinite(v))
        for i in ok[np.argsort(-v[ok])][:5]:
            links.append(
                dcc.Link(
                    f"{int(steps[i])} ({v[i]:.3g})",
                    href="/tokens" + ui.run_query([run_id], step=int(steps[i])),
                    className="chip",
                )
            )
    fired = data.firing_events(data.catalog().state(run_id).alerts())
    for ev in fired[-5:]:
        if ev["step"] is not None:
            links.append(
                dcc.Link(
                    f"{ev['step']} ({ev['rule']})",
                    href="/tokens" + ui.run_query([run_id], step=ev["step"]),
                    className="chip chip-alert",
                )
            )
    if not links:
        return html.Div()
    return html.Div(
        [html.Span(f"worst steps by {SUGGEST_METRIC} / alerts: ", className="muted"), *links], className="suggest"
    )


# --- rendering ----------------------------------------------------------------------------------------
def _fmt(x: float, spec: str = ".3g") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x + 0.0, spec)  # + 0.0: -0.0 reads 0


def color_for(tok: tv.ContextToken, by: str) -> str:
    """Background colour of a context token: diverging on log-ratio, sequential on entropy."""
    if by == "entropy":
        e = tok.entropy
        if not math.isfinite(e):
            return "#eeeeee"
        t = min(e / 3.0, 1.0)  # 3 nats and above: full colour
        return f"rgba(44,160,44,{0.08 + 0.7 * t:.2f})"
    lr = tok.logratio
    if not math.isfinite(lr):
        return "#eeeeee"
    t = min(abs(lr) / 1.0, 1.0)  # |log-ratio| of 1 (r = e or 1/e) and above: full colour
    return f"rgba(214,39,40,{0.08 + 0.8 * t:.2f})" if lr > 0 else f"rgba(31,119,180,{0.08 + 0.8 * t:.2f})"


def _shown(text: str) -> str:
    # Whitespace tokens would be invisible: show them as visible marks; control and bidi characters (which
    # would reorder the text around them) as escapes. Still plain text.
    shown = visible(text, whitespace=True)
    if not text.strip():
        shown = shown.replace(" ", "·")
    return shown or "∅"


def context_strip(pick: tv.TokenPick, by: str) -> html.Div:
    spans = []
    for c in pick.context:
        spans.append(
            html.Span(
                _shown(c.text),
                className="tok tok-selected" if c.selected else "tok",
                style={"backgroundColor": color_for(c, by)},
                title=f"pos {c.pos} · id {c.token_id} · log-ratio {_fmt(c.logratio)} · entropy {_fmt(c.entropy)}",
            )
        )
    return html.Div(spans, className="ctx")


def pick_table(ranking: str, picks: list[tv.TokenPick], by: str) -> html.Div:
    head = html.Thead(
        html.Tr(
            [
                html.Th(h)
                for h in ("#", "token", "score", "log-ratio", "ratio", "entropy", "adv", "cov", "seq", "pos", "context")
            ]
        )
    )
    rows = []
    for n, p in enumerate(picks, 1):
        ratio = math.exp(p.logratio) if math.isfinite(p.logratio) and p.logratio < 700 else float("nan")
        rows.append(
            html.Tr(
                [
                    html.Td(str(n)),
                    html.Td(html.Span(_shown(p.text), className="tok tok-selected")),
                    html.Td(_fmt(p.score, ".4g")),
                    html.Td(_fmt(p.logratio, ".4g")),
                    html.Td(_fmt(ratio, ".4g")),
                    html.Td(_fmt(p.entropy)),
                    html.Td(_fmt(p.adv)),
                    html.Td(_fmt(p.cov)),
                    html.Td(str(p.seq)),
                    html.Td(str(p.pos)),
                    html.Td(context_strip(p, by)),
                ]
            )
        )
    return html.Div(
        [html.H3(tv.RANKINGS[ranking]), html.Table([head, html.Tbody(rows)], className="table tokens")],
        className="section",
    )


def token_body(run_id: str, step: int | None, by: str, k: int) -> tuple[Any, str]:
    """(tables, summary line) for one step of one run."""
    cat = data.catalog()
    if step is None:
        return ui.notice("Choose a step."), ""
    st = cat.state(run_id)
    frame = st.tokens_at(step)
    if frame.height == 0:
        return ui.notice(
            f"No token rows for step {step} of {run_id}: the step does not exist, or its token rows "
            "were not recorded (token_sample_rate < 1 or rows dropped under load)."
        ), ""
    have = tv.available(frame)
    decoder = cat.decoder_for(run_id)
    sections = []
    for ranking in tv.RANKINGS:
        if not have[ranking]:
            sections.append(
                html.Div(
                    [html.H3(tv.RANKINGS[ranking]), ui.notice(f"this run did not record the {ranking} column")],
                    className="section",
                )
            )
            continue
        picks = tv.decode(tv.pick(frame, ranking, k=k), decoder)
        sections.append(pick_table(ranking, picks, by))
    s = tv.summary(frame)
    line = (
        f"{visible(run_id)} · step {step}: {int(s['tokens'])} token rows in {int(s['sequences'])} sequences; "
        f"max |log-ratio| {_fmt(s['max_abs_logratio'])}"
    )
    if decoder.error:
        line += f" · {decoder.error}"
    elif decoder.path is None:
        line += " · token ids shown (start with --tokenizer DIR to decode)"
    return html.Div(sections), line


@callback(
    Output(ids.TOKENS_BODY, "children"),
    Output(ids.TOKENS_SUMMARY, "children"),
    Input(ids.PAGE_RUNS, "data"),
    Input(ids.TOKENS_STEP, "value"),
    Input(ids.TOKENS_COLOR, "value"),
    Input(ids.TOKENS_K, "value"),
)
def update_tokens(runs: list[str] | None, step: Any, by: str, k: int) -> tuple[Any, str]:
    good = data.catalog().valid_ids(runs or [])
    if not good:
        return ui.notice("no run selected"), ""
    return token_body(good[0], _step(step), by or "logratio", clamp(k, 1, MAX_K, DEFAULT_K))
